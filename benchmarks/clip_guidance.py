"""Does CLIP guidance help, and what does it cost? Prints figures; asserts nothing.

Over N prompts x fixed seeds, each setting generates the same images and reports:
  - the mean CLIP similarity (cosine, CLIP's own centre-crop view of the final image) to the prompt, and how
    many images gained over the unguided run of the same prompt and seed;
  - seconds per sampling step (steps 2..n, device synchronised; on CPU also the process's CPU seconds, which
    a busy machine does not inflate) and the peak memory of a generate call (CUDA: peak allocated over the
    start; CPU: peak resident set over the start, via /proc VmHWM, with glibc set to hand freed blocks back
    at once so that the resident set follows the live tensors).
Then the decoder alone: one decode + backward of a latent batch with the full VAE decoder, with and without
gradient checkpointing, and with the fitted linear latent->RGB map (and how well that map fits: R^2).

The similarity is measured by the guiding CLIP unless --eval-clip names another: guidance can overfit the
CLIP that steers it, so a second CLIP is the fairer judge when one exists.

  tiny random models (CPU, seconds):   python benchmarks/clip_guidance.py
  a real model and CLIP:               python benchmarks/clip_guidance.py --model MODEL --clip CLIP \\
                                           --steps 30 --device cuda --dtype fp16
  the bundled model with its own CLIP: python benchmarks/clip_guidance.py --model bundled --clip own
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from torchsd import StableDiffusion, load_pipeline  # noqa: E402
from torchsd.accel import optimize  # noqa: E402
from torchsd.checkpoints.clip import load_clip  # noqa: E402
from torchsd.config import ModelConfig  # noqa: E402
from torchsd.diffusion.clip_guidance import LinearLatentDecoder, vae_decoder  # noqa: E402
from torchsd.models.clip import CLIP  # noqa: E402

PROMPTS = [
    "a red circle on a blue background", "a green square in the top left corner", "a yellow triangle on black",
    "two blue circles side by side", "a small purple star in the centre", "a large orange square on white",
    "a pink heart on a grey background", "three red dots in a row", "a black circle inside a white square",
    "a green triangle pointing down", "a blue square at the bottom right", "a red star on a yellow background",
    "a white circle on a dark blue background", "an orange triangle and a blue circle", "a cyan square on red",
    "a smiling face emoji", "a red apple", "a yellow sun in a blue sky", "a green tree on a white background",
    "a blue fish", "a brown dog", "a black cat on a white background", "a red car", "a snowman",
]


# --- models --------------------------------------------------------------------------------------

def tiny_random_pipeline(seed: int = 0) -> StableDiffusion:
    sd = StableDiffusion.from_config(ModelConfig.tiny(), seed=seed, name="tiny-random")
    _perturb([sd.unet, sd.vae, sd.text_encoder], seed)
    return sd


def tiny_random_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    clip = CLIP(*CLIP.tiny_configs()).eval().requires_grad_(False)
    _perturb([clip], seed)
    return clip


def _perturb(modules, seed: int) -> None:
    # random init leaves zero-initialised layers; perturb so that no path is trivially zero
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def load_models(args) -> tuple[StableDiffusion, CLIP, CLIP]:
    if args.model == "tiny":
        sd = tiny_random_pipeline()
    else:
        sd = load_pipeline(None if args.model == "bundled" else args.model, dtype=torch.float32)
    sd.to(args.device, args.dtype)
    for network in (sd.unet, sd.vae, sd.text_encoder):  # the CPU speed-ups, as the CLI's runtime applies them
        optimize(network, args.device, args.dtype)
    if args.clip == "tiny":
        sd.clip = tiny_random_clip()
    elif args.clip != "own":
        sd.clip = load_clip(args.clip)
    if sd.clip is None:
        raise SystemExit("--clip own: this model has no CLIP of its own; pass --clip PATH")
    sd.clip.to(args.device, args.dtype)
    judge = sd.clip if args.eval_clip is None else load_clip(args.eval_clip, device=args.device, dtype=args.dtype)
    return sd, sd.clip, judge


# --- measuring -----------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory above the level at ``start``: CUDA allocations, or the process's resident set on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base = _proc_status("VmRSS")

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        return (_proc_status("VmHWM") - self.base) / 2 ** 20


def _proc_status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def similarity(judge: CLIP, sd: StableDiffusion, latents: torch.Tensor, prompt: str) -> float:
    images = sd.decode_latents(latents).clamp(-1, 1)
    ids = torch.tensor([sd.tokenizer.pad(sd.tokenizer.encode(prompt), judge.text.config.max_positions)],
                       device=sd.device)
    dtype = judge.visual_projection.weight.dtype
    image = judge.encode_image(judge.preprocess(images).to(dtype)).float()
    return F.cosine_similarity(image, judge.encode_text(ids).float()).item()


def run_setting(sd, judge, prompts, seeds, args, **clip_options) -> dict:
    memory = PeakMemory(sd.device)
    sims, step_times, cpu_times, peaks = [], [], [], []
    for prompt, seed in zip(prompts, seeds):
        stamps, cpu_stamps = [], []

        def on_step(step, stamps=stamps, cpu_stamps=cpu_stamps):
            synchronize(sd.device)
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

        memory.start()
        result = sd.generate(prompt, steps=args.steps, seed=seed, sampler=args.sampler, guidance_scale=args.cfg,
                             width=args.size, height=args.size, callback=on_step, **clip_options)
        peaks.append(memory.peak_mib())
        if len(stamps) > 1:  # the first step also pays for warm-up: time steps 2..n
            step_times.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
            cpu_times.append((cpu_stamps[-1] - cpu_stamps[0]) / (len(stamps) - 1))
        sims.append(similarity(judge, sd, result.latents, prompt))
    nan = float("nan")
    return {"sims": sims, "step_s": statistics.median(step_times) if step_times else nan,
            "cpu_step_s": statistics.median(cpu_times) if cpu_times else nan, "peak_mib": max(peaks)}


def decoder_costs(sd: StableDiffusion, args) -> list[tuple[str, float, float]]:
    """Seconds and peak MiB of one decode + backward of a batch of latents, per decoder."""
    f = sd.config.vae.downscale_factor
    latents = torch.randn(args.decoder_batch, sd.config.vae.latent_channels, args.size // f, args.size // f,
                          generator=torch.Generator().manual_seed(0)).to(sd.device)
    scaling = sd.config.vae.scaling_factor
    linear, r2 = LinearLatentDecoder.fit(sd.vae, scaling)
    decoders = [("vae, checkpointed", vae_decoder(sd.vae, scaling, checkpoint=True)),
                ("vae, no checkpointing", vae_decoder(sd.vae, scaling, checkpoint=False)),
                (f"linear (fit R^2 {r2:.3f})", linear)]
    memory, rows = PeakMemory(sd.device), []
    for name, decode in decoders:
        times, cpu_times = [], []
        for _ in range(args.decoder_repeats + 1):  # the first is warm-up
            x = latents.clone().requires_grad_(True)
            memory.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            torch.autograd.grad(decode(x).square().mean(), x)
            synchronize(sd.device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        rows.append((name, statistics.median(times[1:]), statistics.median(cpu_times[1:]), memory.peak_mib()))
    return rows


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random), 'bundled', or a model path")
    p.add_argument("--clip", default="tiny", help="'tiny' (random), 'own' (the model's), or a CLIP path")
    p.add_argument("--eval-clip", default=None, help="a second CLIP to judge similarity (default: the guiding one)")
    p.add_argument("--prompts", type=int, default=20, help="how many of the built-in prompts (max %d)" % len(PROMPTS))
    p.add_argument("--prompts-file", type=Path, default=None, help="one prompt a line, instead of the built-in ones")
    p.add_argument("--seed", type=int, default=1000, help="prompt i uses seed + i")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--scales", type=float, nargs="+", default=None,
                   help="CLIP guidance scales to try (default: 1e4 for the tiny random CLIP, whose towers respond "
                        "weakly to pixels; 100 and 1000 for a real one)")
    p.add_argument("--cutouts", type=int, default=4)
    p.add_argument("--decoders", nargs="+", default=["vae", "linear"], choices=["vae", "linear"])
    p.add_argument("--decoder-batch", type=int, default=4, help="latents per decode in the decoder section")
    p.add_argument("--decoder-repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # big blocks straight from and back to the OS: the resident set then tracks live tensors
        os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execv(sys.executable, [sys.executable, *sys.argv])
    args.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    sd, clip, judge = load_models(args)
    args.scales = args.scales or ([1e4] if args.clip == "tiny" else [100, 1000])
    args.size = args.size or sd.config.sample_size
    prompts = args.prompts_file.read_text().splitlines() if args.prompts_file else PROMPTS[:args.prompts]
    prompts = [line for line in prompts if line.strip()]
    seeds = [args.seed + i for i in range(len(prompts))]
    device_name = torch.cuda.get_device_name(sd.device) if sd.device.type == "cuda" else "CPU"
    print(f"model {args.model} | CLIP {args.clip} | judge {args.eval_clip or 'the guiding CLIP'} | {device_name} "
          f"{str(args.dtype).removeprefix('torch.')} | {len(prompts)} prompts, seeds {seeds[0]}..{seeds[-1]} | "
          f"{args.sampler}, {args.steps} steps, CFG {args.cfg}, {args.size}x{args.size}, {args.cutouts} cut-outs")

    base = run_setting(sd, judge, prompts, seeds, args)
    print(f"\n{'setting':<28} {'mean sim':>9} {'gain':>9} {'improved':>9} {'s/step':>8} {'cpu s/step':>10} "
          f"{'peak MiB':>9}")
    print(f"{'no CLIP guidance':<28} {statistics.mean(base['sims']):9.4f} {'':>9} {'':>9} "
          f"{base['step_s']:8.4f} {base['cpu_step_s']:10.4f} {base['peak_mib']:9.1f}")
    for scale in args.scales:
        for decoder in args.decoders:
            res = run_setting(sd, judge, prompts, seeds, args, clip_guidance_scale=scale, clip_cutouts=args.cutouts,
                              clip_decoder=decoder)
            gains = [g - b for g, b in zip(res["sims"], base["sims"])]
            improved = sum(g > 0 for g in gains)
            print(f"{f'scale {scale:g}, {decoder}':<28} {statistics.mean(res['sims']):9.4f} "
                  f"{statistics.mean(gains):+9.4f} {f'{improved}/{len(gains)}':>9} {res['step_s']:8.4f} "
                  f"{res['cpu_step_s']:10.4f} {res['peak_mib']:9.1f}")

    print(f"\ndecoder alone: decode + backward of {args.decoder_batch} latents for {args.size}x{args.size} images")
    print(f"{'decoder':<28} {'seconds':>9} {'cpu s':>9} {'peak MiB':>9}")
    for name, seconds, cpu_seconds, peak in decoder_costs(sd, args):
        print(f"{name:<28} {seconds:9.4f} {cpu_seconds:9.4f} {peak:9.1f}")


if __name__ == "__main__":
    main()
