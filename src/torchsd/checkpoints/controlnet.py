"""ControlNet files, as they are found:

- lllyasviel's original layout (``control_v11p_sd15_canny.pth``, ``.safetensors``): the ldm U-Net's encoder
  names (``input_blocks``, ``middle_block``, ``time_embed``) plus ``input_hint_block.{0,2,…,14}``,
  ``zero_convs.{i}.0`` and ``middle_block_out.0``, with or without a ``control_model.`` prefix (the first
  ControlNet 1.0 files hold a whole SD model beside it: only the ``control_model.`` part is read);
- diffusers' ControlNetModel: a folder (``config.json`` + weights) or its weights file alone.

The ControlNet's U-Net part must match the model it steers (an SD 1.x ControlNet on an SD 1.x model);
the hint encoder's widths are read from the weights. Stability's "Control-LoRA" files (low-rank deltas
of the U-Net's encoder) are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..config import UNetConfig
from .diffusers import check_state, from_diffusers_keys
from .io import CheckpointError, load_state_dict, read_weights
from .ldm import Block, rename, unet_blocks

PREFIX = "control_model."
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def original_blocks(c: UNetConfig, hint_convs: int) -> list[Block]:
    """The U-Net's encoder blocks (ldm.unet_blocks without the decoder), the hint convs and the zero convs.
    ``hint_convs``: the convs of ``input_hint_block`` (every other index: SiLUs sit between them)."""
    blocks = [b for b in unet_blocks(c) if not b.original.startswith(("output_blocks.", "out."))]
    blocks.append(Block("input_hint_block.0.", "controlnet_cond_embedding.conv_in."))
    for k in range(1, hint_convs - 1):
        blocks.append(Block(f"input_hint_block.{2 * k}.", f"controlnet_cond_embedding.blocks.{k - 1}."))
    blocks.append(Block(f"input_hint_block.{2 * (hint_convs - 1)}.", "controlnet_cond_embedding.conv_out."))
    skips = 1 + len(c.channel_mult) * (c.num_res_blocks + 1) - 1
    blocks += [Block(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.") for i in range(skips)]
    blocks.append(Block("middle_block_out.0.", "controlnet_mid_block."))
    return blocks


def is_control_lora(tensors: dict[str, torch.Tensor]) -> bool:
    return "lora_controlnet" in tensors or any(k.endswith((".up", ".down")) for k in tensors)


def from_original(tensors: dict[str, torch.Tensor], c: UNetConfig, source: object) -> dict[str, torch.Tensor]:
    """Original-layout keys (with or without ``control_model.``) -> torchsd's ControlNet names."""
    if any(k.startswith(PREFIX) for k in tensors):
        tensors = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    hint_convs = len({k.split(".")[1] for k in tensors if k.startswith("input_hint_block.")})
    if hint_convs < 2:
        raise CheckpointError(f"{source}: no input_hint_block convolutions: not a ControlNet in the original layout")
    diffusers = rename(tensors, original_blocks(c, hint_convs), to_diffusers=True, what=str(source))
    return from_diffusers_keys(diffusers, "unet")


def hint_config(state: dict[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """The hint's channels and the hint encoder's widths, from its conv weights (torchsd names)."""
    first = state["controlnet_cond_embedding.conv_in.weight"]
    blocks = sorted(int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")
                    and k.endswith(".weight"))
    widths = [first.shape[0]] + [state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0]
                                 for i in blocks if i % 2 == 1]
    return first.shape[1], tuple(widths)


def read_controlnet_state(path: str | Path, c: UNetConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """A ControlNet file or diffusers folder -> (torchsd state dict, diffusers config or {})."""
    path = Path(path)
    config: dict = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
        tensors = read_weights(path)
    else:
        tensors = load_state_dict(path)
        sidecar = path.with_suffix(".json")  # none usually; a diffusers config saved beside a single file
        if sidecar.is_file():
            config = json.loads(sidecar.read_text())
    if is_control_lora(tensors):
        raise CheckpointError(f"{path}: a Control-LoRA file (low-rank changes to the U-Net's encoder, Stability "
                              f"AI's format); torchsd reads full ControlNets only: use the full ControlNet of the "
                              f"same kind (lllyasviel's control_v11*, or a diffusers ControlNetModel)")
    if "controlnet_cond_embedding.conv_in.weight" in tensors:
        state = from_diffusers_keys(tensors, "unet")
    elif any(k.startswith(("input_hint_block.", PREFIX + "input_hint_block.")) for k in tensors):
        state = from_original(tensors, c, path)
    elif any(k.startswith(("adapter.", "body.", "conv_in.")) for k in tensors):
        raise CheckpointError(f"{path}: looks like a T2I-Adapter, not a ControlNet; torchsd does not read "
                              f"T2I-Adapters yet")
    else:
        raise CheckpointError(f"{path}: not a ControlNet: no controlnet_cond_embedding (diffusers) or "
                              f"input_hint_block (original) weights among {len(tensors)} tensors")
    return state, config


def load_controlnet(path: str | Path, unet_config: UNetConfig, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu"):
    """The ControlNet in a file or diffusers folder, for a model whose U-Net has ``unet_config``."""
    from ..models.controlnet import ControlNet, ControlNetConfig

    state, config = read_controlnet_state(path, unet_config)
    hint_channels, widths = hint_config(state)
    # an SD 1.5 ControlNet reads the 4 latent channels also beside an inpainting model's 9-channel U-Net
    unet_config = dataclasses.replace(unet_config, in_channels=state["conv_in.weight"].shape[1])
    net_config = ControlNetConfig(unet_config, hint_channels, widths,
                                  global_pool=bool(config.get("global_pool_conditions", False)))
    with torch.device("meta"):
        net = ControlNet(net_config)
    try:
        check_state(net, state, str(path))
    except CheckpointError as err:
        raise CheckpointError(f"{err}. A ControlNet only fits the model family it was trained for (an SD 1.5 "
                              f"ControlNet on an SD 1.x model, an SD 2.1 one on SD 2.x)") from None
    net.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    return net.eval().requires_grad_(False)


def find_controlnets(folders: list[Path]) -> dict[str, Path]:
    """Control models by name (file stem or folder name) in ``folders``: single files and diffusers folders."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and entry.suffix in SUFFIXES:
                found.setdefault(entry.stem, entry)
            elif entry.is_dir() and (entry / "config.json").is_file():
                found.setdefault(entry.name, entry)
    return found
