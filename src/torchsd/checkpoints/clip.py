"""Joint CLIP models (text + image towers) in the three layouts torchsd reads:

- transformers ``CLIPModel`` folders: config.json + model.safetensors (or a sharded index);
- OpenCLIP / OpenAI CLIP state dicts (``visual.conv1.weight``, ``transformer.resblocks.N.attn.in_proj_weight``),
  as .safetensors, .pt or .bin; the file holds no config, so the shapes give it;
- torchsd's own CLIP files: our module names, the two configs as JSON in the safetensors metadata
  (what ``save_clip`` writes, and what the CLIP trainer produces).

Every loader ends in ``load_into``, which checks the exact key set and every shape before copying.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from ..config import CLIPTextConfig, CLIPVisionConfig
from ..models.clip import CLIP
from .diffusers import load_into
from .io import CheckpointError, load_state_dict, read_weights, safetensors_metadata, save_safetensors

METADATA_KEY = "torchsd_clip"  # safetensors metadata entry holding {"text": {...}, "vision": {...}}

# (ours, transformers) key prefixes of CLIPModel
TRANSFORMERS_PREFIXES = [
    ("text.token_embedding.", "text_model.embeddings.token_embedding."),
    ("text.position_embedding.", "text_model.embeddings.position_embedding."),
    ("text.layers.", "text_model.encoder.layers."),
    ("text.final_layer_norm.", "text_model.final_layer_norm."),
    ("vision.class_embedding", "vision_model.embeddings.class_embedding"),
    ("vision.patch_embedding.", "vision_model.embeddings.patch_embedding."),
    ("vision.position_embedding.", "vision_model.embeddings.position_embedding."),
    ("vision.pre_layernorm.", "vision_model.pre_layrnorm."),  # sic: transformers' spelling
    ("vision.layers.", "vision_model.encoder.layers."),
    ("vision.post_layernorm.", "vision_model.post_layernorm."),
]
TRANSFORMERS_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# what OpenAI's original files carry besides weights (hyper-parameters stored as tensors) and a mask buffer
OPEN_CLIP_IGNORED = ("input_resolution", "context_length", "vocab_size", "attn_mask")
OPEN_CLIP_LAYER = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
                   ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]


def _swap_prefix(key: str, pairs: list[tuple[str, str]], reverse: bool) -> str | None:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def to_transformers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(_swap_prefix(k, TRANSFORMERS_PREFIXES, reverse=False) or k): v for k, v in state.items()}


def from_transformers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # unknown keys pass through unchanged, so that ``load_into`` names them
    return {(_swap_prefix(k, TRANSFORMERS_PREFIXES, reverse=True) or k): v
            for k, v in state.items() if k not in TRANSFORMERS_IGNORED}


# --- transformers configs ------------------------------------------------------------------------

def configs_from_transformers(cfg: dict) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """A ``CLIPConfig`` dict (config.json) -> our pair; missing fields take transformers' defaults."""
    if cfg.get("model_type", "clip") != "clip":
        raise CheckpointError(f"config.json: model_type {cfg.get('model_type')!r} is not 'clip'; torchsd reads "
                              f"CLIP ViT models only")
    text = cfg.get("text_config") or cfg.get("text_config_dict") or {}
    vision = cfg.get("vision_config") or cfg.get("vision_config_dict") or {}
    for name, part in (("text_config", text), ("vision_config", vision)):
        if part.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"config.json: {name}.hidden_act {part['hidden_act']!r} is not supported "
                                  f"(quick_gelu or gelu)")
        if not math.isclose(part.get("layer_norm_eps", 1e-5), 1e-5):
            raise CheckpointError(f"config.json: {name}.layer_norm_eps {part['layer_norm_eps']} is not supported "
                                  f"(torchsd's CLIP uses 1e-5)")
    if vision.get("num_channels", 3) != 3:
        raise CheckpointError(f"config.json: vision_config.num_channels {vision['num_channels']} is not supported (3)")
    projection_dim = cfg.get("projection_dim", 512)  # CLIPModel projects both towers to this width
    # the token ids are those of torchsd's CLIP tokenizer (old configs say eos 2, meaning "the largest id")
    text_config = CLIPTextConfig(
        vocab_size=text.get("vocab_size", 49408), max_positions=text.get("max_position_embeddings", 77),
        width=text.get("hidden_size", 512), num_layers=text.get("num_hidden_layers", 12),
        num_heads=text.get("num_attention_heads", 8), ffn_dim=text.get("intermediate_size", 2048),
        activation=text.get("hidden_act", "quick_gelu"), projection_dim=projection_dim)
    vision_config = CLIPVisionConfig(
        image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
        width=vision.get("hidden_size", 768), num_layers=vision.get("num_hidden_layers", 12),
        num_heads=vision.get("num_attention_heads", 12), ffn_dim=vision.get("intermediate_size", 3072),
        activation=vision.get("hidden_act", "quick_gelu"), projection_dim=projection_dim)
    return text_config, vision_config


