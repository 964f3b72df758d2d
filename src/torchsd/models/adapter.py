"""T2I-Adapter (Mou et al. 2023): a small conv network from a hint image to one feature map per U-Net level.

Layout ("full adapter", SD 1.x/2.x): pixel-unshuffle by 8 (the hint's 8x8 patches become 192 channels at
latent size), a conv to the first level's width, then per level: [avg-pool 2x (after the first),
1x1 conv if the width changes] and ResBlocks of conv3x3-ReLU-conv1x1. Feature i is added to level i's
last activation, before its downsampler (``UNet.forward(level_residuals=)``): unlike a ControlNet it does not
depend on the timestep, so it is computed once per run. Names follow diffusers' T2IAdapter without the
``adapter.`` prefix, which ``checkpoints/adapter.py`` handles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdapterConfig:
    hint_channels: int = 3
    widths: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale: int = 8  # pixel-unshuffle factor: the VAE's

    @property
    def hint_downscale(self) -> int:
        """The hint is this many times the latents' size (the unshuffle factor)."""
        return self.downscale

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.hint_channels <= 0 or self.num_res_blocks <= 0 or self.downscale <= 0 or not self.widths:
            raise ValueError("AdapterConfig: hint_channels, widths, num_res_blocks and downscale must be positive")


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
        self.body = nn.ModuleList(AdapterLevel(cin, cout, c.num_res_blocks, down=i > 0)
                                  for i, (cin, cout) in enumerate(zip((c.widths[0], *c.widths[:-1]), c.widths)))

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        """hint: (B, 3, H, W) in [0, 1] -> one feature map per level, (B, widths[i], H/8/2^i, W/8/2^i)."""
        x = self.conv_in(F.pixel_unshuffle(hint, self.config.downscale))
        features = []
        for level in self.body:
            x = level(x)
            features.append(x)
        return features
