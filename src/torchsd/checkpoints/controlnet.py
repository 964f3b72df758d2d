"""ControlNet files, as they are found:

- lllyasviel's original layout (``control_v11p_sd15_canny.pth``, ``.safetensors``): the ldm U-Net's encoder
  names (``input_blocks``, ``middle_block``, ``time_embed``, for SDXL's shapes also ``label_emb``, as sgm's U-Net
  and ComfyUI name it; diffusers' single-file reader does not read that one) plus ``input_hint_block.{0,2,…,14}``,
  ``zero_convs.{i}.0`` and ``middle_block_out.0``, with or without a ``control_model.`` prefix (the first
  ControlNet 1.0 files hold a whole SD model beside it: only the ``control_model.`` part is read);
- diffusers' ControlNetModel: a folder (``config.json`` + weights) or its weights file alone.

The ControlNet's U-Net part must match the model it steers (an SD 1.x ControlNet on an SD 1.x model, an
SDXL one on an SDXL base): its text-context width, channels and added embedding (SDXL's ``add_embedding``,
diffusers' ``addition_embed_type="text_time"``) are checked against the model's, with a message naming both
families. The hint encoder's widths and each level's transformer depth (SDXL's "mid" and "small" ControlNets
have fewer transformer blocks than the U-Net) are read from the weights. Stability's "Control-LoRA" files
(low-rank deltas of the U-Net's encoder) are refused by name.
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
    if "input_blocks.0.0.weight" in tensors:  # the names below follow c: another family's would not map
        _check_family(tensors, "input_blocks.0.0.weight", "label_emb.0.0.weight", c, source)
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


def family_of(context_dim: int, added: bool) -> str:
    """A family's name for messages, from a U-Net's context width and whether it has SDXL's added embedding."""
    if added:
        return "SDXL"
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(context_dim, "SD 1.x/2.x")


def check_fits(state: dict[str, torch.Tensor], c: UNetConfig, source: object) -> None:
    """Refuse, saying which family each is, a ControlNet (torchsd names) whose U-Net part cannot steer a U-Net
    with config ``c``: another text-context width, base width or added embedding."""
    _check_family(state, "conv_in.weight", "add_embedding.linear_1.weight", c, source)


def _check_family(state: dict[str, torch.Tensor], conv_in: str, added_key: str, c: UNetConfig, source: object
                  ) -> None:
    """check_fits on the names of either layout: ``conv_in`` and ``added_key`` name the first conv's and the added
    embedding's first weights."""
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    context = int(to_k.shape[1]) if to_k is not None else c.context_dim
    channels = int(state[conv_in].shape[0])
    added = state.get(added_key)
    added_dim = 0 if added is None else int(added.shape[1])
    if (context, channels, added_dim) == (c.context_dim, c.model_channels, c.added_embed_dim):
        return
    ours, theirs = family_of(context, added is not None), family_of(c.context_dim, bool(c.added_embed_dim))
    raise CheckpointError(
        f"{source}: an {ours} ControlNet ({context}-wide text context, {channels} channels"
        f"{f', added vector of {added_dim}' if added_dim else ', no added vector'}) does not fit this {theirs} "
        f"model ({c.context_dim}-wide context, {c.model_channels} channels"
        f"{f', added vector of {c.added_embed_dim}' if c.added_embed_dim else ', no added vector'}): a ControlNet "
        f"only steers the model family it was trained for; use an {theirs} ControlNet")


def transformer_depths(state: dict[str, torch.Tensor], c: UNetConfig) -> dict:
    """The transformer blocks per level and in the middle, counted in the weights (where there are any)."""
    def count(prefix: str) -> int:
        found = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
        return 1 + max(found) if found else 0

    depths = tuple(count(f"down_blocks.{level}.attentions.0.transformer_blocks.") or d
                   for level, d in enumerate(c.transformer_depth))
    mid = count("mid_block.attentions.0.transformer_blocks.") or c.mid_transformer_depth
    return {"transformer_depth": depths, "mid_transformer_depth": mid}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_weights(path) if path.is_dir() else load_state_dict(path)


