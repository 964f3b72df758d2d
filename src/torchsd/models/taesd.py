"""TAESD (madebyollin's Tiny AutoEncoder for Stable Diffusion; diffusers' ``AutoencoderTiny``).

A distilled stand-in for the VAE with the same latent space: plain 3x3 conv blocks, no attention, no
normalisation, ~1 M parameters per half instead of ~50 M for the decoder. It decodes a latent in a small
fraction of the full VAE's time, a little blurrier: right for live previews, and opt-in for final images.
Its latents are the U-Net's (already multiplied by the VAE's scaling factor): no scaling here.

Module names are diffusers' (``encoder.layers.N``, ``decoder.layers.N``); ``checkpoints/taesd.py`` reads
madebyollin's own ``taesd_encoder.pth`` / ``taesd_decoder.pth`` files into them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TinyAutoencoderConfig:
    latent_channels: int = 4  # 16 for the SD3 / FLUX versions
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)  # per level; a stride-2 conv before each level after the first
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)  # per level; a x2 upsample + conv after each but the last

    def __post_init__(self):
        if len(self.encoder_channels) != len(self.encoder_blocks) or \
                len(self.decoder_channels) != len(self.decoder_blocks):
            raise ValueError(f"TinyAutoencoderConfig: one channel count per level of blocks; got {self}")

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)


class Block(nn.Module):
    """Three 3x3 convs with ReLUs, a residual (1x1 conv where the width changes), a ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels \
            else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    def __init__(self, c: TinyAutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for level, (channels, blocks) in enumerate(zip(c.encoder_channels, c.encoder_blocks)):
            # the first conv keeps the size; each later level starts with a strided conv that halves it
            layers.append(nn.Conv2d(previous, channels, 3, padding=1) if level == 0 else
                          nn.Conv2d(previous, channels, 3, padding=1, stride=2, bias=False))
            layers += [Block(channels, channels) for _ in range(blocks)]
            previous = channels
        layers.append(nn.Conv2d(previous, c.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> (scaled) latents; TAESD was trained on [0, 1]."""
        return self.layers(images.add(1).div(2))


class TinyDecoder(nn.Module):
    def __init__(self, c: TinyAutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c.latent_channels, c.decoder_channels[0], 3, padding=1), nn.ReLU()]
        last = len(c.decoder_blocks) - 1
        for level, (channels, blocks) in enumerate(zip(c.decoder_channels, c.decoder_blocks)):
            layers += [Block(channels, channels) for _ in range(blocks)]
            if level < last:
                layers += [nn.Upsample(scale_factor=2), nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
            else:
                layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(Scaled) latents -> images in [-1, 1] (not clamped)."""
        latents = torch.tanh(latents / 3) * 3  # soft clamp to ±3, the range TAESD was trained on
        return self.layers(latents).mul(2).sub(1)


class TinyAutoencoder(nn.Module):
    """Either half may be missing (None): previews need only the decoder, and madebyollin ships them apart."""

    def __init__(self, config: TinyAutoencoderConfig, *, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = TinyEncoder(config) if encoder else None
        self.decoder = TinyDecoder(config) if decoder else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            raise ValueError("this TAESD has no encoder (only taesd_decoder.*): give taesd_encoder.* beside it")
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            raise ValueError("this TAESD has no decoder: give taesd_decoder.* (or a diffusers AutoencoderTiny folder)")
        return self.decoder(latents)
