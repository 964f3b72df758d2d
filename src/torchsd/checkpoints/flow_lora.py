"""LoRAs for FLUX.1 and SD 3 / 3.5 transformers, in the three layouts they are published in:

- kohya (sd-scripts, ComfyUI, AUTOMATIC1111 Forge): ``lora_unet_<original module, dots as _>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``, on the original single-file modules (``double_blocks_0_img_attn_qkv``,
  ``single_blocks_0_linear1``; SD 3: ``joint_blocks_0_x_block_attn_qkv``);
- diffusers / PEFT: ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight`` (alpha from
  ``lora_adapter_metadata`` or ``.alpha`` keys), also without ``transformer.``, and OneTrainer's kohya-style
  ``lora_transformer_<diffusers module, dots as _>``;
- the original layout itself (BFL's own LoRAs, ComfyUI saves): ``[diffusion_model.]double_blocks.0.img_attn.qkv
  .lora_A.weight`` (or lora_down/lora_up).

A LoRA on a fused original tensor (qkv, linear1) is one low-rank update of the stacked rows: its up matrix is
split by rows over torchsd's q, k, v (and MLP in) and the down matrix shared, which is exact. Updates are merged
into float weights (no per-step cost). Weights kept quantized get the LoRA as a side path, x·downᵀ·upᵀ·scale
added to the layer's output: merging would need the whole layer in float for good, undoing the quantization.

The text-encoder part, read when the pipeline's encoders are given, names transformers' modules of each encoder:

- kohya (sd-scripts' lora_flux / lora_sd3): ``lora_te1_`` CLIP-L, ``lora_te2_`` OpenCLIP-bigG (SD 3),
  ``lora_te3_`` T5-XXL, then the module with ``_`` (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``,
  ``lora_te3_encoder_block_0_layer_0_SelfAttention_q``);
- diffusers / PEFT (``save_lora_weights``): the pipeline's component, ``text_encoder.`` (CLIP-L),
  ``text_encoder_2.`` (bigG for SD 3, T5 for FLUX.1), ``text_encoder_3.`` (SD 3's T5), with or without
  ``text_model.``;
- ComfyUI: ``text_encoders.clip_l|clip_g|t5xxl.transformer.<module>``.

A part for an encoder the pipeline runs without (SD 3 without T5) is listed in ``text_encoder_keys`` and not
applied; without ``text_encoders`` (a transformer on its own) the whole text part is listed so."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ..models.quantized import QuantizedLinear
from . import bfl, flux, mmdit, sd3_original, t5
from .diffusers import TEXT_PREFIX, TEXT_RULES, _rename
from .io import CheckpointError, load_state_dict, safetensors_metadata
from .lora import _peft_pairs as peft_layers
from .original_layout import Layout, swap_halves

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
TEXT_MARKERS = ("lora_te", "text_encoder", "te1.", "te2.", "clip_l.", "t5xxl.")
# family -> torchsd's encoder -> (kohya prefix, diffusers component, ComfyUI name)
TEXT_ENCODERS = {
    "flux": {"clip_l": ("lora_te1_", "text_encoder", "clip_l"), "t5": ("lora_te3_", "text_encoder_2", "t5xxl")},
    "sd3": {"clip_l": ("lora_te1_", "text_encoder", "clip_l"), "clip_g": ("lora_te2_", "text_encoder_2", "clip_g"),
            "t5": ("lora_te3_", "text_encoder_3", "t5xxl")},
}
OTHER_ADAPTERS = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
                  ".lora_mid.": "LoCon with a Tucker core"}



# plain low-rank pairs only: the transformer LoRAs in the wild are LoRA, not LyCORIS (refused by name above)
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
    """PEFT/diffusers pairs, read (with their alphas and rsLoRA) by the SD LoRA reader."""
    pairs = {}
    for name, (update, scale, magnitude) in peft_layers(state, metadata).items():
        if magnitude is not None:
            raise CheckpointError(f"LoRA layer {name}: DoRA is not supported on SD 3 / FLUX.1 transformers")
        pairs[name] = (update.down, update.up, scale)
    return pairs


@dataclass(frozen=True)
class Update:
    module: str  # torchsd module path in the transformer (or in the text encoder ``component``)
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out rows of this module, rank)
    scale: float  # alpha / rank
    component: str = "transformer"  # or the text encoder: "clip_l", "clip_g", "t5"

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass(frozen=True)
class FlowLora:
    updates: tuple[Update, ...]  # the transformer's
    text_encoder_keys: tuple[str, ...]  # present in the file, not applied (no such encoder given)
    text_updates: tuple[Update, ...] = ()  # the text encoders', each naming its ``component``

    def for_component(self, component: str) -> tuple[Update, ...]:
        if component == "transformer":
            return self.updates
        return tuple(u for u in self.text_updates if u.component == component)


def _targets(layout: Layout, diffusers_name) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every name a LoRA may use for a linear layer -> (original weight name, torchsd weight names)."""
    targets = {}
    for original, parts in layout.parts.items():
        if not original.endswith(".weight") or len(layout.part_shapes[parts[0]]) != 2:
            continue
        module = original.removesuffix(".weight")
        for prefix in ORIGINAL_PREFIXES:
            targets[prefix + module] = (original, parts)
        targets["lora_unet_" + module.replace(".", "_")] = (original, parts)
        for part in parts:
            module = diffusers_name(part).removesuffix(".weight")
            for name in ("transformer." + module, module, "lora_transformer_" + module.replace(".", "_")):
                targets[name] = (part, (part,))
    return targets


