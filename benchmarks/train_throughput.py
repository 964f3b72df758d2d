"""U-Net training throughput at the bundled model's size (images/s), fp32 and bf16 autocast.

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--batch-size 32] [--threads N] [--device cuda]

Random frozen VAE and CLIP of the bundled preset; the real loss (``training.losses.denoising_loss``),
AdamW, the real U-Net. On a GPU it also prints the model FLOP utilisation against a peak you give.
"""

from __future__ import annotations

import argparse
import time

import torch

from torchsd.config import PredictionType, ScheduleConfig
from torchsd.diffusion.schedules import alphas_cumprod
from torchsd.models.unet import UNet
from torchsd.training import presets
from torchsd.training.losses import denoising_loss, per_sample_generators


def unet_flops_per_image(unet: UNet, latent: tuple[int, int, int], context: tuple[int, int]) -> float:
    """Forward FLOPs of one image, counted by torch's FLOP counter; training is about 3x that."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *latent)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500]), torch.randn(1, *context))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak, for MFU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    text, _ = presets.clip_configs("bundled")
    config = presets.unet_config("bundled", text.width)
    latent, context = (4, 16, 16), (77, text.width)
    flops = unet_flops_per_image(UNet(config), latent, context)
    schedule = alphas_cumprod(ScheduleConfig()).float()
    print(f"U-Net {sum(p.numel() for p in UNet(config).parameters()) / 1e6:.2f} M parameters, "
          f"{flops / 1e9:.3f} GFLOP forward per 64x64 image; device {args.device}, threads {torch.get_num_threads()}")
    for precision in ("fp32", "bf16"):
        unet = UNet(config).to(args.device).train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        z0 = torch.randn(args.batch_size, *latent, device=args.device)
        ctx = torch.randn(args.batch_size, *context, device=args.device)
        autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
        for step in range(args.steps + 2):  # two warm-up steps
            if step == 2:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with autocast:
                generators = per_sample_generators(0, step, list(range(args.batch_size)))
                loss = denoising_loss(unet, z0, ctx, schedule, generators, PredictionType.EPSILON, 5.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rate = args.steps * args.batch_size / seconds
        line = f"{precision}: {rate:.1f} images/s ({seconds / args.steps:.3f} s per step of {args.batch_size})"
        if args.peak_tflops:
            line += f", MFU {3 * flops * rate / (args.peak_tflops * 1e12):.1%}"
        print(line)


if __name__ == "__main__":
    main()
