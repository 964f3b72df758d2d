"""Components trained by `torchsd train` as safetensors files that carry their own config in the metadata.

``vae.safetensors`` (an AutoencoderKL); CLIPs are written by ``checkpoints.clip.save_clip`` and U-Nets
as whole pipelines (``StableDiffusion.save``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..config import VAEConfig
from .diffusers import load_into
from .io import CheckpointError, load_state_dict, safetensors_metadata, save_safetensors

KINDS = {"vae": (VAEConfig,)}


def _config_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def save_component(path: str | Path, kind: str, module: nn.Module, *configs, dtype: torch.dtype | None = None) -> None:
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in module.state_dict().items()}
    metadata = {"torchsd_component": kind, "torchsd_configs": json.dumps([_config_dict(c) for c in configs])}
    save_safetensors(state, path, metadata=metadata)


def read_component(path: str | Path, kind: str) -> tuple[tuple, dict[str, torch.Tensor]]:
    """(configs, state dict) of a component file written by ``save_component``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: trained components are .safetensors files written by `torchsd train`")
    metadata = safetensors_metadata(path) if path.is_file() else {}
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    found = metadata.get("torchsd_component")
    if found != kind:
        raise CheckpointError(f"{path}: expected a {kind} written by `torchsd train {kind}`, found "
                              f"{found or 'a file without torchsd metadata'}")
    raw = json.loads(metadata["torchsd_configs"])
    configs = tuple(cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
                    for cls, data in zip(KINDS[kind], raw))
    return configs, load_state_dict(path)


def load_vae(path: str | Path):
    from ..models.vae import AutoencoderKL

    (config,), state = read_component(path, "vae")
    vae = AutoencoderKL(config)
    load_into(vae, state, str(path))
    return vae


def load_clip(path: str | Path):
    """A CLIP written by `torchsd train clip` (``checkpoints.clip.save_clip``), trainable."""
    from .clip import load_clip as read

    return read(path).train().requires_grad_(True)
