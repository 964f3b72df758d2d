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
Text-encoder entries (``lora_te1_``, ``text_encoder.``) are listed, not applied (that belongs to the text
encoders' loader)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ..models.quantized import QuantizedLinear
from . import bfl, flux, mmdit, sd3_original
from .io import CheckpointError, load_state_dict, safetensors_metadata
from .lora import _peft_pairs as peft_layers
from .original_layout import Layout, swap_halves

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "")
TEXT_MARKERS = ("lora_te", "text_encoder", "te1.", "te2.", "clip_l.", "t5xxl.")
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
    module: str  # torchsd module path in the transformer
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out rows of this module, rank)
    scale: float  # alpha / rank

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass(frozen=True)
class TransformerLora:
    updates: tuple[Update, ...]
    text_encoder_keys: tuple[str, ...]  # present in the file, not applied here


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


def read_lora(state: Mapping[str, torch.Tensor], family: str, config, source: object = "LoRA",
              metadata: Mapping[str, str] | None = None) -> TransformerLora:
    """A LoRA state dict for a "flux" or "sd3" transformer -> updates on torchsd's modules, every target and
    shape checked against the config."""
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
    text = tuple(sorted(k for k in state if k.startswith(TEXT_MARKERS)))
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
    return TransformerLora(tuple(updates), text)


def load_lora(path: str | Path, family: str, config) -> TransformerLora:
    path = Path(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    return read_lora(load_state_dict(path), family, config, path, metadata)


def apply_lora(model: nn.Module, lora: TransformerLora, strength: float = 1.0) -> None:
    """Merge into float linear layers; a side path on QuantizedLinear layers (their weights stay quantized)."""
    for update in lora.updates:
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
def loras_applied(model: nn.Module, loras: list[tuple[TransformerLora, float]]) -> Iterator[None]:
    """LoRAs (with strengths) applied for a run; afterwards the float weights are restored bit for bit from
    copies of the layers they touched, and the quantized layers' side paths removed."""
    saved, side_paths = {}, {}
    for lora, _ in loras:
        for update in lora.updates:
            layer = model.get_submodule(update.module)
            if isinstance(layer, QuantizedLinear):
                side_paths.setdefault(update.module, len(layer.loras))
            elif update.module not in saved:
                saved[update.module] = layer.weight.detach().clone()
    try:
        for lora, strength in loras:
            apply_lora(model, lora, strength)
        yield
    finally:
        with torch.no_grad():
            for module, weight in saved.items():
                model.get_submodule(module).weight.copy_(weight)
        for module, count in side_paths.items():
            del model.get_submodule(module).loras[count:]
