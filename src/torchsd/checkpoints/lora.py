"""LoRA (Hu et al. 2021): low-rank weight updates W' = W + scale · (alpha / rank) · up @ down.

Two file layouts are read, for the U-Net and the text encoder, for Linear and Conv2d layers:
- kohya (sd-scripts, AUTOMATIC1111): ``lora_unet_<diffusers path with _>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, and ``lora_te_text_model_…`` for the text encoder. Conv layers have
  down (rank, in, kh, kw) and up (out, rank, 1, 1). A missing alpha means alpha = rank.
- diffusers/PEFT: ``unet.<path>.lora_A.weight`` (= down) / ``lora_B.weight`` (= up) and
  ``text_encoder.[text_model.]<path>…``; alpha from the file's ``lora_adapter_metadata`` (lora_alpha,
  alpha_pattern, use_rslora) or ``.alpha`` keys, else alpha = rank.

Weights are merged for a run and restored from copies afterwards (``merged_loras``), which is what
AUTOMATIC1111 does: no per-step cost, and the model's weights after the run are bit-identical to
before. While a run with LoRAs is going, the shared modules hold merged weights: runs on one pipeline
that use different LoRAs must not overlap.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Protocol

import torch
from torch import nn

from .diffusers import TEXT_PREFIX, TEXT_RULES, UNET_RULES, _rename
from .io import CheckpointError, file_sha256, load_state_dict, safetensors_metadata
from .library import FileLibrary


class Networks(Protocol):
    """What LoRA files are read against and merged into: a pipeline's U-Net and text encoder."""

    unet: nn.Module
    text_encoder: nn.Module

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class LoraLayer:
    component: str  # "unet" or "text_encoder"
    module: str  # torchsd module path inside that component
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    scale: float  # alpha / rank (or alpha / sqrt(rank) for rank-stabilised LoRA)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """up @ down · scale in float32 on ``device``, shaped (out, in·kh·kw); the caller reshapes it."""
        if self.up.ndim == 4 and self.up.shape[2:] != (1, 1):
            raise CheckpointError(f"LoRA layer {self.module}: up weights with a {tuple(self.up.shape[2:])} kernel "
                                  f"are not supported (only 1x1 up projections)")
        up, down = (t.to(device, torch.float32).flatten(1) for t in (self.up, self.down))
        return (up @ down) * self.scale


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    layers: tuple[LoraLayer, ...]


@dataclass(frozen=True)
class AppliedLora:
    lora: LoraFile
    text_encoder_scale: float
    unet_scale: float


# --- names -----------------------------------------------------------------------------------------

def module_names(sd: Networks) -> dict[str, tuple[str, str]]:
    """Every LoRA-able layer's kohya and PEFT names -> (component, torchsd module path)."""
    names: dict[str, tuple[str, str]] = {}
    for component, model in (("unet", sd.unet), ("text_encoder", sd.text_encoder)):
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if component == "unet":
                theirs = _rename(path + ".weight", UNET_RULES)[: -len(".weight")]
                kohya, peft = "lora_unet_" + theirs.replace(".", "_"), ["unet." + theirs]
            else:
                theirs = TEXT_PREFIX + _rename(path + ".weight", TEXT_RULES)[: -len(".weight")]
                kohya = "lora_te_" + theirs.replace(".", "_")
                # recent transformers drop the text_model. nesting; files exist both ways
                peft = ["text_encoder." + theirs, "text_encoder." + theirs[len(TEXT_PREFIX):]]
            for name in [kohya, *peft]:
                names[name] = (component, path)
    return names


# --- reading files ---------------------------------------------------------------------------------

def load_lora(path: str | Path, sd: Networks, name: str | None = None) -> LoraFile:
    """Read a kohya or PEFT LoRA file and match its layers to ``sd``'s modules (shapes checked)."""
    path = Path(path)
    state = load_state_dict(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    _refuse_other_adapters(state, path)
    if any(k.endswith(".lora_down.weight") for k in state):
        pairs = _kohya_pairs(state)
    elif any(".lora_A." in k for k in state):
        pairs = _peft_pairs(state, metadata)
    else:
        raise CheckpointError(f"{path}: not a LoRA file torchsd reads: expected kohya keys (…lora_down.weight / "
                              f"lora_up.weight) or diffusers/PEFT keys (…lora_A.weight / lora_B.weight); "
                              f"first keys: {', '.join(sorted(state)[:3])}")
    names = module_names(sd)
    layers, unmatched = [], []
    for key, (down, up, scale) in pairs.items():
        if key not in names:
            unmatched.append(key)
            continue
        component, module_path = names[key]
        layers.append(LoraLayer(component, module_path, down, up, scale))
        _check_shape(layers[-1], weight_of(sd, layers[-1]), path)
    if not layers:
        raise CheckpointError(f"{path}: none of its {len(pairs)} LoRA layers belong to this model (first: "
                              f"{', '.join(unmatched[:3])}); it was made for another architecture (SDXL?)")
    if unmatched:
        import warnings

        warnings.warn(f"{path.name}: {len(unmatched)} LoRA layers have no matching module and are ignored "
                      f"(first: {', '.join(unmatched[:3])})", stacklevel=2)
    return LoraFile(name or path.stem, path, tuple(layers))


def _refuse_other_adapters(state: dict[str, torch.Tensor], path: Path) -> None:
    kinds = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
             ".lora_mid.": "LoCon with a Tucker core", "lora_te1_": "SDXL", "lora_te2_": "SDXL"}
    for marker, kind in kinds.items():
        if any(marker in k for k in state):
            raise CheckpointError(f"{path}: a {kind} file; torchsd applies plain LoRA (kohya lora_down/lora_up "
                                  f"or PEFT lora_A/lora_B) to SD 1.x/2.x models")