def _text_targets(family: str, encoders: Mapping[str, nn.Module | None]
                  ) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """Every name a LoRA may use for a linear layer of the given encoders -> (encoder, torchsd module path); and
    each encoder's name prefixes -> the encoder (to tell a part for an encoder the pipeline lacks)."""
    targets, prefixes = {}, {}
    for encoder, (kohya, component, comfy) in TEXT_ENCODERS[family].items():
        for prefix in (kohya, component + ".", f"text_encoders.{comfy}.transformer."):
            prefixes[prefix] = encoder
        model = encoders.get(encoder)
        if model is None:
            continue
        for path, theirs in _transformers_names(encoder, model).items():
            names = [kohya + theirs.replace(".", "_"), f"{component}.{theirs}", f"text_encoders.{comfy}.transformer."
                     f"{theirs}"]
            if theirs.startswith(TEXT_PREFIX):  # transformers 5 saves CLIP without the text_model. level
                names.append(f"{component}.{theirs[len(TEXT_PREFIX):]}")
            targets.update({name: (encoder, path) for name in names})
    return targets, prefixes


def text_encoders_named(lora: FlowLora, family: str) -> set[str]:
    """The encoders ("clip_l", "clip_g", "t5") that the text part of a LoRA read without them names by its keys'
    prefixes (all of the family's where a key has none of them: reading against them then says what is wrong).
    A pipeline that frees its encoders reads only these for the LoRA."""
    _, prefixes = _text_targets(family, {})
    named = {next((e for p, e in prefixes.items() if key.startswith(p)), None) for key in lora.text_encoder_keys}
    return set(TEXT_ENCODERS[family]) if None in named else named


def _transformers_names(encoder: str, model: nn.Module) -> dict[str, str]:
    """torchsd module path -> transformers' module path, for every linear layer of a CLIP or T5 encoder."""
    modules = dict(model.named_modules())
    if encoder == "t5":
        names = {ours.removesuffix(".weight"): theirs.removesuffix(".weight")
                 for ours, theirs in t5.key_map(model.config).items()}
    else:  # models.flow_text.CLIPWithProjection: the tower under ``text.``, the projection beside it
        names = {path: TEXT_PREFIX + _rename(path.removeprefix("text.") + ".weight", TEXT_RULES)[: -len(".weight")]
                 for path in modules if path.startswith("text.")}
        names.update({"text_projection": "text_projection", "text.text_projection": "text_projection"})
    return {path: theirs for path, theirs in names.items()
            if isinstance(modules.get(path), (nn.Linear, QuantizedLinear))}


def read_lora(state: Mapping[str, torch.Tensor], family: str, config, source: object = "LoRA",
              metadata: Mapping[str, str] | None = None,
              text_encoders: Mapping[str, nn.Module | None] | None = None) -> FlowLora:
    """A LoRA state dict for a "flux" or "sd3" transformer -> updates on torchsd's modules, every target and
    shape checked against the config. ``text_encoders`` (the pipeline's, by torchsd's names "clip_l", "clip_g",
    "t5"; None where it runs without one): the text-encoder part is read against them too."""
    if family == "flux":
        layout, names = bfl.layout(config), flux.diffusers_name
    elif family == "sd3":
        layout, names = sd3_original.layout(config), mmdit.diffusers_name
    else:
        raise ValueError(f"family must be 'flux' or 'sd3'; got {family!r}")
    for marker, kind in OTHER_ADAPTERS.items():
        if any(marker in k for k in state):
            raise CheckpointError(f"{source}: a {kind} file; torchsd applies plain LoRA (lora_down/lora_up or "
                                  f"lora_A/lora_B) to {family} transformers")
    text = {k: v for k, v in state.items() if k.startswith(TEXT_MARKERS)}
    rest = {k: v for k, v in state.items() if not k.startswith(TEXT_MARKERS)}
    pairs = {**_kohya_pairs(rest), **_peft_pairs(rest, dict(metadata or {}))}
    targets = _targets(layout, names)
    unknown = sorted(set(pairs) - set(targets))
    if unknown:
        raise CheckpointError(f"{source}: LoRA layers {unknown[:5]}{'…' if len(unknown) > 5 else ''} name no "
                              f"linear layer of this {family} transformer (another model or size?)")
    used = {f"{n}.{s}" for n in pairs for s in ("lora_down.weight", "lora_up.weight", "lora_A.weight",
                                                 "lora_B.weight", "alpha")}
    stray = sorted(set(rest) - used)
    if stray:
        raise CheckpointError(f"{source}: keys {stray[:5]} are not LoRA weights of a {family} transformer")
    updates = []
    for name, (down, up, scale) in pairs.items():
        original, parts = targets[name]
        out_rows = [layout.part_shapes[p][0] for p in parts]
        in_features = layout.part_shapes[parts[0]][1]
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_features or up.shape[0] != sum(out_rows) \
                or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{source}: LoRA layer {name} is {tuple(up.shape)} @ {tuple(down.shape)}; the "
                                  f"layer is ({sum(out_rows)}, {in_features})")
        if original in layout.swapped:
            up = swap_halves(up)
        for part, rows in zip(parts, up.split(out_rows)):
            updates.append(Update(part.removesuffix(".weight"), down, rows, scale))
    if text_encoders is None:
        return FlowLora(tuple(updates), tuple(sorted(text)))
    text_updates, skipped = _read_text_part(text, family, text_encoders, source, dict(metadata or {}))
    return FlowLora(tuple(updates), skipped, text_updates)


