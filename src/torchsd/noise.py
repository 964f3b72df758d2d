"""Seeded noise: one CPU generator per image, float32, then moved to the device and dtype.

Drawing on the CPU makes a seed mean the same image on any device (up to float error), and one
generator per image makes image k of a batch equal to the same seed generated alone.
"""

from __future__ import annotations

import random

import torch

Generators = torch.Generator | list[torch.Generator] | None


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def random_seed() -> int:
    return random.SystemRandom().randrange(0, 2 ** 32)


def randn(shape: tuple[int, ...], generator: Generators, *, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (batch first); image i from ``generator[i]``."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"need one generator per image: {len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if torch.device(device).type == "cuda":  # pinned, so that the upload does not make the host wait
        return noise.pin_memory().to(device, non_blocking=True).to(dtype)
    return noise.to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    return randn(tuple(x.shape), generator, device=x.device, dtype=x.dtype)