def read_controlnet_state(path: str | Path, c: UNetConfig, tensors: dict[str, torch.Tensor] | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict]:
    """A ControlNet file or diffusers folder -> (torchsd state dict, diffusers config or {}). ``tensors``: the
    file's, where the caller has read them already."""
    path = Path(path)
    config: dict = {}
    tensors = read_tensors(path) if tensors is None else tensors
    if path.is_dir():
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
    else:
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
    elif is_adapter(tensors):
        raise CheckpointError(f"{path}: a T2I-Adapter, not a ControlNet; load it with load_control_model")
    else:
        raise CheckpointError(f"{path}: not a ControlNet: no controlnet_cond_embedding (diffusers) or "
                              f"input_hint_block (original) weights among {len(tensors)} tensors")
    return state, config


def load_controlnet(path: str | Path, unet_config: UNetConfig, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", tensors: dict[str, torch.Tensor] | None = None):
    """The ControlNet in a file or diffusers folder, for a model whose U-Net has ``unet_config``."""
    from ..models.controlnet import ControlNet, ControlNetConfig

    state, config = read_controlnet_state(path, unet_config, tensors)
    check_fits(state, unet_config, path)
    hint_channels, widths = hint_config(state)
    # an SD 1.5 ControlNet reads the 4 latent channels also beside an inpainting model's 9-channel U-Net
    unet_config = dataclasses.replace(unet_config, in_channels=state["conv_in.weight"].shape[1],
                                      **transformer_depths(state, unet_config))
    net_config = ControlNetConfig(unet_config, hint_channels, widths,
                                  global_pool=bool(config.get("global_pool_conditions", False)))
    with torch.device("meta"):
        net = ControlNet(net_config)
    try:
        check_state(net, state, str(path))
    except CheckpointError as err:
        raise CheckpointError(f"{err}. A ControlNet only fits the model family it was trained for (an SD 1.5 "
                              f"ControlNet on an SD 1.x model, an SD 2.1 one on SD 2.x, an SDXL one on an SDXL "
                              f"base)") from None
    net.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    return net.eval().requires_grad_(False)


def save_controlnet(net, path: str | Path, *, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None) -> None:
    """A ControlNet as one ``.safetensors`` file in diffusers' ControlNetModel key layout (what
    ``load_controlnet`` and diffusers' single-file readers take); ``dtype``: e.g. torch.float16 to halve it."""
    from .diffusers import to_diffusers_keys
    from .io import save_safetensors

    state = {k: (v if dtype is None else v.to(dtype)) for k, v in net.state_dict().items()}
    save_safetensors(to_diffusers_keys(state, "unet"), path, metadata=metadata)


def find_controlnets(folders: list[Path]) -> dict[str, Path]:
    """Control models by name (file stem or folder name) in ``folders``: single files and diffusers folders
    (ControlNets, T2I- and IP-Adapters; an IP-Adapter's ``image_encoder/`` is not a model of its own)."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and entry.suffix in SUFFIXES:
                found.setdefault(entry.stem, entry)
            elif entry.is_dir() and entry.name != "image_encoder" and (entry / "config.json").is_file():
                found.setdefault(entry.name, entry)
    return found


# --- T2I-Adapters ------------------------------------------------------------------------------------------

def is_adapter(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("adapter.body.", "body.")) for k in tensors) and \
        any(k.endswith("conv_in.weight") for k in tensors)


def adapter_from_original(tensors: dict[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
    """TencentARC's flat layout (``body.{level * blocks + j}.block1``, ``in_conv`` on a level's first block) ->
    torchsd's (``body.{level}.resnets.{j}.block1``, ``body.{level}.in_conv``)."""
    indices = {int(k.split(".")[1]) for k in tensors if k.startswith("body.")}
    widths = {}
    for n in sorted(indices):
        widths[n] = tensors[f"body.{n}.block1.weight"].shape[0]
    blocks = 1  # blocks per level: the run of equal widths up to the first in_conv after block 0
    starts = [n for n in sorted(indices) if f"body.{n}.in_conv.weight" in tensors]
    if starts:
        blocks = starts[0]
    elif len(set(widths.values())) == 1:
        raise CheckpointError(f"{source}: cannot tell the T2I-Adapter's blocks per level (no in_conv weights)")
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] == "conv_in":
            out[key] = value
        elif parts[0] == "body" and parts[2] in ("block1", "block2"):
            n = int(parts[1])
            out[f"body.{n // blocks}.resnets.{n % blocks}.{'.'.join(parts[2:])}"] = value
        elif parts[0] == "body" and parts[2] == "in_conv" and int(parts[1]) % blocks == 0:
            out[f"body.{int(parts[1]) // blocks}.{'.'.join(parts[2:])}"] = value
        else:
            raise CheckpointError(f"{source}: no rule maps the T2I-Adapter key {key!r} (older adapters with "
                                  f"'skep' convolutions are not read; use a diffusers T2IAdapter)")
    return out


