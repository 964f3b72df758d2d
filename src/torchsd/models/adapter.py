"""T2I-Adapter (Mou et al. 2023): a small conv network from a hint image to one feature map per U-Net level.

Layout ("full adapter"): pixel-unshuffle by ``downscale`` (the hint's patches become channels), a conv to the
first level's width, then per level: [avg-pool 2x where the level downsamples, 1x1 conv if the width changes]
and ResBlocks of conv3x3-ReLU-conv1x1. Feature i is added to the U-Net's down level i
(``UNet.forward(level_residuals=)``): unlike a ControlNet it does not depend on the timestep, so it is computed
once per run. Names follow diffusers' T2IAdapter without the ``adapter.`` prefix, which
``checkpoints/controlnet.py`` handles.

Two layouts, as diffusers' ``adapter_type`` names them:

- ``full_adapter`` (SD 1.x/2.x): unshuffle by the VAE's factor (8), every level after the first downsamples,
  so feature i has the size of the U-Net's level i (latents / 2**i);
- ``full_adapter_xl`` (SDXL, TencentARC's ``t2i-adapter-*-sdxl-1.0``): unshuffle by twice the VAE's factor
  (16) and only the third level downsamples. SDXL's U-Net has three levels, the first without attention, and
  diffusers' U-Net adds a feature after such a level's downsampler: features 0 and 1 go to levels 0 and 1 at
  latents / 2, feature 2 to level 2 and feature 3 to the middle block's output, both at latents / 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = ("full_adapter", "full_adapter_xl")


@dataclass(frozen=True)
class AdapterConfig:
    hint_channels: int = 3
    widths: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale: int = 8  # pixel-unshuffle factor: the VAE's (full_adapter), twice it (full_adapter_xl)
    layout: str = "full_adapter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.hint_channels <= 0 or self.num_res_blocks <= 0 or self.downscale <= 0 or not self.widths:
            raise ValueError("AdapterConfig: hint_channels, widths, num_res_blocks and downscale must be positive")
        if self.layout not in LAYOUTS:
            raise ValueError(f"AdapterConfig: unknown layout {self.layout!r}; use one of {', '.join(LAYOUTS)}")
        if self.layout == "full_adapter_xl" and self.downscale % 2:
            raise ValueError("AdapterConfig: a full_adapter_xl unshuffles by twice the VAE's factor: an even "
                             f"downscale; got {self.downscale}")

    @property
    def downsamples(self) -> tuple[bool, ...]:
        """Which levels avg-pool their input by 2 (see the module docstring)."""
        if self.layout == "full_adapter_xl":
            return tuple(i == 2 for i in range(len(self.widths)))
        return tuple(i > 0 for i in range(len(self.widths)))

    @property
    def hint_downscale(self) -> int:
        """The hint is this many times the latents' size: the unshuffle factor, halved for the XL layout (its
        first feature has the size of SDXL's second level)."""
        return self.downscale // 2 if self.layout == "full_adapter_xl" else self.downscale

    def feature_shapes(self) -> list[tuple[int, int]]:
        """(channels, how many times smaller than the latents) of each feature."""
        scale, shapes = self.downscale // self.hint_downscale, []
        for width, down in zip(self.widths, self.downsamples):
            scale *= 2 if down else 1
            shapes.append((width, scale))
        return shapes


class AdapterResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.block2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class AdapterLevel(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.resnets = nn.Sequential(*(AdapterResBlock(cout) for _ in range(num_res_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2, ceil_mode=True)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class T2IAdapter(nn.Module):
    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        c = config
        self.conv_in = nn.Conv2d(c.hint_channels * c.downscale ** 2, c.widths[0], 3, padding=1)
        # level i reads level i-1's width (diffusers' FullAdapterXL reads widths[3] at level 3: the same network
        # wherever its own works, as widths[2] == widths[3] in every SDXL adapter)
        self.body = nn.ModuleList(AdapterLevel(cin, cout, c.num_res_blocks, down)
                                  for cin, cout, down in zip((c.widths[0], *c.widths[:-1]), c.widths, c.downsamples))

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """hint: (B, 3, H, W) in [0, 1] -> one feature map per level, shaped as ``config.feature_shapes()``."""
        x = self.conv_in(F.pixel_unshuffle(hint, self.config.downscale))  # (B, widths[0], H/d, W/d)
        features = []
        for level in self.body:
            x = level(x)
            features.append(x)
        return features
