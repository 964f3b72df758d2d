"""How close a guided U-Net step can get to this CPU's arithmetic peak, and where torchsd and OpenVINO stand.

    PYTHONPATH=src python benchmarks/cpu_roofline.py --sizes 256,512 --dtypes fp32,bf16 --ov-cache /tmp/ov-sd15

Issue 24 asks for a U-Net step at 0.9x OpenVINO's time or less. Both run the same function on the same
SD 1.5-size random weights, so the question behind that goal is arithmetic: how many floating-point operations
a step takes, and how fast this CPU can do them. This prints, per dtype and size:

- the FLOPs of one guided step (CFG batch of 2, 77-token contexts) counted by ``torch.utils.flop_counter`` as
  torchsd runs it (its plain modules: the latents shared by both contexts up to the first cross-attention are
  computed once) and as diffusers' ``UNet2DConditionModel`` runs it, which is the graph OpenVINO converts; with
  attention's two matmuls counted (``2 * B * heads * Tq * Tk * (d_qk + d_v)``), which the counter leaves out
  for PyTorch's CPU attention kernel;
- the best rate oneDNN reaches here on the step's own matmul and 3x3-convolution shapes, each alone with its
  operands in cache-friendly layouts (the "peak": no step can run all its work faster than its best kernel);
- the floor, FLOPs / peak; OpenVINO's and torchsd's step times (min of ``--reps``, interleaved,
  timed plainly) and the share of the peak each reaches; and the rate a step at 0.9x OpenVINO would
  need, as a share of the peak.

The peak and the steps are timed at different moments, so run it on a quiet machine: with other work on the
cores, the peak comes out low and the shares meaningless (above 100%).

OpenVINO is a benchmark-only dependency (``pip install openvino``); without it the OpenVINO columns are left
out. Its models are converted as ``cpu_vs_openvino.py`` converts them (``--ov-cache``: the same folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NEGATIVE, PROMPT, build, diffusers_unet, load_note, timed  # noqa: E402
from torchsd.diffusion.denoisers import classifier_free_guidance  # noqa: E402
from torchsd.runtime import RuntimeOptions, apply_runtime  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_aten = torch.ops.aten
_mkldnn = torch.ops.mkldnn


def _attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """QK^T and PV of scaled dot-product attention; q (B, heads, Tq, d), k (.., Tk, d), v (.., Tk, dv)."""
    *batch, Tq, d = q_shape
    Tk, dv = k_shape[-2], v_shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * Tq * Tk * (d + dv)


ATTENTION_OPS = {_aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
                 _aten._scaled_dot_product_attention_math: _attention_flops}


def count_flops(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=ATTENTION_OPS) as counter:
        fn()
    return counter.get_total_flops()


def peak_rate(dtype: torch.dtype, size: int, reps: int) -> tuple[float, str]:
    """The best FLOP/s of oneDNN here on the step's own shapes: the transformer's linears at the top level's
    token count, and the 3x3 convolutions of the top two levels, in NCHW and NHWC."""
    tokens = 2 * (size // 8) ** 2
    gen = torch.Generator().manual_seed(0)
    best, where = 0.0, ""
    with torch.inference_mode():
        for k, n in ((320, 2560), (1280, 320), (320, 320)):
            x, w = torch.randn(tokens, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype)

            def matmul():
                return _mkldnn._linear_pointwise(x, w, None, "none", [], "")

            rate = 2 * tokens * k * n / timed(matmul, reps, warmup=True)
            if rate > best:
                best, where = rate, f"matmul ({tokens}, {k}) x ({k}, {n})"
        for c, hw in ((320, size // 8), (640, size // 16)):
            x = torch.randn(2, c, hw, hw, generator=gen).to(dtype)
            w = (torch.randn(c, c, 3, 3, generator=gen) * 0.02).to(dtype)
            for layout in (torch.contiguous_format, torch.channels_last):
                xl, wl = x.contiguous(memory_format=layout), w.contiguous(memory_format=layout)

                def conv():
                    return _mkldnn._convolution_pointwise(xl, wl, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")

                rate = 2 * 2 * c * c * 9 * hw * hw / timed(conv, reps, warmup=True)
                if rate > best:
                    name = "NHWC" if layout is torch.channels_last else "NCHW"
                    best, where = rate, f"3x3 conv {c} channels at {hw}x{hw}, {name}"
    return best, where


def step_flops(sd, latents: dict, cond, uncond, context, t) -> dict[int, tuple[int, int]]:
    """size -> FLOPs of one guided step as torchsd runs it (float32, its plain modules) and as diffusers'
    U-Net runs the CFG batch of 2 (OpenVINO's graph)."""
    theirs = diffusers_unet(sd, copy=True)
    denoise = classifier_free_guidance(sd.denoiser, cond, uncond, 7.5)
    return {size: (count_flops(lambda: denoise(x, torch.tensor(1.5))),
                   count_flops(lambda: theirs(torch.cat([x, x]), t, encoder_hidden_states=context)))
            for size, x in latents.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="for both (default: torch's, the core count)")
    p.add_argument("--ov-cache", default=None, metavar="DIR", help="as cpu_vs_openvino.py's")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    sizes = [int(s) for s in args.sizes.split(",")]
    try:
        import openvino  # noqa: F401

        from cpu_vs_openvino import openvino_call, openvino_compile, openvino_models
    except ImportError:
        openvino_models = None
    print(f"torch {torch.__version__}, {threads} threads; {load_note()}", flush=True)
    sd = build()
    cond, uncond = sd.encode_prompt([PROMPT]), sd.encode_prompt([NEGATIVE])
    context = torch.cat([uncond, cond])
    t = torch.tensor(500.0)
    latents = {size: torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(size))
               for size in sizes}
    flops = step_flops(sd, latents, cond, uncond, context, t)
    ov_models = {}
    if openvino_models is not None:
        from common import diffusers_pipeline

        tokenizer_dir = tempfile.mkdtemp(prefix="torchsd-bench-tok-")
        sd.tokenizer.save_pretrained(tokenizer_dir)
        pipe = diffusers_pipeline(sd, tokenizer_dir)
        ov_models = {size: openvino_models(pipe, size, args.ov_cache)[0] for size in sizes}
        del pipe
    rows = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        for model in (sd.unet, sd.vae, sd.text_encoder):
            model.to(dtype=dtype, memory_format=torch.contiguous_format)
        apply_runtime(sd, RuntimeOptions(), "cpu", dtype)
        denoise = classifier_free_guidance(sd.denoiser, cond.to(dtype), uncond.to(dtype), 7.5)
        for size in sizes:
            peak, where = peak_rate(dtype, size, args.reps)
            x, sigma = latents[size].to(dtype), torch.tensor(1.5)

            def ours():
                with torch.inference_mode(), sd.sampling_context():
                    denoise(x, sigma)

            steps = {"torchsd": ours}
            if size in ov_models:
                ov_step = openvino_call(openvino_compile(ov_models[size], dtype, threads)[0])
                steps["OpenVINO"] = lambda: ov_step(torch.cat([x, x]), t, context)
            for fn in steps.values():
                fn()  # warm-up
            # interleaved, plainly timed (no RSS sampling): the share of the peak is the point here
            calls = [[timed(fn, 1, warmup=False) for fn in steps.values()] for _ in range(args.reps)]
            times = {label: min(call[i] for call in calls) for i, label in enumerate(steps)}
            rows.append((name, size, flops[size], peak, where, times))
            print(f"  measured {name} {size}: {load_note()}", flush=True)
    print("\nseconds, GFLOP, GFLOP/s; 'share' = a rate as a share of the peak")
    for name, size, (ours_f, theirs_f), peak, where, best in rows:
        print(f"\n== {name} {size}x{size}: step {ours_f / 1e9:.1f} GFLOP as torchsd runs it, {theirs_f / 1e9:.1f} as "
              f"diffusers/OpenVINO run it")
        print(f"  peak {peak / 1e9:.0f} GFLOP/s ({where}); floor {ours_f / peak:.3f} s (torchsd's FLOPs), "
              f"{theirs_f / peak:.3f} s (OpenVINO's)")
        print(f"  torchsd  {best['torchsd']:.3f} s = {ours_f / best['torchsd'] / 1e9:.0f} GFLOP/s, share "
              f"{ours_f / best['torchsd'] / peak:.0%}")
        if "OpenVINO" in best:
            ov = best["OpenVINO"]
            print(f"  OpenVINO {ov:.3f} s = {theirs_f / ov / 1e9:.0f} GFLOP/s, share {theirs_f / ov / peak:.0%}")
            print(f"  0.9x OpenVINO = {0.9 * ov:.3f} s: torchsd's FLOPs in that time need "
                  f"{ours_f / (0.9 * ov) / 1e9:.0f} GFLOP/s, share {ours_f / (0.9 * ov) / peak:.0%}; ratio now "
                  f"{best['torchsd'] / ov:.2f}")


if __name__ == "__main__":
    main()