def configs_to_transformers(text: CLIPTextConfig, vision: CLIPVisionConfig) -> dict:
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": text.projection_dim,
        "logit_scale_init_value": 2.6592, "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model", "vocab_size": text.vocab_size,
            "max_position_embeddings": text.max_positions, "hidden_size": text.width,
            "num_hidden_layers": text.num_layers, "num_attention_heads": text.num_heads,
            "intermediate_size": text.ffn_dim, "hidden_act": text.activation, "projection_dim": text.projection_dim,
            "layer_norm_eps": 1e-5, "pad_token_id": text.pad_token_id, "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id},
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": vision.image_size, "patch_size": vision.patch_size,
            "hidden_size": vision.width, "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads, "intermediate_size": vision.ffn_dim,
            "hidden_act": vision.activation, "projection_dim": vision.projection_dim, "layer_norm_eps": 1e-5,
            "num_channels": 3},
    }


def read_transformers_folder(folder: Path) -> tuple[CLIPTextConfig, CLIPVisionConfig, dict[str, torch.Tensor]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; a transformers CLIPModel folder holds config.json and "
                              f"model.safetensors")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON: {err}") from None
    text, vision = configs_from_transformers(cfg)
    return text, vision, from_transformers_keys(read_weights(folder))


# --- OpenCLIP / OpenAI state dicts ---------------------------------------------------------------

def from_open_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP names -> ours: fused q/k/v split in three, (in, out) projection matrices transposed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")  # checkpoints saved from DistributedDataParallel
        if key in OPEN_CLIP_IGNORED:
            continue
        tower, rest = ("vision", key[len("visual."):]) if key.startswith("visual.") else ("text", key)
        if rest.startswith("transformer.resblocks."):
            index, name = rest[len("transformer.resblocks."):].split(".", 1)
            prefix = f"{tower}.layers.{index}."
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = name.rsplit("_", 1)[1]  # weight or bias
                for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = chunk
                continue
            renamed = _swap_prefix(name, OPEN_CLIP_LAYER, reverse=False)
            out[prefix + (renamed or name)] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.T
        else:
            renamed = {
                "token_embedding.weight": "text.token_embedding.weight",
                "positional_embedding": "text.position_embedding.weight",
                "ln_final.weight": "text.final_layer_norm.weight", "ln_final.bias": "text.final_layer_norm.bias",
                "visual.class_embedding": "vision.class_embedding",
                "visual.positional_embedding": "vision.position_embedding.weight",
                "visual.conv1.weight": "vision.patch_embedding.weight",
                "visual.ln_pre.weight": "vision.pre_layernorm.weight",
                "visual.ln_pre.bias": "vision.pre_layernorm.bias",
                "visual.ln_post.weight": "vision.post_layernorm.weight",
                "visual.ln_post.bias": "vision.post_layernorm.bias",
            }.get(key, key)
            out[renamed] = value
    return out


