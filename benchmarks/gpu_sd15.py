"""SD 1.5 on one GPU: 512x512, batch 1, classifier-free guidance, 50 steps; torchsd's options one by
one against diffusers in the same run, on the same (random, SD 1.5-size) weights.

    PYTHONPATH=src python benchmarks/gpu_sd15.py                      # the default set, fp16 and bf16
    PYTHONPATH=src python benchmarks/gpu_sd15.py --configs eager,channels_last,cudagraph --dtypes fp16
    PYTHONPATH=src python benchmarks/gpu_sd15.py --tiny               # tiny model on CPU: checks the script

Each config is a set of explicit options (``+`` joins several):
  eager              SDPA (PyTorch picks the kernel), NCHW
  channels_last      NHWC convolutions
  sdpa=BACKEND       force one SDPA kernel: flash, efficient, cudnn, math
  compile=MODE       torch.compile the U-Net: default, max-autotune-no-cudagraphs, reduce-overhead,
                     max-autotune; add "fullgraph" to require one graph
  cudagraph          capture the U-Net step in a CUDA graph and replay it (static shapes)
  diffusers          the diffusers pipeline, eager SDPA (the baseline); "diffusers+compile" compiles its U-Net

Printed per config: it/s of the denoising loop (CUDA events between the first and last step, so
launch-bound configs are measured as they run), end-to-end seconds (text encode + loop + decode),
peak memory allocated, warm-up seconds (compilation, capture), and the image agreement with torchsd
eager in the same dtype (PSNR of 8-bit images; max |latent difference|).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NEGATIVE, PROMPT, diffusers_pipeline  # noqa: E402
from torchsd.config import ModelConfig  # noqa: E402
from torchsd.diffusion.denoisers import classifier_free_guidance  # noqa: E402
from torchsd.diffusion.samplers import build_sigmas, get_sampler, initial_noise_scale  # noqa: E402
from torchsd.pipeline import StableDiffusion  # noqa: E402
from torchsd.runtime import CUDAGraphUNet, RuntimeOptions, apply_runtime  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_CONFIGS = ("eager,diffusers,channels_last,sdpa=flash,sdpa=efficient,sdpa=cudnn,cudagraph,"
                   "channels_last+cudagraph,compile=default,channels_last+compile=max-autotune-no-cudagraphs,"
                   "channels_last+compile=max-autotune-no-cudagraphs+cudagraph,channels_last+compile=reduce-overhead")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    diffusers: bool = False
    channels_last: bool = False
    sdpa: str | None = None
    compile: str | None = None
    fullgraph: bool = False
    cudagraph: bool = False

    @classmethod
    def parse(cls, text: str) -> "Config":
        fields: dict = {"name": text}
        for part in text.split("+"):
            key, _, value = part.partition("=")
            if key == "diffusers":
                fields["diffusers"] = True
            elif key == "eager":
                pass
            elif key == "channels_last":
                fields["channels_last"] = True
            elif key == "sdpa" and value in ("flash", "efficient", "cudnn", "math"):
                fields["sdpa"] = value
            elif key == "compile":
                fields["compile"] = value or "default"
            elif key == "fullgraph":
                fields["fullgraph"] = True
            elif key == "cudagraph":
                fields["cudagraph"] = True
            else:
                raise SystemExit(f"unknown config part {part!r} in {text!r}; see --help")
        return cls(**fields)


def build(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StableDiffusion:
    """Random SD-size weights made directly on the device with each layer's default initialisation."""
    from torchsd.models.clip import CLIPTextModel
    from torchsd.models.unet import UNet
    from torchsd.models.vae import AutoencoderKL
    from torchsd.text.tokenizer import CLIPTokenizer

    torch.manual_seed(seed)
    with torch.device("meta"):
        networks = UNet(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text)
    for network in networks:
        network.to_empty(device=device)
        with torch.no_grad():
            for module in network.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        network.to(dtype)
    return StableDiffusion(config, *networks, CLIPTokenizer(pad_token_id=config.text.pad_token_id), name="random")


def sdpa_context(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend])


