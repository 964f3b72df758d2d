"""torchsd against OpenVINO on this CPU, SD 1.5-size random weights, in one process (issue 24).

    PYTHONPATH=src python benchmarks/cpu_vs_openvino.py --sizes 256,512 --dtypes fp32,bf16
    PYTHONPATH=src python benchmarks/cpu_vs_openvino.py --sizes 256 --dtypes fp32 --compile   # torchsd via Inductor

OpenVINO is a benchmark-only dependency (``pip install openvino``); it is what FastSD CPU and optimum-intel
run Stable Diffusion on. It converts diffusers' ``UNet2DConditionModel`` and its VAE decoder, built from
the *same* weights as torchsd's networks (``common.diffusers_pipeline``), with ``openvino.convert_model``
and example inputs, reshaped to the benchmark's static shapes and compiled for the CPU with the inference
precision hint f32 or bf16, one stream, the same thread count as torchsd (``--threads``; default torch's).

torchsd runs as the CLI and the server place it on a CPU (``runtime.apply_runtime``: ``accel.optimize``'s
fast blocks), in float32 or with bfloat16 weights; with ``--compile``, its U-Net also goes through Inductor
with frozen weights (``runtime.compile_unet(freeze=True)``, as ``RuntimeOptions(compile=..., freeze=True)``),
timed beside the eager one. "Same precision": torchsd's weights in the dtype,
OpenVINO's f32 model compiled with that inference precision.

Phases (each line: torchsd and OpenVINO, min and median of interleaved calls, the ratio torchsd / OpenVINO):
  unet   one guided step: the U-Net on the CFG batch of 2 (uncond + cond) and the guidance
  vae    VAE decode of one image
Then the outputs: max |difference| of the U-Net's output (batch 2, t=500) and of the decoded image, torchsd
against OpenVINO at each precision, and torchsd float32 against diffusers float32 (the same model in eager
PyTorch: the check that torchsd computes the same function).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NEGATIVE, PROMPT, build, compare, diffusers_pipeline, free, gib, load_note  # noqa: E402
from torchsd.diffusion.denoisers import classifier_free_guidance  # noqa: E402
from torchsd.pipeline import autoencoding  # noqa: E402
from torchsd.runtime import RuntimeOptions, apply_runtime, compile_unet  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OV_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}


class _UNetCall(torch.nn.Module):
    """diffusers' U-Net as a plain (sample, timestep, context) -> tensor function for convert_model."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


