"""Variation seeds and seed resizing, as AUTOMATIC1111 makes its initial noise.

``subseed_strength`` s blends the noise of ``seed`` towards the noise of ``subseed`` by spherical
interpolation, so small s gives small variations of one picture. ``seed_resize_from`` (w, h) draws the
noise at that size and pastes it in the centre of the noise for the real size, so a seed keeps roughly
its composition when the picture size changes.
"""

from __future__ import annotations

import torch

from ..noise import make_generators, randn


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's slerp of one image's noise (C, H, W), taken along dim 1 (each column of each channel).

    Its near-parallel fallback weights ``low`` by t (not 1 - t); kept as is, since seeds depend on it."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so).unsqueeze(1) * low + (torch.sin(t * omega) / so).unsqueeze(1) * high


def variation_noise(shape: tuple[int, ...], seeds: list[int], generators: list[torch.Generator], *,
                    subseeds: list[int] | None = None, subseed_strength: float = 0.0,
                    seed_resize_from: tuple[int, int] | None = None, downscale_factor: int = 8) -> torch.Tensor:
    """Unit noise (B, C, h, w) for ``seeds``; without variation or resizing it is ``randn(shape, generators)``.

    ``generators`` are the per-image generators of the run (they go on to drive stochastic samplers);
    the subseed noise and the resized-from noise come from fresh generators of their own seeds."""
    use_subseed = subseeds is not None and subseed_strength != 0
    resize = seed_resize_from is not None and (seed_resize_from[1] // downscale_factor,
                                               seed_resize_from[0] // downscale_factor) != tuple(shape[2:])
    if not use_subseed and not resize:
        return randn(shape, generators)

    C, H, W = shape[1:]
    noise_shape = (C, seed_resize_from[1] // downscale_factor, seed_resize_from[0] // downscale_factor) \
        if resize else (C, H, W)
    images = []
    for i, (seed, generator) in enumerate(zip(seeds, generators)):
        if resize:
            x = torch.randn(noise_shape, generator=make_generators([seed])[0])
        else:
            x = torch.randn(noise_shape, generator=generator)
        if use_subseed:
            subnoise = torch.randn(noise_shape, generator=make_generators([subseeds[i]])[0])
            x = slerp(subseed_strength, x, subnoise)
        if resize:
            x = _paste_centred(x, torch.randn((C, H, W), generator=generator))
        images.append(x)
    return torch.stack(images)


def _paste_centred(small: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """Put ``small`` (C, h, w) in the centre of ``canvas`` (C, H, W), cropping it where it is larger."""
    dy, dx = (canvas.shape[1] - small.shape[1]) // 2, (canvas.shape[2] - small.shape[2]) // 2
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    canvas[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return canvas
