"""torchsd against diffusers on this CPU, SD 1.5-size random weights shared by both in one process.

    PYTHONPATH=src python benchmarks/cpu_vs_diffusers.py                       # everything (long)
    PYTHONPATH=src python benchmarks/cpu_vs_diffusers.py --phases unet --sizes 256 --dtypes bf16

Phases (each prints torchsd and diffusers side by side, with the ratio torchsd / diffusers):
  text     the prompt and negative prompt through the text encoder, as each pipeline does it
  unet     one guided step: the U-Net on the batch of 2 (uncond + cond) and the guidance
  vae      VAE decode of one image
  e2e      whole text-to-image runs, 20 DDIM steps: same dtype against same dtype, then torchsd's
           defaults (``runtime.default_dtype``) against diffusers' defaults (float32), with the image
           agreement (PSNR of 8-bit images against torchsd float32)
  tiled    1024x1024 decode with VAE tiling (torchsd): peak memory, time, agreement with untiled
  batched  images/s of a batch of prompts in one U-Net call against one at a time (torchsd)

torchsd runs as the CLI and the server place it on a CPU: ``runtime.apply_runtime``, which swaps in
``accel.optimize``'s fast blocks. "Same precision" means same weight dtype on both sides; each side keeps
its own default layout (torchsd on CPU: NHWC VAE, NCHW U-Net, see runtime.py; diffusers: NCHW). Peak RSS
is sampled every 2 ms and given above the shared-weights baseline. The machine may be shared: the calls alternate
(A B A B …) and the minimum and median are both printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NEGATIVE, PROMPT, PeakRSS, build, compare, diffusers_pipeline, free, gib, load_note  # noqa: E402
from torchsd.accel import packed_weights  # noqa: E402
from torchsd.diffusion.denoisers import classifier_free_guidance  # noqa: E402
from torchsd.models.tiling import VAETiling  # noqa: E402
from torchsd.pipeline import autoencoding  # noqa: E402
from torchsd.runtime import RuntimeOptions, apply_runtime, default_dtype, wants_prepack  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def row(label: str, results: dict) -> None:
    ours, theirs = results["torchsd"], results["diffusers"]
    print(f"  {label:<28} torchsd {ours['min']:7.3f} s (median {ours['median']:7.3f})   "
          f"diffusers {theirs['min']:7.3f} s (median {theirs['median']:7.3f})   "
          f"ratio {ours['min'] / theirs['min']:.2f} (medians {ours['median'] / theirs['median']:.2f}, "
          f"CPU time {ours['cpu_min'] / theirs['cpu_min']:.2f})   "
          f"peak RSS +{gib(ours['peak_extra'])} vs +{gib(theirs['peak_extra'])}", flush=True)


def phase_text(sd, pipe, reps):
    def ours():
        sd.encode_prompt([PROMPT]), sd.encode_prompt([NEGATIVE])

    def theirs():
        pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)

    row("text encode (2 prompts)", compare({"torchsd": ours, "diffusers": theirs}, reps))


def phase_unet(sd, pipe, size, reps):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size // 8, size // 8, generator=gen)
    cond, uncond = sd.encode_prompt([PROMPT]), sd.encode_prompt([NEGATIVE])
    denoise = classifier_free_guidance(sd.denoiser, cond, uncond, 7.5)
    sigma = torch.tensor(1.5)
    context = torch.cat([uncond, cond]).to(pipe.unet.dtype)
    t = torch.tensor(500)
    scale = 7.5

    def theirs():
        latents = torch.cat([x, x]).to(pipe.unet.dtype)
        out = pipe.unet(latents, t, encoder_hidden_states=context).sample
        uncond_out, cond_out = out.chunk(2)
        return uncond_out + scale * (cond_out - uncond_out)

    # torchsd's steps run as ``StableDiffusion.sample`` runs them: inside the runtime's sampling context for
    # the whole loop (with --prepack the first call, a warm-up not counted, packs; the cost is reported below)
    with sd.sampling_context():
        row(f"guided U-Net step {size}x{size}", compare({"torchsd": lambda: denoise(x, sigma), "diffusers": theirs},
                                                        reps))
    if "prepack" in sd.sampling_hooks:
        packing_cost(sd, lambda: denoise(x, sigma))


def packing_cost(sd, step) -> None:
    """What a sampling loop pays once for packing: its first step against the next, and the unpacking."""
    with torch.inference_mode():
        with packed_weights(sd.unet):
            start = time.perf_counter()
            step()
            first = time.perf_counter() - start
            start = time.perf_counter()
            step()
            steady = time.perf_counter() - start
            packed = sum(1 for m in sd.unet.modules() if getattr(m, "packed", False))
            start = time.perf_counter()
        unpack = time.perf_counter() - start
    once = first - steady + unpack
    print(f"    once per sampling loop: packing {packed} convolutions adds {first - steady:.2f} s to the first step, "
          f"unpacking {unpack:.2f} s after the last ({once:.2f} s)", flush=True)


def phase_vae(sd, pipe, size, reps):
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))

    def theirs():
        return pipe.vae.decode(latents.to(pipe.vae.dtype)).sample.float()

    row(f"VAE decode {size}x{size}", compare({"torchsd": lambda: autoencoding.decode(sd.vae, latents),
                                               "diffusers": theirs}, reps))


def run_torchsd(sd, size, steps, noise):
    return sd.generate(PROMPT, NEGATIVE, steps=steps, width=size, height=size, guidance_scale=7.5, seed=0,
                       latents=noise)


def run_diffusers(pipe, size, steps, noise):
    import numpy as np
    from PIL import Image

    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=size, width=size,
               guidance_scale=7.5, latents=noise.to(pipe.unet.dtype), output_type="np")
    return Image.fromarray((np.clip(out.images[0], 0, 1) * 255).round().astype("uint8"))


def psnr(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def phase_e2e(sd, pipe, size, steps, reps, label):
    """Returns torchsd's image and seconds (the first rep's image)."""
    noise = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(42))
    images = {}

    def ours():
        images["torchsd"] = run_torchsd(sd, size, steps, noise).images[0]

    def theirs():
        images["diffusers"] = run_diffusers(pipe, size, steps, noise)

    fns = {"torchsd": ours} if pipe is None else {"torchsd": ours, "diffusers": theirs}
    results = compare(fns, reps, warmup=0)
    if pipe is not None:
        row(f"end to end {label}", results)
        print(f"    image agreement torchsd vs diffusers: PSNR {psnr(images['torchsd'], images['diffusers']):.1f} dB",
              flush=True)
    return images, results


def phase_tiled(sd, size, check_untiled: bool):
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(3))
    tiling = VAETiling()
    with torch.inference_mode(), PeakRSS() as mem:
        start = time.perf_counter()
        tiled = autoencoding.decode(sd.vae, latents, tiling=tiling)
        seconds = time.perf_counter() - start
    print(f"  tiled decode {size}x{size} ({tiling.tile_size}px tiles, {tiling.overlap}px overlap, "
          f"{next(sd.vae.parameters()).dtype}): {seconds:.2f} s, "
          f"peak RSS {gib(mem.peak)} (+{gib(mem.extra)} above the weights)", flush=True)
    if check_untiled:
        with torch.inference_mode(), PeakRSS() as mem:
            start = time.perf_counter()
            whole = autoencoding.decode(sd.vae, latents)
            seconds = time.perf_counter() - start
        a, b = ((x.clamp(-1, 1) + 1) * 127.5 for x in (tiled, whole))
        mse = (a - b).pow(2).mean()
        print(f"  untiled decode {size}x{size}: {seconds:.2f} s, peak RSS {gib(mem.peak)} (+{gib(mem.extra)}); "
              f"tiled vs untiled PSNR {float(10 * torch.log10(255 ** 2 / mse)):.1f} dB, "
              f"max abs diff {float((tiled - whole).abs().max()):.3f} of [-1, 1]", flush=True)


def phase_batched(sd, size, steps, count):
    from torchsd.pipeline import GenerationRequest
    from torchsd.pipeline.batch import generate_batch

    requests = [GenerationRequest(prompt=f"{PROMPT}, variation {i}", negative_prompt=NEGATIVE, steps=steps,
                                  width=size, height=size, seed=i) for i in range(count)]
    with torch.inference_mode():
        start = time.perf_counter()
        generate_batch(sd, requests)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        for request in requests:
            sd.generate(request)
        single = time.perf_counter() - start
    print(f"  {count} images {size}x{size}, {steps} steps: batched {count / batched:.3f} images/s ({batched:.1f} s), "
          f"one at a time {count / single:.3f} images/s ({single:.1f} s), speed-up {single / batched:.2f}x",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="text,unet,vae,e2e,tiled,batched")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--sizes", default="256,512", help="for the unet and vae phases")
    p.add_argument("--e2e-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--e2e-reps", type=int, default=1)
    p.add_argument("--tiled-size", type=int, default=1024)
    p.add_argument("--untiled-too", action="store_true", help="tiled phase: also decode untiled and compare")
    p.add_argument("--batch-count", type=int, default=4)
    p.add_argument("--batch-steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prepack", action="store_true",
                   help="torchsd with RuntimeOptions(prepack=True): conv weights packed while sampling")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    phases = set(args.phases.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    import diffusers

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads, "
          f"CPU default dtype {default_dtype('cpu')}; {load_note()}", flush=True)
    sd = build()
    tokenizer_dir = tempfile.mkdtemp(prefix="torchsd-bench-tok-")
    sd.tokenizer.save_pretrained(tokenizer_dir)
    reference_image = None
    for dtype in dtypes:
        for model in (sd.unet, sd.vae, sd.text_encoder):
            model.to(dtype=dtype, memory_format=torch.contiguous_format)
        free()
        options = RuntimeOptions(prepack=args.prepack)
        # built before torchsd's layout change: NCHW, shared (the U-Net copied where torchsd packs)
        pipe = diffusers_pipeline(sd, tokenizer_dir, copy_unet=wants_prepack(options, torch.device("cpu")))
        apply_runtime(sd, options, "cpu", dtype)  # torchsd's defaults for this dtype
        layout = "U-Net {}, VAE {}".format(*("NHWC" if m.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
                                             else "NCHW" for m in (sd.unet, sd.vae.decoder)))
        packed = ", U-Net convolutions packed while sampling" if "prepack" in sd.sampling_hooks else ""
        print(f"\n== {str(dtype).removeprefix('torch.')} (torchsd {layout}{packed}, diffusers NCHW) ; {load_note()}",
              flush=True)
        if "text" in phases:
            phase_text(sd, pipe, args.reps)
        for size in sizes:
            if "unet" in phases:
                phase_unet(sd, pipe, size, args.reps)
            if "vae" in phases:
                phase_vae(sd, pipe, size, args.reps)
        if "e2e" in phases:
            images, results = phase_e2e(sd, pipe, args.e2e_size, args.steps, args.e2e_reps,
                                        f"{args.e2e_size}px {args.steps} steps")
            if dtype == torch.float32:
                reference_image, diffusers_default = images["torchsd"], results["diffusers"]
            if dtype == default_dtype("cpu") and reference_image is not None:
                ours = results["torchsd"]
                print(f"  DEFAULTS: torchsd ({str(dtype).removeprefix('torch.')}, {layout}) {ours['min']:.2f} s vs "
                      f"diffusers (float32) {diffusers_default['min']:.2f} s: ratio "
                      f"{ours['min'] / diffusers_default['min']:.2f}; image PSNR vs torchsd fp32 "
                      f"{psnr(images['torchsd'], reference_image):.1f} dB", flush=True)
        del pipe
        free()
    if "tiled" in phases or "batched" in phases:
        dtype = default_dtype("cpu")
        apply_runtime(sd, RuntimeOptions(prepack=args.prepack), "cpu", dtype)
        packed = ", packed while sampling" if "prepack" in sd.sampling_hooks else ""
        print(f"\n== torchsd defaults ({str(dtype).removeprefix('torch.')}{packed}) ; {load_note()}", flush=True)
        if "tiled" in phases:
            phase_tiled(sd, args.tiled_size, args.untiled_too)
        if "batched" in phases:
            phase_batched(sd, args.e2e_size, args.batch_steps, args.batch_count)


if __name__ == "__main__":
    main()
