"""FLUX.1 in Black Forest Labs' own file layout (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``, and
ComfyUI's saves of them under ``model.diffusion_model.``): fused ``img_attn.qkv`` and ``single_blocks.N.linear1``
(q, k, v, MLP in), ``final_layer.adaLN_modulation.1`` as (shift, scale). Plus the FLUX.1 autoencoder
``ae.safetensors`` (the LDM names of SD's VAE, 16 latent channels, no quant convs)."""

from __future__ import annotations

from typing import Mapping

import torch

from ..config import FluxConfig, VAEConfig
from . import original_layout
from .flux import expected_shapes, flux_condition_channels
from .io import CheckpointError

PREFIX = "model.diffusion_model."  # ComfyUI's saves, and all-in-one files
MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"  # what diffusers detects FLUX.1 by

_STREAM = [  # inside double_blocks.N.: (torchsd, BFL) for the image stream; the text stream is the same with txt_
    (r"modulation\.", "mod.lin."),
    (r"attn\.[qkv]\.", "attn.qkv."),
    (r"attn\.out\.", "attn.proj."),
    (r"attn\.norm_q\.weight", "attn.norm.query_norm.scale"),
    (r"attn\.norm_k\.weight", "attn.norm.key_norm.scale"),
    (r"mlp\.fc1\.", "mlp.0."),
    (r"mlp\.fc2\.", "mlp.2."),
]
_RULES = [
    (r"image_in\.", "img_in."),
    (r"context_in\.", "txt_in."),
    (r"time_embed\.fc1\.", "time_in.in_layer."),
    (r"time_embed\.fc2\.", "time_in.out_layer."),
    (r"guidance_embed\.fc1\.", "guidance_in.in_layer."),
    (r"guidance_embed\.fc2\.", "guidance_in.out_layer."),
    (r"pooled_embed\.fc1\.", "vector_in.in_layer."),
    (r"pooled_embed\.fc2\.", "vector_in.out_layer."),
    (r"final_modulation\.", "final_layer.adaLN_modulation.1."),
    (r"final_proj\.", "final_layer.linear."),
    *[(r"double_blocks\.(\d+)\.image\." + p, r"double_blocks.\1.img_" + r) for p, r in _STREAM],
    *[(r"double_blocks\.(\d+)\.text\." + p, r"double_blocks.\1.txt_" + r) for p, r in _STREAM],
    (r"single_blocks\.(\d+)\.modulation\.", r"single_blocks.\1.modulation.lin."),
    (r"single_blocks\.(\d+)\.(attn\.[qkv]|mlp_in)\.", r"single_blocks.\1.linear1."),
    (r"single_blocks\.(\d+)\.out\.", r"single_blocks.\1.linear2."),
    (r"single_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
    (r"single_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
]


def layout(config: FluxConfig) -> original_layout.Layout:
    return original_layout.build_layout("FLUX.1 transformer (BFL layout)", expected_shapes(config), _RULES,
                                        lambda name: name.startswith("final_layer.adaLN_modulation.1."))


def is_flux(state: Mapping[str, torch.Tensor]) -> bool:
    return MARKER in state or PREFIX + MARKER in state


def transformer_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's tensors without ComfyUI's ``model.diffusion_model.`` prefix."""
    return original_layout.strip_prefix(state, PREFIX, MARKER)


def variant(state: Mapping[str, torch.Tensor]) -> str:
    """"dev" (embeds a guidance scale) or "schnell", from the tensors alone."""
    return "dev" if "guidance_in.in_layer.weight" in transformer_tensors(state) else "schnell"


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix)})


def config_of(state: Mapping[str, torch.Tensor], source: object = "state dict",
              axes_dims_rope: tuple[int, ...] | None = None) -> FluxConfig:
    """A FluxConfig read from the tensor shapes. The RoPE axes are not stored: FLUX.1's (16, 56, 56) for
    128-wide heads, else pass ``axes_dims_rope``."""
    state = transformer_tensors(state)
    if MARKER not in state:
        raise CheckpointError(f"{source}: not a FLUX.1 transformer in BFL's layout (no {MARKER})")
    width, in_features = state["img_in.weight"].shape
    out_features = state["final_layer.linear.weight"].shape[0]
    condition_channels = flux_condition_channels(in_features, out_features, source)  # Fill: 384 = 64 + 320
    head_dim = state[MARKER].shape[0]
    single = _count(state, "single_blocks.")
    mlp_dim = (state["single_blocks.0.linear1.weight"].shape[0] - 3 * width if single
               else state["double_blocks.0.img_mlp.0.weight"].shape[0])
    if axes_dims_rope is None:
        if head_dim != 128:
            raise CheckpointError(f"{source}: FLUX-like transformer with {head_dim}-wide heads; pass "
                                  f"axes_dims_rope= (FLUX.1's (16, 56, 56) is for 128)")
        axes_dims_rope = (16, 56, 56)
    return FluxConfig(latent_channels=out_features // 4, condition_channels=condition_channels, patch_size=2,
                      num_double_blocks=_count(state, "double_blocks."), num_single_blocks=single,
                      num_heads=width // head_dim, head_dim=head_dim, context_dim=state["txt_in.weight"].shape[1],
                      pooled_dim=state["vector_in.in_layer.weight"].shape[1],
                      guidance_embeds="guidance_in.in_layer.weight" in state, axes_dims_rope=axes_dims_rope,
                      mlp_ratio=mlp_dim / width)


def from_bfl(state: Mapping[str, torch.Tensor], config: FluxConfig | None = None, source: object = "state dict"
             ) -> dict[str, torch.Tensor]:
    """A BFL-layout FLUX.1 transformer (with or without ``model.diffusion_model.``) -> torchsd's names."""
    tensors = transformer_tensors(state)
    return original_layout.read(layout(config or config_of(tensors, source)), tensors, source)


def to_bfl(state: Mapping[str, torch.Tensor], config: FluxConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """torchsd's FLUX.1 transformer -> BFL's layout; ``prefix="model.diffusion_model."`` as ComfyUI saves."""
    return {prefix + k: v for k, v in original_layout.write(layout(config), state).items()}


# --- ae.safetensors ------------------------------------------------------------------------------------

def vae_from_original(state: Mapping[str, torch.Tensor], config: VAEConfig | None = None,
                      source: object = "ae.safetensors") -> dict[str, torch.Tensor]:
    """FLUX.1's (or SD 3's) autoencoder in LDM names, bare or under ``first_stage_model.`` / ``vae.``."""
    from . import ldm

    config = config or VAEConfig.flux()
    for prefix in ("first_stage_model.", "vae."):
        if prefix + "decoder.conv_in.weight" in state:
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "decoder.conv_in.weight" not in state:
        raise CheckpointError(f"{source}: no autoencoder in LDM names (decoder.conv_in.weight)")
    if state["decoder.conv_in.weight"].shape[1] != config.latent_channels:
        raise CheckpointError(f"{source}: autoencoder with {state['decoder.conv_in.weight'].shape[1]} latent "
                              f"channels; the config has {config.latent_channels}")
    return ldm.vae_from_original(state, config)


def vae_to_original(state: Mapping[str, torch.Tensor], config: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    from . import ldm

    return ldm.vae_to_original(state, config or VAEConfig.flux())
