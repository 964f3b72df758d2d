"""bf16 attention on the CPU: torchsd's per-head matmul kernel (accel/cpu_attention.py) against PyTorch's
flash kernel (SDPA), at the U-Net's and the VAE's shapes, for 1 thread up to all cores. Prints ms and the
ratio ours / SDPA, and the error of each against float64 on the same bf16 inputs.

    PYTHONPATH=src python benchmarks/cpu_attention_threads.py [--threads 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from torchsd.accel import cpu_attention

SHAPES = [  # (batch, tokens, channels, heads): U-Net 512 px top level, 256 px top level, VAE 512 px mid
    (2, 4096, 320, 8), (2, 1024, 320, 8), (2, 1024, 640, 8), (1, 4096, 512, 1)]


def sdpa(q, k, v, heads):
    B, T, C = q.shape

    def split(t):
        return t.view(B, -1, heads, C // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(B, T, C)


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default=",".join(str(n) for n in (1, 2, 4, 8, 16) if n <= (os.cpu_count() or 1)))
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs; oneDNN ops available: {cpu_attention.fused.available()}")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for B, T, C, heads in SHAPES:
            q, k, v = (torch.randn(B, T, C, generator=g).bfloat16() for _ in range(3))
            ref = sdpa(q.double(), k.double(), v.double(), heads)
            errors = [float((y.double() - ref).norm() / ref.norm()) for y in
                      (cpu_attention.attention(q, k, v, heads), sdpa(q, k, v, heads))]
            print(f"\n{B}x{T} tokens, {C} channels, {heads} heads: error vs float64 ours {errors[0]:.1e}, "
                  f"SDPA {errors[1]:.1e}")
            for n in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(n)
                ours = best_ms(lambda: cpu_attention.attention(q, k, v, heads), args.reps)
                theirs = best_ms(lambda: sdpa(q, k, v, heads), args.reps)
                print(f"  {n:>2} threads: ours {ours:8.1f} ms   SDPA {theirs:8.1f} ms   ratio {ours / theirs:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
