"""MMDiT (SD 3 / 3.5) weights between torchsd's names and diffusers' ``SD3Transformer2DModel`` names.

The map is rules on name pieces, checked against the exact set of names and shapes a config implies, so a
file from another model size or version is refused with the names that differ."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import MMDiTConfig

# (torchsd pattern, diffusers replacement), applied first match wins; \1 is the block index
_RULES = [
    (r"patch_embed\.proj\.", "pos_embed.proj."),
    (r"patch_embed\.pos_embed$", "pos_embed.pos_embed"),
    (r"time_embed\.fc([12])\.", r"time_text_embed.timestep_embedder.linear_\1."),
    (r"pooled_embed\.fc([12])\.", r"time_text_embed.text_embedder.linear_\1."),
    (r"context_proj\.", "context_embedder."),
    (r"final_modulation\.", "norm_out.linear."),
    (r"final_proj\.", "proj_out."),
    (r"blocks\.(\d+)\.image\.modulation\.", r"transformer_blocks.\1.norm1.linear."),
    (r"blocks\.(\d+)\.text\.modulation\.", r"transformer_blocks.\1.norm1_context.linear."),
    (r"blocks\.(\d+)\.image\.attn(2?)\.([qkv])\.", r"transformer_blocks.\1.attn\2.to_\3."),
    (r"blocks\.(\d+)\.image\.attn(2?)\.out\.", r"transformer_blocks.\1.attn\2.to_out.0."),
    (r"blocks\.(\d+)\.image\.attn(2?)\.norm_([qk])\.", r"transformer_blocks.\1.attn\2.norm_\3."),
    (r"blocks\.(\d+)\.text\.attn\.([qkv])\.", r"transformer_blocks.\1.attn.add_\2_proj."),
    (r"blocks\.(\d+)\.text\.attn\.out\.", r"transformer_blocks.\1.attn.to_add_out."),
    (r"blocks\.(\d+)\.text\.attn\.norm_([qk])\.", r"transformer_blocks.\1.attn.norm_added_\2."),
    (r"blocks\.(\d+)\.image\.mlp\.fc1\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"blocks\.(\d+)\.image\.mlp\.fc2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"blocks\.(\d+)\.text\.mlp\.fc1\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
    (r"blocks\.(\d+)\.text\.mlp\.fc2\.", r"transformer_blocks.\1.ff_context.net.2."),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in _RULES]


def diffusers_name(name: str) -> str:
    for pattern, replacement in _COMPILED:
        match = pattern.match(name)
        if match:
            return match.expand(replacement) + name[match.end():]
    raise KeyError(f"no diffusers name for MMDiT parameter {name!r}")


def expected_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """torchsd name -> shape for every tensor of a model of this config (built on the meta device)."""
    from ..models.mmdit import MMDiT

    with torch.device("meta"):
        model = MMDiT(config)
    return {name: tuple(t.shape) for name, t in _tensors(model)}


def _tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def to_diffusers(state: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    _check(state, expected_shapes(config), "torchsd MMDiT")
    return {diffusers_name(k): v for k, v in state.items()}


def from_diffusers(state: dict[str, torch.Tensor], config: MMDiTConfig) -> dict[str, torch.Tensor]:
    """diffusers' SD3Transformer2DModel state dict -> torchsd's, every name and shape checked."""
    shapes = expected_shapes(config)
    theirs = {diffusers_name(k): k for k in shapes}
    _check(state, {d: shapes[o] for d, o in theirs.items()}, "SD3Transformer2DModel")
    return {theirs[k]: v for k, v in state.items()}


def _check(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], what: str) -> None:
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{what} weights do not fit the config: missing {missing[:5]}"
                         f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'…' if len(unexpected) > 5 else ''} (another model size or version?)")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{what} weight {name} has shape {tuple(state[name].shape)}; the config gives {shape}")


def config_to_diffusers(config: MMDiTConfig) -> dict:
    """SD3Transformer2DModel's constructor arguments (its transformer/config.json)."""
    return dict(sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
                num_layers=config.num_layers, attention_head_dim=config.head_dim,
                num_attention_heads=config.num_heads, joint_attention_dim=config.context_dim,
                caption_projection_dim=config.width, pooled_projection_dim=config.pooled_dim,
                out_channels=config.out_channels, pos_embed_max_size=config.pos_embed_max_size,
                dual_attention_layers=config.dual_attention_blocks,
                qk_norm="rms_norm" if config.qk_norm else None)
