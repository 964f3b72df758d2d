"""What one live preview costs: the full VAE decoder against TAESD, at SD 1.5 size on random weights (prints
figures, asserts nothing). The server decodes a preview between sampling steps whenever /progress asks for
one, so this is time taken from sampling.

    PYTHONPATH=src python benchmarks/preview_cost.py [--size 512] [--device cuda] [--dtype fp16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from torchsd.config import ModelConfig
from torchsd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from torchsd.models.vae import AutoencoderKL
from torchsd.runtime import parse_dtype


def per_call(fn, repeats: int, device: str) -> float:
    fn()  # warm-up: allocator, oneDNN / cuDNN plans
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", type=parse_dtype, default=torch.float32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    vae = AutoencoderKL(ModelConfig.sd15().vae).to(args.device, args.dtype).eval()
    taesd = TinyAutoencoder(TinyAutoencoderConfig(), encoder=False).to(args.device, args.dtype).eval()
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, device=args.device, dtype=args.dtype)
    with torch.no_grad():
        full = per_call(lambda: vae.decode(latents), args.repeats, args.device)
        tiny = per_call(lambda: taesd.decode(latents), args.repeats, args.device)
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in
              (("full VAE decoder", vae.decoder), ("TAESD decoder", taesd.decoder))}
    print(f"one preview of a {args.size}x{args.size} image on {args.device}, {args.dtype}, threads "
          f"{torch.get_num_threads()}:")
    print(f"  full VAE decoder  {full * 1000:8.1f} ms   ({params['full VAE decoder']:.1f} M parameters)")
    print(f"  TAESD decoder     {tiny * 1000:8.1f} ms   ({params['TAESD decoder']:.1f} M parameters)")
    print(f"  TAESD takes {tiny / full:.1%} of the full decoder's time")


if __name__ == "__main__":
    main()
