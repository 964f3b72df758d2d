"""Tiled VAE encode and decode: bounded memory for large images, overlap blending against seams.

The image (or latent) is cut into overlapping tiles of at most ``tile_size`` pixels, each tile goes
through the network alone, and the outputs are blended with weights that ramp linearly across each
overlap, so that no tile edge shows. Tiles are balanced: n tiles of equal size cover a side with at
least ``overlap`` pixels shared between neighbours, so a 1024-pixel side with 512-pixel tiles takes
3 tiles of 384, not 2 of 512 and a sliver.

A tile is not exactly the same as the untiled pass: GroupNorm statistics and the middle block's
self-attention only see the tile. Larger tiles and overlaps make the difference smaller;
``tests/test_memory.py`` and ``benchmarks/cpu_vs_diffusers.py`` measure it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class VAETiling:
    """Tile sizes in image pixels (multiples of the VAE's downscale factor, 8 for SD)."""

    tile_size: int = 512
    overlap: int = 64

    def __post_init__(self) -> None:
        if self.tile_size < 16 or self.overlap < 0:
            raise ValueError(f"VAETiling needs tile_size >= 16 and overlap >= 0; got {self.tile_size}, {self.overlap}")
        if self.overlap * 2 > self.tile_size:
            raise ValueError(f"VAETiling overlap ({self.overlap}) must be at most half the tile size "
                             f"({self.tile_size}); try overlap={self.tile_size // 8}")

    def needed(self, height: int, width: int) -> bool:
        """Whether an image of this size is larger than one tile."""
        return height > self.tile_size or width > self.tile_size


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> tuple[list[int], int]:
    """Start offsets and the common size of the tiles that cover ``length`` (multiples of ``align``)."""
    if length <= tile:
        return [0], length
    n = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (n - 1) * overlap) / n / align) * align
    size = min(size, length)
    starts = [round(i * (length - size) / (n - 1) / align) * align for i in range(n)]
    return starts, size


def _ramp(size: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """Blend weights along one axis of a tile: rising over the overlap on sides with a neighbour."""
    w = torch.ones(size, dtype=torch.float32)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        n = min(overlap, size)
        if ramp_start:
            w[:n] = torch.minimum(w[:n], ramp[:n])
        if ramp_end:
            w[size - n:] = torch.minimum(w[size - n:], ramp[:n].flip(0))
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, tile: int, overlap: int,
                scale: float, align: int = 1) -> torch.Tensor:
    """Run ``fn`` over overlapping tiles of x (B, C, H, W) and blend: fn maps an (h, w) tile to
    (h*scale, w*scale). ``tile`` and ``overlap`` are in x's pixels; starts are multiples of ``align``.

    Accumulates in float32 on x's device; only one tile's activations are alive at a time."""
    B, _, H, W = x.shape
    ys, th = tile_starts(H, tile, overlap, align)
    xs, tw = tile_starts(W, tile, overlap, align)
    out_h, out_w = round(H * scale), round(W * scale)
    oth, otw, o_overlap = round(th * scale), round(tw * scale), round(overlap * scale)
    total = weight = None
    for i, y in enumerate(ys):
        wy = _ramp(oth, o_overlap, i > 0, i < len(ys) - 1)
        for j, x0 in enumerate(xs):
            wx = _ramp(otw, o_overlap, j > 0, j < len(xs) - 1)
            out = fn(x[:, :, y:y + th, x0:x0 + tw]).float()
            if total is None:
                total = torch.zeros(B, out.shape[1], out_h, out_w, device=out.device)
                weight = torch.zeros(1, 1, out_h, out_w, device=out.device)
            w = (wy[:, None] * wx[None, :]).to(out.device)  # (oth, otw)
            oy, ox = round(y * scale), round(x0 * scale)
            total[:, :, oy:oy + oth, ox:ox + otw] += out * w
            weight[:, :, oy:oy + oth, ox:ox + otw] += w
            del out
    return total / weight


def tiled_decode(vae, latents: torch.Tensor, tiling: VAETiling) -> torch.Tensor:
    """``vae.decode`` of unscaled latents, one tile at a time (float32 output)."""
    f = vae.config.downscale_factor
    return tiled_apply(vae.decode, latents, tile=max(1, tiling.tile_size // f), overlap=tiling.overlap // f,
                       scale=f)


def tiled_encode_moments(vae, images: torch.Tensor, tiling: VAETiling) -> torch.Tensor:
    """The encoder's posterior moments (mean | log-variance) of images, one tile at a time. Tile
    starts are multiples of the downscale factor, so every tile's latents land on the latent grid."""
    f = vae.config.downscale_factor

    def moments(tile: torch.Tensor) -> torch.Tensor:
        return vae.quant_conv(vae.encoder(tile))

    return tiled_apply(moments, images, tile=tiling.tile_size // f * f, overlap=tiling.overlap // f * f,
                       scale=1 / f, align=f)
