"""Image super-resolution networks that AUTOMATIC1111 users keep in ``models/ESRGAN``, as their papers draw them.

- ``RRDBNet`` — ESRGAN (Wang et al. 2018) and Real-ESRGAN (Wang et al. 2021) x4plus: residual-in-residual
  dense blocks at the input's resolution, then nearest x2 upsampling + conv per factor of 2. Real-ESRGAN's
  x2 model first folds 2x2 pixels into channels (pixel unshuffle), so the same body upscales by 2.
- ``SRVGGNetCompact`` — Real-ESRGAN's small VGG-style net (realesr-general, animevideo): convs with PReLU,
  a pixel shuffle, plus the nearest-upsampled input.

Module names are BasicSR's (``conv_first``, ``body.N.rdb1.conv1`` …), so that files in that layout load as
they are; ``checkpoints/upscalers.py`` maps the older ESRGAN layout (``model.0`` …) to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RRDBConfig:
    in_channels: int = 3  # of the image (before a pixel unshuffle)
    out_channels: int = 3
    features: int = 64  # nf
    growth: int = 32  # gc: channels each dense-block conv adds
    blocks: int = 23  # RRDBs in the body
    upsamplings: int = 2  # nearest x2 + conv steps: 2 for x4
    unshuffle: int = 1  # 2 (Real-ESRGAN x2) or 4 (x1): pixels folded into channels first

    def __post_init__(self):
        if self.unshuffle not in (1, 2, 4) or self.upsamplings < 0 or self.blocks < 1:
            raise ValueError(f"RRDBConfig: unshuffle must be 1, 2 or 4 and blocks ≥ 1; got {self}")

    @property
    def scale(self) -> int:
        return 2 ** self.upsamplings // self.unshuffle


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier conv's output (dense connections)."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        for i in range(1, 6):
            out = features if i == 5 else growth
            setattr(self, f"conv{i}", nn.Conv2d(features + (i - 1) * growth, out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for i in range(1, 5):
            features.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(features, 1)), 0.2))
        return self.conv5(torch.cat(features, 1)) * 0.2 + x  # residual scaling 0.2 keeps the deep body stable


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = (ResidualDenseBlock(features, growth) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, config: RRDBConfig):
        super().__init__()
        self.config = c = config
        nf = c.features
        self.conv_first = nn.Conv2d(c.in_channels * c.unshuffle ** 2, nf, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(nf, c.growth) for _ in range(c.blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)
        self.upsamplers = nn.ModuleList(nn.Conv2d(nf, nf, 3, padding=1) for _ in range(c.upsamplings))
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, c.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, C, H·scale, W·scale); with an unshuffle, H and W must divide by it."""
        if self.config.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.config.unshuffle)  # (B, C·u², H/u, W/u)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.upsamplers:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


@dataclass(frozen=True)
class CompactConfig:
    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    convs: int = 16  # body convs after the first
    scale: int = 4


class SRVGGNetCompact(nn.Module):
    """``body`` alternates convs and PReLUs, as Real-ESRGAN's file keys number them (body.0 conv, body.1 act …)."""

    def __init__(self, config: CompactConfig):
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.features, 3, padding=1), nn.PReLU(c.features)]
        for _ in range(c.convs):
            layers += [nn.Conv2d(c.features, c.features, 3, padding=1), nn.PReLU(c.features)]
        layers.append(nn.Conv2d(c.features, c.out_channels * c.scale ** 2, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.config.scale)
        # the net learns the residual over a nearest upscale
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")


Upscaler = RRDBNet | SRVGGNetCompact


def scale_of(model: nn.Module) -> int:
    return model.config.scale


def multiple_of(model: nn.Module) -> int:
    """Input sides must divide by this (the pixel unshuffle)."""
    return getattr(model.config, "unshuffle", 1)


# A1111 runs ESRGAN on 192 px tiles with 8 px overlap; a larger overlap blends the seams away at little cost
TILE, OVERLAP = 192, 16


@torch.no_grad()
def upscale_pixels(model: nn.Module, images: torch.Tensor, *, tile: int = TILE, overlap: int = OVERLAP
                   ) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] -> ``scale_of(model)`` times larger, tile by tile when larger than ``tile``
    (activations of a full-size RRDBNet grow with the image: ~64 channels at full resolution per layer)."""
    from .tiling import tiled_apply

    align = multiple_of(model)
    H, W = images.shape[-2:]
    pad_h, pad_w = -H % align, -W % align  # the pixel unshuffle needs sides that divide
    x = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else images
    if max(x.shape[-2:]) <= tile:
        out = model(x)
    else:
        out = tiled_apply(model, x, tile=tile, overlap=overlap, scale=scale_of(model), align=align)
    s = scale_of(model)
    return out[..., : H * s, : W * s].clamp(0, 1)