def configs_from_open_clip(state: dict[str, torch.Tensor], *, activation: str, head_width: int = 64,
                           source: str = "checkpoint") -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """Our configs from the shapes of an OpenCLIP state dict already renamed by ``from_open_clip_keys``.

    The head counts are not in the shapes: OpenCLIP and OpenAI use heads of ``head_width`` = 64."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: no {key!r} in the state dict; it is not an OpenCLIP ViT CLIP "
                                  f"(ResNet image towers and timm/HF towers are not supported)")
        return tuple(state[key].shape)

    def depth(tower: str) -> int:
        return len({k.split(".")[2] for k in state if k.startswith(f"{tower}.layers.")})

    vocab_size, text_width = shape("text.token_embedding.weight")
    vision_width, _, patch, _ = shape("vision.patch_embedding.weight")
    grid = math.isqrt(shape("vision.position_embedding.weight")[0] - 1)
    try:
        text = CLIPTextConfig(
            vocab_size=vocab_size, max_positions=shape("text.position_embedding.weight")[0], width=text_width,
            num_layers=depth("text"), num_heads=max(1, text_width // head_width),
            ffn_dim=shape("text.layers.0.mlp.fc1.weight")[0], activation=activation,
            projection_dim=shape("text_projection.weight")[0])
        vision = CLIPVisionConfig(
            image_size=grid * patch, patch_size=patch, width=vision_width, num_layers=depth("vision"),
            num_heads=max(1, vision_width // head_width), ffn_dim=shape("vision.layers.0.mlp.fc1.weight")[0],
            activation=activation, projection_dim=shape("visual_projection.weight")[0])
    except ValueError as err:
        raise CheckpointError(f"{source}: the shapes give no valid CLIP config: {err}") from None
    return text, vision


# --- loading and saving --------------------------------------------------------------------------

def read_clip(path: str | Path, *, activation: str | None = None, head_width: int = 64
              ) -> tuple[CLIPTextConfig, CLIPVisionConfig, dict[str, torch.Tensor]]:
    """The configs and state dict (our names) of a CLIP in any layout torchsd reads.

    ``activation`` matters only for OpenCLIP files, which do not record it: None means quick-GELU for
    OpenAI's files (recognised by their ``input_resolution`` entry) and GELU, OpenCLIP's default, otherwise.
    Pass "quick_gelu" for OpenCLIP's ``*-quickgelu`` models. ``head_width``: see ``configs_from_open_clip``."""
    path = Path(path)
    if path.is_dir():
        return read_transformers_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder; give a transformers CLIPModel folder, an OpenCLIP "
                              f"state dict (.safetensors/.pt/.bin) or a CLIP saved by torchsd")
    state = load_state_dict(path)
    if path.suffix == ".safetensors":
        metadata = safetensors_metadata(path)
        if METADATA_KEY in metadata:
            return (*_configs_from_metadata(metadata[METADATA_KEY], path), state)
    keys = {k.removeprefix("module.") for k in state}
    if "visual.conv1.weight" in keys or "visual.proj" in keys:
        if activation is None:
            activation = "quick_gelu" if "input_resolution" in keys else "gelu"
        ours = from_open_clip_keys(state)
        return (*configs_from_open_clip(ours, activation=activation, head_width=head_width, source=str(path)), ours)
    if any(k.startswith("vision_model.") for k in keys):
        raise CheckpointError(f"{path}: a transformers CLIPModel needs its config.json: pass the folder that "
                              f"holds both, not the weights file")
    raise CheckpointError(f"{path}: not a CLIP model (no 'visual.conv1.weight' of OpenCLIP, no transformers "
                          f"'vision_model.*' keys, no torchsd CLIP metadata)")


def _configs_from_metadata(text: str, path: Path) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    try:
        data = json.loads(text)
        return CLIPTextConfig(**data["text"]), CLIPVisionConfig(**data["vision"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: the {METADATA_KEY!r} metadata is not a valid pair of CLIP configs: {err}") from None


def load_clip(path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              activation: str | None = None, head_width: int = 64) -> CLIP:
    """A joint CLIP in eval mode, without gradients on its weights. See ``read_clip`` for the layouts."""
    text, vision, state = read_clip(path, activation=activation, head_width=head_width)
    try:
        with torch.device("meta"):
            clip = CLIP(text, vision)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    clip.to_empty(device="cpu")
    load_into(clip, state, f"{path} (CLIP)")
    return clip.eval().requires_grad_(False).to(device=device, dtype=dtype)


def save_clip(clip: CLIP, path: str | Path, *, format: str = "torchsd", dtype: torch.dtype | None = None) -> None:
    """``format="torchsd"``: one .safetensors file with both configs in its metadata (``load_clip`` reads it);
    ``"transformers"``: a CLIPModel folder (config.json + model.safetensors) that transformers can load."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in clip.state_dict().items()}
    text, vision = clip.text.config, clip.vision.config
    path = Path(path)
    if format == "torchsd":
        if path.suffix != ".safetensors":
            raise ValueError(f"a torchsd CLIP is saved as .safetensors; got {path.name!r}")
        configs = json.dumps({"text": dataclasses.asdict(text), "vision": dataclasses.asdict(vision)})
        save_safetensors(state, path, metadata={"format": "pt", METADATA_KEY: configs})
    elif format == "transformers":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(configs_to_transformers(text, vision), indent=2))
        save_safetensors(to_transformers_keys(state), path / "model.safetensors", metadata={"format": "pt"})
    else:
        raise ValueError(f"format must be 'torchsd' or 'transformers'; got {format!r}")