def _read_text_part(state: dict[str, torch.Tensor], family: str, encoders: Mapping[str, nn.Module | None],
                    source: object, metadata: dict[str, str]) -> tuple[tuple[Update, ...], tuple[str, ...]]:
    """The text encoders' updates, and the keys of parts for encoders the pipeline runs without."""
    targets, prefixes = _text_targets(family, encoders)
    pairs = {**_kohya_pairs(state), **_peft_pairs(state, metadata)}
    used = {f"{n}.{s}" for n in pairs for s in ("lora_down.weight", "lora_up.weight", "lora_A.weight",
                                                 "lora_B.weight", "alpha")}
    stray = sorted(set(state) - used)
    if stray:
        raise CheckpointError(f"{source}: keys {stray[:5]} are not LoRA weights of a text encoder")
    updates, skipped = [], []
    for name, (down, up, scale) in pairs.items():
        if name not in targets:
            encoder = next((e for prefix, e in prefixes.items() if name.startswith(prefix)), None)
            if encoder is None or encoders.get(encoder) is not None:
                raise CheckpointError(f"{source}: LoRA layer {name} names no linear layer of this {family} model's "
                                      f"text encoders ({', '.join(e for e, m in encoders.items() if m is not None)}); "
                                      f"it was made for another model or size")
            skipped += sorted(k for k in state if k.startswith(name + "."))
            continue
        encoder, path = targets[name]
        weight = _weight_shape(encoders[encoder].get_submodule(path))
        if down.ndim != 2 or up.ndim != 2 or (up.shape[0], down.shape[1]) != weight or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"{source}: LoRA layer {name} is {tuple(up.shape)} @ {tuple(down.shape)}; the "
                                  f"{encoder} layer is {weight}")
        updates.append(Update(path, down, up, scale, encoder))
    return tuple(updates), tuple(skipped)


def _weight_shape(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, QuantizedLinear):
        return layer.out_features, layer.in_features
    return tuple(layer.weight.shape)


def load_lora(path: str | Path, family: str, config, text_encoders: Mapping[str, nn.Module | None] | None = None
              ) -> FlowLora:
    path = Path(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return read_lora(load_state_dict(path), family, config, path, metadata, text_encoders)


def apply_lora(model: nn.Module, lora: FlowLora, strength: float = 1.0, component: str = "transformer") -> None:
    """Merge into float linear layers; a side path on QuantizedLinear layers (their weights stay quantized).
    ``component``: which of the LoRA's parts ``model`` is (the transformer, or a text encoder: "clip_l" …)."""
    for update in lora.for_component(component):
        layer = model.get_submodule(update.module)
        if isinstance(layer, QuantizedLinear):
            layer.add_lora(update.down, update.up, update.scale * strength)
        elif isinstance(layer, nn.Linear):
            with torch.no_grad():
                merged = layer.weight.float() + strength * update.delta().to(layer.weight.device)
                layer.weight.copy_(merged.to(layer.weight.dtype))
        else:
            raise CheckpointError(f"LoRA target {update.module} is a {type(layer).__name__}, not a linear layer")


@contextmanager
def loras_applied(model: nn.Module, loras: list[tuple[FlowLora, float]], component: str = "transformer"
                  ) -> Iterator[None]:
    """LoRAs (with strengths) applied to ``model`` (the part ``component`` of each) for a run; afterwards the
    float weights are restored bit for bit from copies of the layers they touched, and the quantized layers'
    side paths removed."""
    saved, side_paths = {}, {}
    for lora, _ in loras:
        for update in lora.for_component(component):
            layer = model.get_submodule(update.module)
            if isinstance(layer, QuantizedLinear):
                side_paths.setdefault(update.module, len(layer.loras))
            elif update.module not in saved:
                saved[update.module] = layer.weight.detach().clone()
    try:
        for lora, strength in loras:
            apply_lora(model, lora, strength, component)
        yield
    finally:
        with torch.no_grad():
            for module, weight in saved.items():
                model.get_submodule(module).weight.copy_(weight)
        for module, count in side_paths.items():
            del model.get_submodule(module).loras[count:]
