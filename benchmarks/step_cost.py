"""What DeepCache and token merging buy and cost: the speed-up and the image difference (PSNR against the plain
run, same seed, and the cosine similarity of the two images' embeddings by the bundled CLIP) at 20 and 50 steps,
on a small random SD 1-shaped model (prints figures, asserts nothing).

Random weights make images of structured noise, which is harder to keep than a photograph: the PSNRs here
compare settings with each other, not with the figures the DeepCache and ToMe papers give for real models.

    PYTHONPATH=src python benchmarks/step_cost.py [--size 96] [--threads 1] [--steps 20 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

import torchsd
from torchsd.config import ModelConfig, UNetConfig
from torchsd.images import pil_to_tensor
from torchsd.pipeline import StableDiffusion

SETTINGS = [
    ("plain", {}),
    ("DeepCache interval 2", {"deep_cache_interval": 2}),
    ("DeepCache interval 3", {"deep_cache_interval": 3}),
    ("DeepCache interval 5", {"deep_cache_interval": 5}),
    ("DeepCache interval 3, branch 2", {"deep_cache_interval": 3, "deep_cache_branch": 2}),
    ("ToMe ratio 0.3", {"tome_ratio": 0.3}),
    ("ToMe ratio 0.5", {"tome_ratio": 0.5}),
    ("DeepCache 3 + ToMe 0.5", {"deep_cache_interval": 3, "tome_ratio": 0.5}),
]


def small_model() -> StableDiffusion:
    """SD 1.5's U-Net layout (4 levels, 2 ResBlocks each, attention at the top three) at 1/5 of its width."""
    config = ModelConfig.tiny("sd1")
    unet = UNetConfig(model_channels=64, channel_mult=(1, 2, 4, 4), attention_levels=(True, True, True, False),
                      num_heads=4, context_dim=config.text.width, norm_groups=32)
    sd = StableDiffusion.from_config(dataclasses.replace(config, unet=unet), seed=0)
    with torch.no_grad():  # as the tests do: random init leaves zero-initialised paths; perturb every weight
        gen = torch.Generator().manual_seed(1)
        for p in sd.unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return sd


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def clip_similarity(clip, a, b) -> float:
    """Cosine similarity of the bundled CLIP's image embeddings of two PIL images (1: the same to CLIP)."""
    with torch.no_grad():
        pixels = torch.cat([pil_to_tensor(a), pil_to_tensor(b)])
        embeddings = torch.nn.functional.normalize(clip.encode_image(clip.preprocess(pixels)), dim=-1)
    return float(embeddings[0] @ embeddings[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (the tiny VAE halves it)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sd = small_model()
    clip = torchsd.load_pipeline(None, dtype=torch.float32).clip  # the bundled model's joint CLIP
    run = dict(width=args.size, height=args.size, guidance_scale=7.0, sampler="Euler", seed=1)
    print(f"U-Net {sum(p.numel() for p in sd.unet.parameters()) / 1e6:.1f} M parameters, latents "
          f"{args.size // 2}x{args.size // 2}, {args.threads} thread(s), CFG batched, Euler")
    for steps in args.steps:
        print(f"\n{steps} steps:  {'setting':32} {'wall s':>8} {'CPU s':>8} {'speed-up (CPU)':>15} {'PSNR dB':>8} "
              f"{'CLIP cos':>8}")
        reference, plain_cpu = None, None
        for label, options in SETTINGS:
            sd.generate("a red circle", steps=2, **run, **options)  # warm-up
            wall, cpu = time.perf_counter(), time.process_time()
            picture = sd.generate("a red circle", steps=steps, **run, **options).images[0]
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            image = np.asarray(picture)
            if reference is None:
                reference, reference_picture, plain_cpu = image, picture, cpu
            print(f"{'':12} {label:32} {wall:8.2f} {cpu:8.2f} {plain_cpu / cpu:14.2f}x {psnr(image, reference):8.1f} "
                  f"{clip_similarity(clip, picture, reference_picture):8.4f}", flush=True)


if __name__ == "__main__":
    main()
