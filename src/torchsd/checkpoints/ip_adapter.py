"""IP-Adapter files as tencent-ailab and h94/IP-Adapter publish them:

- ``ip-adapter_sd15.bin`` (a pickle, read with ``weights_only``): {"image_proj": {...}, "ip_adapter": {...}};
- ``ip-adapter_sd15.safetensors``: the same, flat, under ``image_proj.`` and ``ip_adapter.``.

``ip_adapter`` holds ``{n}.to_k_ip.weight`` / ``{n}.to_v_ip.weight`` with n = 2k + 1 for the k-th
cross-attention layer in the order diffusers lists its attention processors (down blocks, up blocks, middle);
torchsd's U-Net runs them down, middle, up, so the numbering is mapped by name. The basic adapter
(``image_proj.proj``/``norm``) and "Plus" (``image_proj.latents`` …, the Resampler) are read; FaceID and
"full face" adapters are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .diffusers import check_state
from .io import CheckpointError, load_state_dict

HEAD_DIM = 64  # the Resampler's head width in every published "Plus" adapter (diffusers assumes it too)


def file_slots(layer_names: list[str]) -> list[int]:
    """For each cross-attention layer in torchsd's order (by module name: ``down_blocks.…``, ``mid_block.…``,
    ``up_blocks.…``), its number in the files: 2k + 1 for position k in the order down, up, middle."""
    rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
    file_order = sorted(range(len(layer_names)), key=lambda i: (rank[layer_names[i].split(".")[0]], i))
    slots = [0] * len(layer_names)
    for k, i in enumerate(file_order):
        slots[i] = 2 * k + 1
    return slots


def read_ip_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(image_proj, ip_adapter) tensors of a .bin or .safetensors IP-Adapter file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        flat = load_state_dict(path)
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - the unpickler fails in many ways on foreign files
            raise CheckpointError(f"{path}: not a readable IP-Adapter file (only tensors are loaded, nothing "
                                  f"executed): {type(err).__name__}: {err}") from None
        if not (isinstance(obj, dict) and isinstance(obj.get("image_proj"), dict)
                and isinstance(obj.get("ip_adapter"), dict)):
            raise CheckpointError(f"{path}: not an IP-Adapter file: expected the keys 'image_proj' and 'ip_adapter'")
        flat = {f"image_proj.{k}": v for k, v in obj["image_proj"].items()} | \
            {f"ip_adapter.{k}": v for k, v in obj["ip_adapter"].items()}
    image_proj = {k.removeprefix("image_proj."): v for k, v in flat.items() if k.startswith("image_proj.")}
    layers = {k.removeprefix("ip_adapter."): v for k, v in flat.items() if k.startswith("ip_adapter.")}
    if not image_proj or not layers or len(image_proj) + len(layers) != len(flat):
        raise CheckpointError(f"{path}: not an IP-Adapter file: every key must start with image_proj. or ip_adapter.")
    return image_proj, layers


def ip_adapter_config(image_proj: dict[str, torch.Tensor], source: object):
    from ..models.ip_adapter import IPAdapterConfig

    if "proj.3.weight" in image_proj or any(k.startswith("perceiver_resampler.") for k in image_proj) or \
            ("norm.weight" in image_proj and "proj.weight" not in image_proj):
        raise CheckpointError(f"{source}: an IP-Adapter FaceID or full-face model; torchsd reads the basic and "
                              f"'Plus' IP-Adapters only")
    if "proj.weight" in image_proj:
        context_dim = image_proj["norm.weight"].shape[0]
        return IPAdapterConfig(image_dim=image_proj["proj.weight"].shape[1], context_dim=context_dim,
                               tokens=image_proj["proj.weight"].shape[0] // context_dim)
    if "latents" not in image_proj:
        raise CheckpointError(f"{source}: unknown IP-Adapter image projection (no proj.weight nor latents)")
    _, tokens, hidden = image_proj["latents"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in image_proj if k.startswith("layers."))
    return IPAdapterConfig(image_dim=image_proj["proj_in.weight"].shape[1],
                           context_dim=image_proj["proj_out.weight"].shape[0], tokens=tokens, plus=True,
                           hidden_dim=hidden, depth=depth, head_dim=HEAD_DIM,
                           heads=image_proj["layers.0.0.to_q.weight"].shape[0] // HEAD_DIM,
                           ffn_mult=image_proj["layers.0.1.1.weight"].shape[0] // hidden)


def load_ip_adapter(path: str | Path, unet, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu"):
    """The IP-Adapter in ``path`` for a torchsd U-Net (its cross-attention layers name the weights)."""
    from ..models.ip_adapter import IPAdapter

    image_proj, layers = read_ip_adapter_file(path)
    config = ip_adapter_config(image_proj, path)
    names = [n for n, m in unet.named_modules() if hasattr(m, "attn2")]
    widths = [m.attn2.to_q.out_features for m in unet.modules() if hasattr(m, "attn2")]
    slots = file_slots(names)
    present = {int(m[1]) for k in layers if (m := re.match(r"(\d+)\.to_[kv]_ip\.weight$", k))}
    if present != set(slots) or len(layers) != 2 * len(slots):
        raise CheckpointError(f"{path}: the IP-Adapter has {len(layers) // 2} cross-attention layers "
                              f"({len(layers)} tensors), the model {len(slots)}: it is for another model family")
    state = {f"image_proj.{k}": v for k, v in image_proj.items()}
    for i, slot in enumerate(slots):
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"layers.{i}.{kind}.weight"] = layers[f"{slot}.{kind}.weight"]
    with torch.device("meta"):
        adapter = IPAdapter(config, widths)
    try:
        check_state(adapter, state, str(path))
    except CheckpointError as err:
        raise CheckpointError(f"{err}. An IP-Adapter only fits the model family it was trained for") from None
    adapter.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    return adapter.eval().requires_grad_(False)


def load_image_encoder(folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A transformers CLIPVisionModelWithProjection folder (config.json + weights), as IP-Adapters ship their
    ``image_encoder/``."""
    import json

    from ..config import CLIPVisionConfig
    from ..models.ip_adapter import ImageEncoder
    from .clip import from_transformers_keys
    from .io import read_weights

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not an image encoder folder: it needs config.json and the weights of a "
                              f"CLIPVisionModelWithProjection (h94/IP-Adapter's models/image_encoder)")
    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("vision_config", cfg)  # a whole CLIPModel's config holds the tower's under vision_config
    config = CLIPVisionConfig(
        image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 32), width=cfg.get("hidden_size", 768),
        num_layers=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 12),
        ffn_dim=cfg.get("intermediate_size", 3072), activation=cfg.get("hidden_act", "quick_gelu"),
        projection_dim=cfg.get("projection_dim", 512))
    state = {k: v for k, v in from_transformers_keys(read_weights(folder)).items()
             if k.startswith(("vision.", "visual_projection."))}
    with torch.device("meta"):
        encoder = ImageEncoder(config)
    check_state(encoder, state, str(folder))
    encoder.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, assign=True)
    return encoder.eval().requires_grad_(False)