def _kohya_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    pairs = {}
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        down, up = state[key], state.get(name + ".lora_up.weight")
        if up is None:
            raise CheckpointError(f"LoRA layer {name}: lora_down without lora_up; the file is incomplete")
        rank = down.shape[0]
        alpha = float(state[name + ".alpha"]) if name + ".alpha" in state else float(rank)
        pairs[name] = (down, up, alpha / rank)
    return pairs


def _peft_pairs(state: dict[str, torch.Tensor], metadata: dict[str, str]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    configs = _peft_configs(metadata)
    pairs = {}
    for key in state:
        if ".lora_A." not in key or not key.endswith(".weight"):
            continue
        name = key.split(".lora_A.")[0]
        down, up = state[key], state.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            raise CheckpointError(f"LoRA layer {name}: lora_A without lora_B; the file is incomplete")
        rank = down.shape[0]
        component, _, module = name.partition(".")
        config = configs.get(component, {})
        alpha = float(state[name + ".alpha"]) if name + ".alpha" in state else _peft_alpha(config, module, rank)
        scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
        pairs[name] = (down, up, scale)
    return pairs


def _peft_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers stores each component's LoraConfig in ``lora_adapter_metadata`` as "unet.lora_alpha" etc."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"the LoRA's lora_adapter_metadata is not valid JSON: {err}") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        configs.setdefault(component, {})[field_name] = value
    return configs


def _peft_alpha(config: dict, module: str, rank: int) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return float(alpha)
    return float(config.get("lora_alpha", rank))


def weight_of(sd: Networks, layer: LoraLayer) -> torch.Tensor:
    return getattr(sd, layer.component).get_submodule(layer.module).weight


def _check_shape(layer: LoraLayer, weight: torch.Tensor, path: Path) -> None:
    out_features, in_size = weight.shape[0], weight[0].numel()
    if layer.up.shape[0] != out_features or layer.down[0].numel() != in_size or \
            layer.up.shape[1] != layer.down.shape[0]:
        raise CheckpointError(f"{path}: LoRA layer {layer.module} has down {tuple(layer.down.shape)} and up "
                              f"{tuple(layer.up.shape)}, which do not fit the weight {tuple(weight.shape)}: the "
                              f"LoRA was made for another model family (SD 1.x vs 2.x?)")


def lora_shorthash(path: Path) -> str:
    """AUTOMATIC1111's "Lora hashes" value: sha256[:12] of a safetensors file's tensor data (the kohya
    "addnet" hash, which ignores the metadata header), or of the whole file otherwise."""
    if path.suffix != ".safetensors":
        return file_sha256(path)[:12]
    with open(path, "rb") as f:
        header_length = struct.unpack("<Q", f.read(8))[0]
    return file_sha256(path, offset=8 + header_length)[:12]


# --- where LoRAs come from -------------------------------------------------------------------------

@dataclass
class LoraLibrary(FileLibrary):
    """A pipeline's LoRA folders: ``<lora:name:w>`` names are file names (without suffix) found in them."""

    suffixes: ClassVar[tuple[str, ...]] = SUFFIXES
    missing_folder: ClassVar[str] = "LoRA folder {folder!r} does not exist; give a folder holding .safetensors LoRA files"

    def resolve(self, name_or_path: str | Path) -> Path:
        path = Path(name_or_path)
        if path.suffix in SUFFIXES and path.is_file():
            return path
        files = self.files()
        if str(name_or_path) in files:
            return files[str(name_or_path)]
        if not self.dirs:
            raise ValueError(f"unknown LoRA {str(name_or_path)!r}: no LoRA folder is set (--lora-dir DIR, or "
                             f"sd.loras.add_dir(DIR)) and it is not a LoRA file path")
        available = ", ".join(sorted(files)[:50]) or "none"
        raise ValueError(f"unknown LoRA {str(name_or_path)!r}; available in "
                         f"{', '.join(map(str, self.dirs))}: {available}")

    def load(self, path: Path, sd: Networks) -> LoraFile:
        return self.cached(path, lambda: load_lora(path, sd))

    def shorthash(self, path: Path) -> str:
        return self.file_hash(path, lora_shorthash)


# --- applying ----------------------------------------------------------------------------------------

@contextmanager
def merged_loras(sd: Networks, loras: list[AppliedLora]) -> Iterator[None]:
    """Add the LoRA deltas to the weights for the duration of the block, then restore the exact originals."""
    backups: dict[tuple[str, str], torch.Tensor] = {}
    try:
        with torch.no_grad():
            for applied in loras:
                for layer in applied.lora.layers:
                    multiplier = applied.unet_scale if layer.component == "unet" else applied.text_encoder_scale
                    if multiplier == 0:
                        continue
                    weight = weight_of(sd, layer)
                    key = (layer.component, layer.module)
                    if key not in backups:
                        backups[key] = weight.detach().clone()
                    delta = layer.delta(weight.device).reshape(weight.shape) * multiplier
                    weight.copy_((weight.float() + delta).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for (component, module), original in backups.items():
                getattr(sd, component).get_submodule(module).weight.copy_(original)
