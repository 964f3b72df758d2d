"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the U-Net's encoder that reads a hint image.

Layout: the hint (B, 3, H, W) goes through a small conv stack (16, 32, 96, 256 channels, three stride-2
convs: H/8) and is added to the copy's ``conv_in`` output; the copy's down levels and middle block then run
as in the U-Net, and every activation the U-Net would keep as a skip connection, plus the middle block's
output, passes through a 1x1 "zero convolution". Those outputs are added to the U-Net's skips and middle
output (``UNet.forward(down_residuals=, mid_residual=)``). Zero-initialised, the convolutions make a fresh
ControlNet change nothing, which is why training can start from the U-Net's weights (``from_unet``).

Module names follow diffusers' ControlNetModel (``controlnet_cond_embedding``, ``controlnet_down_blocks``,
``controlnet_mid_block``), so the U-Net's key rules map it; ``checkpoints/controlnet.py`` maps the
original layout (``input_hint_block``, ``zero_convs``, ``middle_block_out``).

An SDXL ControlNet copies the U-Net's added embedding too (``add_embedding``: pooled text and
micro-conditioning, diffusers' ``addition_embed_type="text_time"``) and takes the same added vector ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .layers import repeat_rows
from .unet import UNet, add_down_path, add_stem, embed_inputs


@dataclass(frozen=True)
class ControlNetConfig:
    """The U-Net config whose encoder is copied, the hint's channels and the hint encoder's widths.
    ``global_pool``: the residuals are averaged over space (the "shuffle" ControlNet)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = (16, 32, 96, 256)
    global_pool: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_widths", tuple(self.hint_widths))
        if self.hint_channels <= 0 or not self.hint_widths or min(self.hint_widths) <= 0:
            raise ValueError("ControlNetConfig: hint_channels and every hint width must be positive")

    @property
    def hint_downscale(self) -> int:
        """How much smaller the hint's features are than the hint: one stride-2 conv per width after the first."""
        return 2 ** (len(self.hint_widths) - 1)


class HintEncoder(nn.Module):
    """Conv-SiLU stack from hint pixels to the latent grid; its last conv starts at zero
    (diffusers' ControlNetConditioningEmbedding, the original's ``input_hint_block``)."""

    def __init__(self, hint_channels: int, widths: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(hint_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
        self.conv_out = zero(nn.Conv2d(widths[-1], out_channels, 3, padding=1))

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)  # (B, model_channels, H/8, W/8)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        c = config.unet
        # the U-Net's stem, encoder and middle block, built by the U-Net's own code (same names: from_unet
        # copies by key)
        add_stem(self, c)
        self.controlnet_cond_embedding = HintEncoder(config.hint_channels, config.hint_widths, c.model_channels)
        skip_widths = add_down_path(self, c)
        cin = c.model_channels * c.channel_mult[-1]

        # one zero conv per U-Net skip connection, and one for the middle block
        self.controlnet_down_blocks = nn.ModuleList(zero(nn.Conv2d(w, w, 1)) for w in skip_widths)
        self.controlnet_mid_block = zero(nn.Conv2d(cin, cin, 1))

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 3, hint_widths: tuple[int, ...] = (16, 32, 96, 256)
                  ) -> "ControlNet":
        """A fresh ControlNet: the U-Net's encoder weights, a random hint encoder, zero convolutions."""
        net = cls(ControlNetConfig(unet.config, hint_channels, hint_widths))
        copied = {k: v for k, v in unet.state_dict().items()
                  if k.split(".")[0] in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")}
        missing, unexpected = net.load_state_dict(copied, strict=False)
        assert not unexpected and all(k.startswith("controlnet_") for k in missing), (missing, unexpected)
        return net.to(next(unet.parameters()).dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                hint: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x: (B, C, h, w) latents; context: (k*B, T, W) as UNet.forward takes it; hint: (B or 1, 3, 8h, 8w)
        in [0, 1]; y: SDXL's added vector (k*B rows, as UNet.forward's), required by an SDXL ControlNet and
        refused by others. Returns the residuals for the U-Net's skips (each with B or k*B rows, as the skip it
        is added to) and for its middle output, unscaled."""
        x, emb = embed_inputs(self.time_embedding, self.add_embedding, self.config.unet.model_channels, x,
                              timesteps, y)

        hint = self.controlnet_cond_embedding(hint.to(x.dtype))
        h = self.conv_in(x) + repeat_rows(hint, x.shape[0])  # one hint may serve every latent
        skips = [h]
        for block in self.down_blocks:
            h, outputs = block(h, emb, context, _call)
            skips.extend(outputs)
        h = self.mid_block(h, emb, context, _call)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(h)
        if self.config.global_pool:  # the residuals carry no layout, only a global code
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def _call(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return module(*args)
