"""Which flow-matching transformer a single file holds, from its tensors alone, and its weights in torchsd's
names: FLUX.1 (dev or schnell, by ``guidance_in``) in BFL's layout, or SD 3 / 3.5 (Medium by its
dual-attention blocks, Large by its 38 blocks) in Stability's; plain, fp8 or GGUF."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..config import FluxConfig, MMDiTConfig
from . import bfl, sd3_original
from .io import CheckpointError
from .quantized import load_quantized, read_quantized


@dataclass(frozen=True)
class FlowFile:
    family: str  # "flux" or "sd3"
    variant: str  # "dev", "schnell"; "sd35_medium", "sd35_large", "sd3_medium"
    config: FluxConfig | MMDiTConfig


def detect(tensors: Mapping[str, object], source: object = "state dict") -> FlowFile:
    if bfl.is_flux(tensors):
        return FlowFile("flux", bfl.variant(tensors), bfl.config_of(tensors, source))
    if sd3_original.is_sd3(tensors):
        return FlowFile("sd3", sd3_original.variant(tensors), sd3_original.config_of(tensors, source))
    raise CheckpointError(f"{source}: neither a FLUX.1 transformer in BFL's layout ({bfl.MARKER}) nor an SD 3 "
                          f"MMDiT in Stability's ({sd3_original.MARKER}), bare or under {bfl.PREFIX!r}; "
                          f"diffusers folders are read by from_diffusers")


def load_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[FlowFile, nn.Module]:
    """The transformer of a FLUX.1 or SD 3.5 single file (.safetensors, fp8 or .gguf), quantized weights
    kept quantized, the rest in ``dtype``."""
    from ..models.flux import Flux
    from ..models.mmdit import MMDiT

    tensors = read_quantized(path)
    found = detect(tensors, path)
    if found.family == "flux":
        state = bfl.from_bfl(tensors, found.config, path)
        return found, load_quantized(lambda: Flux(found.config), state, dtype, path)
    state = sd3_original.from_original(tensors, found.config, path)
    return found, load_quantized(lambda: MMDiT(found.config), state, dtype, path)