class StepClock:
    """Marks the end of each step: CUDA events on a GPU (no host sync), wall-clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def steps_per_second(self) -> float:
        """Steps between the first and the last mark (the first step, with any lazy set-up, excluded)."""
        if len(self.marks) < 2:
            return float("nan")
        if self.cuda:
            torch.cuda.synchronize()
            seconds = self.marks[0].elapsed_time(self.marks[-1]) / 1000
        else:
            seconds = self.marks[-1] - self.marks[0]
        return (len(self.marks) - 1) / seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def configure(sd: StableDiffusion, cfg: Config, device: torch.device, dtype: torch.dtype) -> None:
    sd.denoiser.unet = sd.unet
    apply_runtime(sd, RuntimeOptions(channels_last=cfg.channels_last, compile=cfg.compile,
                                     compile_fullgraph=cfg.fullgraph), device, dtype)
    if cfg.cudagraph:
        sd.denoiser.unet = CUDAGraphUNet(sd.denoiser.unet)


def torchsd_run(sd: StableDiffusion, size: int, steps: int, noise: torch.Tensor, device: torch.device):
    """Text encode, the DDIM loop (clocked per step) and the decode: what ``sd.generate`` does, with a clock."""
    clock = StepClock(device)
    with torch.inference_mode():
        cond, uncond = sd.encode_prompt([PROMPT]), sd.encode_prompt([NEGATIVE])
        spec = get_sampler("ddim")
        sigmas = build_sigmas(sd.config.schedule, steps, spec)
        guided = classifier_free_guidance(sd.denoiser, cond, uncond, 7.5)

        def denoise(x, sigma):
            x0 = guided(x, sigma)
            clock.mark()
            return x0

        x = noise.to(device) * initial_noise_scale(sigmas, spec)
        x = spec.function(denoise, x, sigmas.to("cpu", torch.float32))
        latents = x / (1 + sigmas[-1].item() ** 2) ** 0.5
        images = sd.decode_latents(latents)
    return images, latents, clock


def diffusers_run(pipe, size: int, steps: int, noise: torch.Tensor, device: torch.device):
    clock = StepClock(device)

    def on_step(pipe_, i, t, kwargs):
        clock.mark()
        return kwargs

    with torch.inference_mode():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=size, width=size,
                   guidance_scale=7.5, latents=noise.to(device, pipe.unet.dtype), output_type="pt",
                   callback_on_step_end=on_step)
    images = out.images.float() * 2 - 1  # diffusers returns [0, 1]
    return images, None, clock


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    a8, b8 = (((x.float().clamp(-1, 1) + 1) * 127.5).round() for x in (a, b))
    mse = (a8 - b8).pow(2).mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(255 ** 2 / mse))


def measure(run, device: torch.device, warmups: int, reps: int) -> dict:
    start = time.perf_counter()
    for _ in range(warmups):
        run()
    sync(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = None
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        images, latents, clock = run()
        sync(device)
        seconds = time.perf_counter() - start
        its = clock.steps_per_second()
        if best is None or its > best["its"]:
            best = {"its": its, "seconds": seconds, "images": images, "latents": latents}
    best["warmup"] = warmup_seconds
    best["peak"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--reps", type=int, default=2, help="timed runs per config (the best is kept)")
    p.add_argument("--warmups", type=int, default=1, help="untimed runs first (compilation happens here)")
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny model, 64x64, 4 steps, on the CPU unless --device")
    args = p.parse_args()
    if args.tiny:
        model_config, args.size, args.steps = ModelConfig.tiny(), 64, 4
        device = torch.device(args.device or "cpu")
    else:
        model_config = ModelConfig.sd15()
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = [Config.parse(c) for c in args.configs.split(",") if c]
    if device.type != "cuda":
        skipped = [c.name for c in configs if c.cudagraph or (c.sdpa not in (None, "math"))]
        configs = [c for c in configs if c.name not in skipped]
        if skipped:
            print(f"(no CUDA device: skipping {', '.join(skipped)})")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import diffusers

    print(f"{name}; torch {torch.__version__}, diffusers {diffusers.__version__}; "
          f"{args.size}x{args.size}, batch 1, CFG 7.5, {args.steps} DDIM steps", flush=True)
    tokenizer_dir = tempfile.mkdtemp(prefix="torchsd-gpu-tok-")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        sd = build(model_config, device, dtype)
        sd.tokenizer.save_pretrained(tokenizer_dir)
        pipe = diffusers_pipeline(sd, tokenizer_dir) if any(c.diffusers for c in configs) else None
        noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(42))
        print(f"\n{dtype_name}: {'config':<58} {'it/s':>8} {'gain':>6} {'e2e s':>7} {'peak GiB':>9} "
              f"{'warm-up s':>9} {'PSNR dB':>8} {'max|dz|':>8}", flush=True)
        reference = eager_its = None
        for cfg in configs:
            try:
                if cfg.diffusers:
                    if cfg.compile:
                        pipe.unet = torch.compile(pipe.unet, mode=None if cfg.compile == "default" else cfg.compile,
                                                  fullgraph=cfg.fullgraph)
                    run = functools.partial(diffusers_run, pipe, args.size, args.steps, noise, device)
                else:
                    configure(sd, cfg, device, dtype)
                    run = functools.partial(torchsd_run, sd, args.size, args.steps, noise, device)
                with sdpa_context(cfg.sdpa):
                    result = measure(run, device, args.warmups, args.reps)
            except Exception as err:  # one failing option must not cost the others' figures
                print(f"{'':6}{cfg.name:<58} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                      flush=True)
                continue
            finally:
                if cfg.diffusers and cfg.compile and pipe is not None:
                    pipe.unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
            if cfg.name == "eager":
                reference, eager_its = result, result["its"]
            agree = psnr(result["images"], reference["images"]) if reference is not None else float("nan")
            dz = float((result["latents"] - reference["latents"]).abs().max()) \
                if reference is not None and result["latents"] is not None else float("nan")
            gain = result["its"] / eager_its if eager_its else float("nan")
            print(f"{'':6}{cfg.name:<58} {result['its']:8.2f} {gain:6.2f} {result['seconds']:7.2f} "
                  f"{result['peak'] / 2 ** 30:9.2f} {result['warmup']:9.1f} {agree:8.1f} {dz:8.4f}", flush=True)
        sd.denoiser.unet = sd.unet
        del sd, pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
