"""FLUX.1 transformer weights between torchsd's names and diffusers' ``FluxTransformer2DModel`` names:
rules on name pieces, checked against the exact names and shapes a config implies. (BFL's own file layout,
``double_blocks.N.img_attn.qkv`` with fused projections, is a later change.)"""

from __future__ import annotations

import re

import torch

from ..config import FluxConfig
from .io import CheckpointError
from .mmdit import _check

_STREAM = [  # inside a double block: (torchsd, diffusers)
    (r"image\.modulation\.", "norm1.linear."),
    (r"text\.modulation\.", "norm1_context.linear."),
    (r"image\.attn\.([qkv])\.", r"attn.to_\1."),
    (r"image\.attn\.out\.", "attn.to_out.0."),
    (r"image\.attn\.norm_([qk])\.", r"attn.norm_\1."),
    (r"text\.attn\.([qkv])\.", r"attn.add_\1_proj."),
    (r"text\.attn\.out\.", "attn.to_add_out."),
    (r"text\.attn\.norm_([qk])\.", r"attn.norm_added_\1."),
    (r"image\.mlp\.fc1\.", "ff.net.0.proj."),
    (r"image\.mlp\.fc2\.", "ff.net.2."),
    (r"text\.mlp\.fc1\.", "ff_context.net.0.proj."),
    (r"text\.mlp\.fc2\.", "ff_context.net.2."),
]
_SINGLE = [
    (r"modulation\.", "norm.linear."),
    (r"attn\.([qkv])\.", r"attn.to_\1."),
    (r"attn\.norm_([qk])\.", r"attn.norm_\1."),
    (r"mlp_in\.", "proj_mlp."),
    (r"out\.", "proj_out."),
]
_TOP = [
    (r"image_in\.", "x_embedder."),
    (r"context_in\.", "context_embedder."),
    (r"time_embed\.fc([12])\.", r"time_text_embed.timestep_embedder.linear_\1."),
    (r"guidance_embed\.fc([12])\.", r"time_text_embed.guidance_embedder.linear_\1."),
    (r"pooled_embed\.fc([12])\.", r"time_text_embed.text_embedder.linear_\1."),
    (r"final_modulation\.", "norm_out.linear."),
    (r"final_proj\.", "proj_out."),
]
_RULES = ([(re.compile(p), r) for p, r in _TOP]
          + [(re.compile(r"double_blocks\.(\d+)\." + p), r"transformer_blocks.\1." + r.replace("\\1", "\\2"))
             for p, r in _STREAM]
          + [(re.compile(r"single_blocks\.(\d+)\." + p), r"single_transformer_blocks.\1." + r.replace("\\1", "\\2"))
             for p, r in _SINGLE])


def diffusers_name(name: str) -> str:
    for pattern, replacement in _RULES:
        match = pattern.match(name)
        if match:
            return match.expand(replacement) + name[match.end():]
    raise KeyError(f"no diffusers name for FLUX.1 parameter {name!r}")


def expected_shapes(config: FluxConfig) -> dict[str, tuple[int, ...]]:
    from ..models.flux import Flux

    with torch.device("meta"):
        model = Flux(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def to_diffusers(state: dict[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    _check(state, expected_shapes(config), "torchsd FLUX.1")
    return {diffusers_name(k): v for k, v in state.items()}


def from_diffusers(state: dict[str, torch.Tensor], config: FluxConfig) -> dict[str, torch.Tensor]:
    """diffusers' FluxTransformer2DModel state dict -> torchsd's, every name and shape checked."""
    shapes = expected_shapes(config)
    theirs = {diffusers_name(k): k for k in shapes}
    _check(state, {d: shapes[o] for d, o in theirs.items()}, "FluxTransformer2DModel")
    return {theirs[k]: v for k, v in state.items()}


def config_to_diffusers(config: FluxConfig) -> dict:
    """FluxTransformer2DModel's constructor arguments (its transformer/config.json)."""
    per_patch = config.patch_size ** 2
    # Fill's tokens carry the masked image and the mask in (384), the latents alone out (64)
    extra = {"out_channels": config.latent_channels * per_patch} if config.condition_channels else {}
    return dict(patch_size=1, in_channels=(config.latent_channels + config.condition_channels) * per_patch,
                num_layers=config.num_double_blocks, num_single_layers=config.num_single_blocks,
                attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
                joint_attention_dim=config.context_dim, pooled_projection_dim=config.pooled_dim,
                guidance_embeds=config.guidance_embeds, axes_dims_rope=config.axes_dims_rope, **extra)


def flux_condition_channels(in_features: int, out_features: int, source: object) -> int:
    """The condition channels a FLUX.1 transformer's token widths imply: 0 (dev, schnell), or Fill's latent
    channels + the mask's f * f (in 384 = 64 + 4 * (16 + 64) with the 8x VAE). Depth and Canny (in 128: a control
    image's latents alone) are refused by name."""
    if in_features == out_features:
        return 0
    condition, remainder = divmod(in_features - out_features, 4)  # 4 features per channel: 2x2 patches
    if remainder or condition <= out_features // 4:  # Depth / Canny: a control's latents, no mask
        raise CheckpointError(f"{source}: a FLUX.1 transformer with {in_features} input features per token for "
                              f"{out_features} outputs (FLUX.1 Depth or Canny): torchsd runs dev, schnell and Fill")
    return condition