def adapter_layout(path: Path, downscale: int, latent_downscale: int) -> str:
    """``full_adapter`` (SD 1.x/2.x) or ``full_adapter_xl`` (SDXL): a diffusers folder's config.json says; a
    single file's weights do not (the two have the same keys), but its unshuffle factor does: the VAE's for
    SD 1.x/2.x, twice the VAE's for SDXL (16: its first feature has the size of SDXL's second level)."""
    config_file = path / "config.json" if path.is_dir() else path.with_suffix(".json")
    if config_file.is_file():
        layout = json.loads(config_file.read_text()).get("adapter_type", "full_adapter")
        if layout not in ("full_adapter", "full_adapter_xl"):
            raise CheckpointError(f"{path}: a T2I-Adapter of type {layout!r}; torchsd reads the full adapters "
                                  f"(adapter_type full_adapter for SD 1.x/2.x, full_adapter_xl for SDXL)")
        return layout
    return "full_adapter_xl" if downscale == 2 * latent_downscale else "full_adapter"


def load_adapter(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 tensors: dict[str, torch.Tensor] | None = None, latent_downscale: int = 8):
    """A T2I-Adapter ("full adapter", SD 1.x/2.x, or "full adapter XL", SDXL): diffusers' folder or file
    (``adapter.`` keys) or TencentARC's original file. The config is read from the weights' shapes, the layout
    as ``adapter_layout`` says (``latent_downscale``: the VAE's factor of the model it will steer)."""
    from ..models.adapter import AdapterConfig, T2IAdapter

    path = Path(path)
    tensors = read_tensors(path) if tensors is None else tensors
    if not is_adapter(tensors):
        raise CheckpointError(f"{path}: not a T2I-Adapter (no conv_in and body weights)")
    if any(k.startswith("adapter.") for k in tensors):
        state = {k.removeprefix("adapter."): v for k, v in tensors.items()}
    else:
        state = adapter_from_original(tensors, path)
    levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    blocks = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("body.0.resnets."))
    widths = tuple(state[f"body.{i}.resnets.0.block1.weight"].shape[0] for i in range(levels))
    unshuffled = state["conv_in.weight"].shape[1]
    hint_channels = 1 if unshuffled % 3 else 3  # the sketch adapter reads one channel: 64 = 1 * 8**2
    downscale = round((unshuffled / hint_channels) ** 0.5)
    config = AdapterConfig(hint_channels, widths, blocks, downscale,
                           layout=adapter_layout(path, downscale, latent_downscale))
    with torch.device("meta"):
        adapter = T2IAdapter(config)
    check_state(adapter, state, str(path))
    adapter.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    return adapter.eval().requires_grad_(False)


def load_control_model(path: str | Path, unet_config: UNetConfig, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", latent_downscale: int = 8):
    """A ControlNet or a T2I-Adapter, whichever the file holds (``latent_downscale``: the VAE's factor, which
    tells an SDXL adapter's single file from an SD 1.x/2.x one's: ``adapter_layout``)."""
    path = Path(path)
    tensors = read_tensors(path)  # once: a ControlNet file is 1.4 GB
    if is_adapter(tensors) and not any("input_hint_block" in k or "controlnet_cond_embedding" in k for k in tensors):
        return load_adapter(path, dtype=dtype, device=device, tensors=tensors, latent_downscale=latent_downscale)
    return load_controlnet(path, unet_config, dtype=dtype, device=device, tensors=tensors)