class _DecoderCall(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def openvino_models(pipe, size: int, cache: str | None = None):
    """diffusers' U-Net and VAE decoder converted to OpenVINO models, static shapes for ``size``; seconds.
    With ``cache`` (a folder) the converted models are saved there (float32) and read back next time."""
    import openvino as ov

    h = size // 8
    start = time.perf_counter()
    paths = [Path(cache) / f"{name}-{size}.xml" for name in ("unet", "vae")] if cache else []
    if paths and all(path.exists() for path in paths):
        return (*(ov.Core().read_model(path) for path in paths), time.perf_counter() - start)
    with torch.no_grad():
        unet = ov.convert_model(_UNetCall(pipe.unet), example_input=(torch.randn(2, 4, h, h), torch.tensor(500.0),
                                                                     torch.randn(2, 77, 768)))
        shapes = ([2, 4, h, h], [], [2, 77, 768])
        unet.reshape({port: ov.PartialShape(shape) for port, shape in zip(unet.inputs, shapes)})
        vae = ov.convert_model(_DecoderCall(pipe.vae), example_input=(torch.randn(1, 4, h, h),))
        vae.reshape({vae.inputs[0]: ov.PartialShape([1, 4, h, h])})
    for model, path in zip((unet, vae), paths):
        ov.save_model(model, path, compress_to_fp16=False)
    return unet, vae, time.perf_counter() - start


def openvino_compile(model, dtype: torch.dtype, threads: int, **extra):
    """``extra``: more of OpenVINO's CPU properties (``PERF_COUNT=True`` for its per-node profile)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[dtype], "INFERENCE_NUM_THREADS": threads,
              "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", **extra}
    start = time.perf_counter()
    compiled = ov.Core().compile_model(model, "CPU", config)
    return compiled, time.perf_counter() - start


def openvino_call(compiled):
    """A function of torch tensors (float32 in, float32 out) running one infer request of ``compiled``."""
    request = compiled.create_infer_request()

    def call(*inputs):
        request.infer([t.float().numpy() for t in inputs])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return call


def row(label: str, results: dict, other: str = "OpenVINO") -> float:
    ours, theirs = results["torchsd"], results[other]
    ratio = ours["median"] / theirs["median"]
    print(f"  {label:<30} torchsd {ours['min']:7.3f} s (median {ours['median']:7.3f})   "
          f"{other} {theirs['min']:7.3f} s (median {theirs['median']:7.3f})   "
          f"ratio {ratio:.2f} (mins {ours['min'] / theirs['min']:.2f}, "
          f"CPU time {ours['cpu_min'] / theirs['cpu_min']:.2f})"
          f"   peak RSS +{gib(ours['peak_extra'])} vs +{gib(theirs['peak_extra'])}", flush=True)
    return ratio


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.float(), b.float()
    return f"{float((a - b).abs().max()):.2e} (output max |x| {float(b.abs().max()):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="unet,vae")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="for both (default: torch's, the core count)")
    p.add_argument("--compile", action="store_true",
                   help="torchsd's U-Net through Inductor with frozen weights (runtime.compile_unet(freeze=True); "
                        "compiled once per shape, cached on disk); the eager U-Net is timed beside it")
    p.add_argument("--prepack", action="store_true",
                   help="torchsd with RuntimeOptions(prepack=True): U-Net conv weights packed once per sampling loop "
                        "(the warm-up call packs; OpenVINO's compile_model packs its own, also outside the timing)")
    p.add_argument("--ov-cache", default=None, metavar="DIR",
                   help="save OpenVINO's converted models here and read them back next time (same seed: same weights)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    phases = set(args.phases.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    import diffusers
    import openvino as ov

    print(f"torch {torch.__version__}, OpenVINO {ov.__version__}, diffusers {diffusers.__version__}, {threads} threads "
          f"for both; {load_note()}", flush=True)
    sd = build()
    tokenizer_dir = tempfile.mkdtemp(prefix="torchsd-bench-tok-")
    sd.tokenizer.save_pretrained(tokenizer_dir)
    # float32 and kept so: OpenVINO's source and the reference (its own U-Net copy with --prepack, which leaves
    # shared weights alone)
    pipe = diffusers_pipeline(sd, tokenizer_dir, copy_unet=args.prepack)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = sd.encode_prompt([PROMPT]), sd.encode_prompt([NEGATIVE])
    context = torch.cat([uncond, cond])
    summary = []
    inputs = {}
    for size in sizes:  # converted once per size from the float32 weights, before torchsd changes dtype
        ov_unet, ov_vae, convert_s = openvino_models(pipe, size, args.ov_cache)
        print(f"{size}x{size}: OpenVINO convert_model (U-Net and decoder) {convert_s:.1f} s"
              + (f" (or read from {args.ov_cache})" if args.ov_cache else ""), flush=True)
        x = torch.randn(1, 4, size // 8, size // 8, generator=gen)
        latents = torch.randn(1, 4, size // 8, size // 8, generator=gen)
        with torch.inference_mode():  # diffusers float32: the reference outputs
            ref_unet = pipe.unet(torch.cat([x, x]), torch.tensor(500.0), encoder_hidden_states=context).sample
            ref_vae = pipe.vae.decode(latents).sample
        inputs[size] = (ov_unet, ov_vae, x, latents, ref_unet, ref_vae)
    t = torch.tensor(500.0)
    for dtype in sorted(dtypes, key=lambda d: d != torch.float32):  # float32 first: no round trip through bf16
        name = str(dtype).removeprefix("torch.")
        for model in (sd.unet, sd.vae, sd.text_encoder):
            model.to(dtype=dtype, memory_format=torch.contiguous_format)
        free()
        apply_runtime(sd, RuntimeOptions(prepack=args.prepack), "cpu", dtype)
        unet = sd.unet
        if args.compile:
            unet = compile_unet(sd.unet, "default", freeze=True)
            sd.denoiser.unet = unet
            eager_denoiser = copy.copy(sd.denoiser)
            eager_denoiser.unet = sd.unet
        for size in sizes:
            ov_unet, ov_vae, x, latents, ref_unet, ref_vae = inputs[size]
            packed = ", U-Net convolutions packed while sampling" if "prepack" in sd.sampling_hooks else ""
            print(f"\n== {name} {size}x{size}{packed} ; {load_note()}", flush=True)
            if "unet" in phases:
                compiled, compile_s = openvino_compile(ov_unet, dtype, threads)
                ov_step = openvino_call(compiled)
                c = context.to(dtype)
                denoise = classifier_free_guidance(sd.denoiser, cond.to(dtype), uncond.to(dtype), 7.5)
                sigma = torch.tensor(1.5)

                def theirs():
                    out = ov_step(torch.cat([x, x]), t, context)
                    u, k = out.chunk(2)
                    return u + 7.5 * (k - u)

                with torch.inference_mode():
                    start = time.perf_counter()
                    with sd.sampling_context():
                        ours_out = unet(x.to(dtype), t.reshape(1), c)
                    first = time.perf_counter() - start
                    ov_out = ov_step(torch.cat([x, x]), t, context)
                print(f"  OpenVINO compile_model {compile_s:.1f} s; torchsd first U-Net call {first:.1f} s"
                      + (" (compiles, or loads the cached compile)" if args.compile else ""), flush=True)
                fns = {"torchsd": lambda: denoise(x, sigma), "OpenVINO": theirs}
                if args.compile:  # the eager U-Net interleaved too
                    eager = classifier_free_guidance(eager_denoiser, cond.to(dtype), uncond.to(dtype), 7.5)
                    fns["eager"] = lambda: eager(x, sigma)
                with sd.sampling_context():
                    results = compare(fns, args.reps)
                ratio = row(f"guided U-Net step {size}x{size}", results)
                if args.compile:
                    e = results["eager"]
                    print(f"    torchsd eager (no --compile) {e['min']:7.3f} s (median {e['median']:7.3f}): ratio to "
                          f"OpenVINO {e['median'] / results['OpenVINO']['median']:.2f}, compiled / eager "
                          f"{results['torchsd']['median'] / e['median']:.2f}", flush=True)
                summary.append((f"U-Net step {size} {name}" + (" compiled" if args.compile else ""), ratio))
                print(f"    U-Net output max |diff|: torchsd vs OpenVINO {max_diff(ours_out, ov_out)}; "
                      f"torchsd vs diffusers fp32 {max_diff(ours_out, ref_unet)}; "
                      f"OpenVINO vs diffusers fp32 {max_diff(ov_out, ref_unet)}", flush=True)
                del compiled, ov_step
                free()
            if "vae" in phases:
                compiled, compile_s = openvino_compile(ov_vae, dtype, threads)
                ov_decode = openvino_call(compiled)
                with torch.inference_mode():
                    ours_out = autoencoding.decode(sd.vae, latents)
                    ov_out = ov_decode(latents)
                results = compare({"torchsd": lambda: autoencoding.decode(sd.vae, latents),
                                   "OpenVINO": lambda: ov_decode(latents)}, args.reps)
                ratio = row(f"VAE decode {size}x{size}", results)
                summary.append((f"VAE decode {size} {name}", ratio))
                print(f"    image max |diff|: torchsd vs OpenVINO {max_diff(ours_out, ov_out)}; "
                      f"torchsd vs diffusers fp32 {max_diff(ours_out, ref_vae)}; "
                      f"OpenVINO vs diffusers fp32 {max_diff(ov_out, ref_vae)}", flush=True)
                del compiled, ov_decode
                free()
        if args.compile:
            sd.denoiser.unet = sd.unet
    print(f"\nratios torchsd / OpenVINO (medians; goal <= 0.9 for the U-Net step) ; {load_note()}")
    for label, ratio in summary:
        print(f"  {label:<24} {ratio:.2f}" + ("  goal met" if label.startswith("U-Net") and ratio <= 0.9 else ""))


if __name__ == "__main__":
    main()
