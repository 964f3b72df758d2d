"""Seamless tiling: images whose left edge continues the right edge and whose top continues the bottom, for
textures and wallpapers.

Every convolution of the U-Net and the VAE pads circularly for the run — a 3x3 kernel at the left border
reads the right border's pixels — so the picture is drawn on a torus. That is what AUTOMATIC1111 does
(``padding_mode='circular'`` on every Conv2d); the modes are set for the run and restored afterwards, on the
modules themselves (no patched ``forward``). The CPU fast paths (oneDNN, Winograd) apply only to zero
padding and step aside by themselves. As with LoRA, runs on one pipeline with and without tiling must not
overlap.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion


@contextmanager
def circular_padding(*models: nn.Module) -> Iterator[None]:
    """Every Conv2d of ``models`` pads circularly inside the block; the original modes come back afterwards."""
    convs = [m for model in models for m in model.modules() if isinstance(m, nn.Conv2d)]
    modes = [conv.padding_mode for conv in convs]
    try:
        for conv in convs:
            conv.padding_mode = "circular"
        yield
    finally:
        for conv, mode in zip(convs, modes):
            conv.padding_mode = mode


@dataclass(frozen=True)
class TilingOptions:
    tiling: bool = False

    def __post_init__(self):
        if not isinstance(self.tiling, bool):
            raise ValueError(f"tiling must be True or False; got {self.tiling!r}")


class Tiling(Feature):
    name = "tiling"
    Options = TilingOptions

    def active(self, options: TilingOptions) -> bool:
        return options.tiling

    @contextmanager
    def model_context(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> Iterator[None]:
        # a VAE decoding tile by tile would wrap each tile around itself: decode whole images instead
        vae_tiling, sd.vae_tiling = sd.vae_tiling, None
        try:
            with circular_padding(sd.unet, sd.vae, *[m for m in [getattr(sd, "taesd", None)] if m is not None]):
                yield
        finally:
            sd.vae_tiling = vae_tiling

    def infotext_params(self, sd: StableDiffusion, request: GenerationRequest, run: Run, index: int) -> dict:
        return {"Tiling": "True"}  # as AUTOMATIC1111 writes it; only for tiled runs

    def from_infotext(self, params: dict[str, str]) -> dict:
        if "Tiling" not in params:
            return {}
        value = params["Tiling"].strip().lower()
        if value not in ("true", "false"):
            raise ValueError(f"infotext Tiling: expected True or False; got {params['Tiling']!r}")
        return {"tiling": value == "true"}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tiling", action="store_true",
                            help="seamless tiling: the image wraps around at its edges (textures)")

    def from_a1111(self, fields: A1111Fields) -> dict:
        value = fields.get("tiling", False)
        if not isinstance(value, bool):
            raise fields.error(f"tiling must be true or false; got {value!r}")
        return {"tiling": value}


TILING = Tiling()
