"""LoRA (Hu et al. 2021): low-rank weight updates W' = W + scale · (alpha / rank) · up @ down.

Two file layouts are read, for the U-Net and the text encoder, for Linear and Conv2d layers:
- kohya (sd-scripts, AUTOMATIC1111): ``lora_unet_<diffusers path with _>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha``, and ``lora_te_text_model_…`` for the text encoder. SDXL files name the
  U-Net's layers by the original layout (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and
  the two text encoders ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (bigG). Conv layers have
  down (rank, in, kh, kw) and up (out, rank, 1, 1). A missing alpha means alpha = rank. The same names
  carry LyCORIS's LoHa (``hada_w1_a`` …) and LoKr (``lokr_w1`` …) factors, and DoRA's ``dora_scale``
  (see ``lycoris.py``).
- diffusers/PEFT: ``unet.<path>.lora_A.weight`` (= down) / ``lora_B.weight`` (= up) and
  ``text_encoder.[text_model.]<path>…``; alpha from the file's ``lora_adapter_metadata`` (lora_alpha,
  alpha_pattern, use_rslora) or ``.alpha`` keys, else alpha = rank; DoRA's ``.lora_magnitude_vector``.

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
from .lycoris import Hadamard, Kronecker, LowRank, WeightUpdate, apply_dora


class Networks(Protocol):
    """What LoRA files are read against and merged into: a pipeline's U-Net and text encoder."""

    unet: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module | None  # SDXL base's bigG
    config: object


KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class LoraLayer:
    component: str  # "unet" or "text_encoder"
    module: str  # torchsd module path inside that component
    update: WeightUpdate  # LoRA's up/down pair, or LyCORIS's LoHa / LoKr factors
    scale: float  # alpha / rank (or alpha / sqrt(rank) for rank-stabilised LoRA)
    magnitude: torch.Tensor | None = None  # DoRA's dora_scale: W + ΔW is rescaled to it

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The change to ``weight`` at multiplier 1, in float32 on the weight's device, shaped like it."""
        delta = (self.update.delta(weight.device) * self.scale).reshape(weight.shape)
        if self.magnitude is None:
            return delta
        original = weight.detach().float()
        return apply_dora(original, original + delta, self.magnitude)


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
    second = getattr(sd, "text_encoder_2", None)
    models = [("unet", sd.unet), ("text_encoder", sd.text_encoder)] + ([("text_encoder_2", second)] if second else [])
    te_prefix = {"text_encoder": "lora_te1_" if second else "lora_te_", "text_encoder_2": "lora_te2_"}
    original = original_unet_names(sd)
    for component, model in models:
        for path, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            if component == "unet":
                theirs = _rename(path + ".weight", UNET_RULES)[: -len(".weight")]
                kohya, peft = ["lora_unet_" + theirs.replace(".", "_")], ["unet." + theirs]
                if theirs in original:  # SDXL's kohya files use the original layout's names
                    kohya.append("lora_unet_" + original[theirs].replace(".", "_"))
            else:
                theirs = TEXT_PREFIX + _rename(path + ".weight", TEXT_RULES)[: -len(".weight")]
                kohya = [te_prefix[component] + theirs.replace(".", "_")]
                # recent transformers drop the text_model. nesting; files exist both ways
                peft = [f"{component}.{theirs}", f"{component}.{theirs[len(TEXT_PREFIX):]}"]
            for name in [*kohya, *peft]:
                names[name] = (component, path)
    return names


def original_unet_names(sd: Networks) -> dict[str, str]:
    """diffusers module path -> original-layout path of every U-Net layer, for SDXL models (empty otherwise)."""
    config = getattr(sd, "config", None)
    if config is None or not getattr(config, "is_sdxl", False):
        return {}
    from .ldm import rename, unet_blocks

    paths = {_rename(p + ".weight", UNET_RULES): None for p, m in sd.unet.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))}
    renamed = rename(paths, unet_blocks(config.unet), to_diffusers=False, what="U-Net")
    return {d[: -len(".weight")]: o[: -len(".weight")] for d, o in zip(paths, renamed)}


# --- reading files ---------------------------------------------------------------------------------

def load_lora(path: str | Path, sd: Networks, name: str | None = None) -> LoraFile:
    """Read a kohya/LyCORIS (LoRA, LoCon, LoHa, LoKr, each optionally DoRA) or PEFT LoRA file and match its
    layers to ``sd``'s modules (shapes checked)."""
    path = Path(path)
    state = load_state_dict(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    _refuse_other_adapters(state, path)
    if any(k.startswith(KOHYA_PREFIXES) for k in state):
        layers_in_file = _kohya_layers(state, path)
    elif any(".lora_A." in k for k in state):
        layers_in_file = _peft_pairs(state, metadata)
    else:
        raise CheckpointError(f"{path}: not a LoRA file torchsd reads: expected kohya/LyCORIS keys (lora_unet_… / "
                              f"lora_te_… with lora_down/lora_up, hada_w1_a/…, lokr_w1/…) or diffusers/PEFT keys "
                              f"(…lora_A.weight / lora_B.weight); first keys: {', '.join(sorted(state)[:3])}")
    names = module_names(sd)
    layers, unmatched = [], []
    for key, (update, scale, magnitude) in layers_in_file.items():
        if key not in names:
            unmatched.append(key)
            continue
        component, module_path = names[key]
        layers.append(LoraLayer(component, module_path, update, scale, magnitude))
        _check_shape(layers[-1], weight_of(sd, layers[-1]), path)
    if not layers:
        raise CheckpointError(f"{path}: none of its {len(layers_in_file)} LoRA layers belong to this model (first: "
                              f"{', '.join(unmatched[:3])}); it was made for another architecture (SDXL?)")
    if unmatched:
        import warnings

        warnings.warn(f"{path.name}: {len(unmatched)} LoRA layers have no matching module and are ignored "
                      f"(first: {', '.join(unmatched[:3])})", stacklevel=2)
    return LoraFile(name or path.stem, path, tuple(layers))


def _refuse_other_adapters(state: dict[str, torch.Tensor], path: Path) -> None:
    kinds = {".lora_mid.": "LoCon with a Tucker core (lora_mid)"}
    for marker, kind in kinds.items():
        if any(marker in k for k in state):
            raise CheckpointError(f"{path}: a {kind} file; torchsd applies LoRA, LoCon, LoHa and LoKr (optionally "
                                  f"with DoRA) in the kohya/LyCORIS layout, and PEFT lora_A/lora_B, to SD 1.x/2.x "
                                  f"models")


Layer = tuple[WeightUpdate, float, torch.Tensor | None]  # update, scale, DoRA magnitude


def _kohya_layers(state: dict[str, torch.Tensor], path: Path) -> dict[str, Layer]:
    """Group ``lora_unet_<module>.<part>`` keys by module and read each group's kind from its parts."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(KOHYA_PREFIXES):
            name, _, part = key.partition(".")
            groups.setdefault(name, {})[part] = tensor
    layers = {}
    for name, parts in groups.items():
        update = _kohya_update(name, parts, path)
        rank = update.rank
        # LyCORIS: alpha / rank; no alpha means alpha = rank; a LoKr with both factors whole has no rank: scale 1
        scale = float(parts["alpha"]) / rank if "alpha" in parts and rank else 1.0
        layers[name] = (update, scale, parts.get("dora_scale"))
    return layers


def _kohya_update(name: str, parts: dict[str, torch.Tensor], path: Path) -> WeightUpdate:
    def need(kind: str, *keys: str) -> list[torch.Tensor]:
        missing = [k for k in keys if k not in parts]
        if missing:
            raise CheckpointError(f"{path}: {kind} layer {name} lacks {', '.join(missing)} (has "
                                  f"{', '.join(sorted(parts))}); the file is incomplete")
        return [parts[k] for k in keys]

    if "lora_down.weight" in parts:
        return LowRank(*need("LoRA", "lora_down.weight", "lora_up.weight"))
    if "hada_w1_a" in parts:
        return Hadamard(*need("LoHa", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                        t1=parts.get("hada_t1"), t2=parts.get("hada_t2"))
    if any(part.startswith("lokr_") for part in parts):
        fields = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        update = Kronecker(**{f: parts.get("lokr_" + f) for f in fields})
        if not update.fits():
            raise CheckpointError(f"{path}: LoKr layer {name} needs lokr_w1 or lokr_w1_a/_b, and lokr_w2 or "
                                  f"lokr_w2_a/_b; it has {', '.join(sorted(parts))}")
        return update
    raise CheckpointError(f"{path}: layer {name} holds {', '.join(sorted(parts))}: not a LoRA/LoCon (lora_down/"
                          f"lora_up), LoHa (hada_w1_a …) or LoKr (lokr_w1 …) layer; other LyCORIS kinds (OFT, "
                          f"BOFT, GLoRA, IA3, full diff) are not supported")


def _peft_pairs(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Layer]:
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
        # DoRA: PEFT's get_peft_model_state_dict writes one magnitude per output channel
        magnitude = state.get(name + ".lora_magnitude_vector", state.get(name + ".lora_magnitude_vector.weight"))
        # ((out,) for Linear, (1, out, 1, 1) for Conv2d): always per output channel, so flattened
        pairs[name] = (LowRank(down, up), scale, magnitude.reshape(-1) if magnitude is not None else None)
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
    out_in = weight.shape[0], weight[0].numel()
    if not layer.update.fits() or layer.update.out_in() != out_in:
        kind = type(layer.update).__name__
        shapes = ", ".join(f"{f} {tuple(t.shape)}" for f, t in vars(layer.update).items() if t is not None)
        raise CheckpointError(f"{path}: {kind} layer {layer.module} has {shapes}, which do not fit the weight "
                              f"{tuple(weight.shape)}: the LoRA was made for another model family (SD 1.x vs 2.x?)")
    magnitude = layer.magnitude
    if magnitude is not None:
        per_output, per_input = (weight.shape[0], *[1] * (weight.ndim - 1)), (1, *weight.shape[1:2],
                                                                                 *[1] * (weight.ndim - 2))
        if tuple(magnitude.shape) not in (per_output, per_input, (weight.shape[0],)):
            raise CheckpointError(f"{path}: layer {layer.module}: dora_scale {tuple(magnitude.shape)} fits neither "
                                  f"{per_output} (per output channel) nor {per_input} (per input channel)")


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
    missing_folder: ClassVar[str] = ("LoRA folder {folder!r} does not exist; "
                                     "give a folder holding .safetensors LoRA files")

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
                    delta = layer.delta(weight) * multiplier
                    weight.copy_((weight.float() + delta).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for (component, module), original in backups.items():
                getattr(sd, component).get_submodule(module).weight.copy_(original)
