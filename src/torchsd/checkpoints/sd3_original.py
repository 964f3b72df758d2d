"""SD 3 / 3.5 in Stability AI's single-file layout (``sd3.5_large.safetensors``, ``sd3.5_medium.safetensors``):
the MMDiT under ``model.diffusion_model.`` (or bare, transformer-only files) with fused ``attn.qkv`` and the
adaLN-only modulations as (shift, scale); all-in-one files add ``first_stage_model.*`` (the 16-channel VAE in
LDM names) and ``text_encoders.clip_l/clip_g/t5xxl.transformer.*`` (transformers' layouts)."""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..config import MMDiTConfig, VAEConfig
from . import original_layout
from .io import CheckpointError
from .mmdit import expected_shapes

PREFIX = "model.diffusion_model."
MARKER = "joint_blocks.0.context_block.adaLN_modulation.1.bias"  # what diffusers detects SD 3 by
TEXT_ENCODERS = ("clip_l", "clip_g", "t5xxl")

_STREAM = [  # inside joint_blocks.N.{x,context}_block.
    (r"modulation\.", "adaLN_modulation.1."),
    (r"attn(2?)\.[qkv]\.", r"attn\g<s>.qkv."),
    (r"attn(2?)\.out\.", r"attn\g<s>.proj."),
    (r"attn(2?)\.norm_q\.", r"attn\g<s>.ln_q."),
    (r"attn(2?)\.norm_k\.", r"attn\g<s>.ln_k."),
    (r"mlp\.", "mlp."),
]
_RULES = [
    (r"patch_embed\.proj\.", "x_embedder.proj."),
    (r"patch_embed\.pos_embed$", "pos_embed"),
    (r"time_embed\.fc1\.", "t_embedder.mlp.0."),
    (r"time_embed\.fc2\.", "t_embedder.mlp.2."),
    (r"pooled_embed\.fc1\.", "y_embedder.mlp.0."),
    (r"pooled_embed\.fc2\.", "y_embedder.mlp.2."),
    (r"context_proj\.", "context_embedder."),
    (r"final_modulation\.", "final_layer.adaLN_modulation.1."),
    (r"final_proj\.", "final_layer.linear."),
    *[(r"blocks\.(?P<n>\d+)\.image\." + p.replace("(2?)", "(?P<s>2?)"), r"joint_blocks.\g<n>.x_block." + r)
      for p, r in _STREAM],
    *[(r"blocks\.(?P<n>\d+)\.text\." + p.replace("(2?)", "(?P<s>2?)"), r"joint_blocks.\g<n>.context_block." + r)
      for p, r in _STREAM],
]


def layout(config: MMDiTConfig) -> original_layout.Layout:
    last = f"joint_blocks.{config.num_layers - 1}.context_block.adaLN_modulation.1."  # plain adaLN: 2 vectors
    return original_layout.build_layout("SD 3 MMDiT (Stability layout)", expected_shapes(config), _RULES,
                                        lambda name: name.startswith(("final_layer.adaLN_modulation.1.", last)))


def is_sd3(state: Mapping[str, torch.Tensor]) -> bool:
    return MARKER in state or PREFIX + MARKER in state


def transformer_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = original_layout.strip_prefix(state, PREFIX, MARKER)
    return {k: v for k, v in state.items()
            if not k.startswith(("first_stage_model.", "text_encoders.", "model.diffusion_model."))}


def _blocks(state: Mapping[str, torch.Tensor], part: str) -> list[int]:
    return sorted({int(k.split(".")[1]) for k in state if k.startswith("joint_blocks.") and f".{part}." in k})


def config_of(state: Mapping[str, torch.Tensor], source: object = "state dict", *, head_dim: int = 64,
              sample_size: int = 128) -> MMDiTConfig:
    """An MMDiTConfig from the tensor shapes: depth, width, dual-attention blocks (MMDiT-X), QK-norm, grid.
    Not stored: the head width without QK-norm (SD 3's 64) and the base grid size (``sample_size``, 128)."""
    state = transformer_tensors(state)
    if MARKER not in state:
        raise CheckpointError(f"{source}: not an SD 3 MMDiT in Stability's layout (no {MARKER})")
    width, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in state
    head_dim = state["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0] if qk_norm else head_dim
    grid = math.isqrt(state["pos_embed"].shape[1])
    return MMDiTConfig(in_channels=in_channels, out_channels=state["final_layer.linear.weight"].shape[0] // patch ** 2,
                       patch_size=patch, num_layers=len(_blocks(state, "x_block")), num_heads=width // head_dim,
                       head_dim=head_dim, context_dim=state["context_embedder.weight"].shape[1],
                       pooled_dim=state["y_embedder.mlp.0.weight"].shape[1], sample_size=sample_size,
                       pos_embed_max_size=grid,
                       dual_attention_blocks=tuple(sorted({int(k.split(".")[1]) for k in state
                                                           if ".x_block.attn2." in k})),
                       qk_norm=qk_norm)


def variant(state: Mapping[str, torch.Tensor]) -> str:
    """"sd35_medium" (MMDiT-X: dual attention), "sd35_large" (38 blocks), or "sd3_medium" (no QK-norm)."""
    config = config_of(state)
    if config.dual_attention_blocks:
        return "sd35_medium"
    if config.num_layers == 38:
        return "sd35_large"
    return "sd3_medium" if not config.qk_norm else f"sd3_{config.num_layers}_blocks"


def from_original(state: Mapping[str, torch.Tensor], config: MMDiTConfig | None = None,
                  source: object = "state dict") -> dict[str, torch.Tensor]:
    """The MMDiT of an SD 3 single file (all-in-one or transformer-only) -> torchsd's names."""
    tensors = transformer_tensors(state)
    return original_layout.read(layout(config or config_of(tensors, source)), tensors, source)


def to_original(state: Mapping[str, torch.Tensor], config: MMDiTConfig, prefix: str = PREFIX
                ) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in original_layout.write(layout(config), state).items()}


def read_all_in_one(state: Mapping[str, torch.Tensor], source: object = "state dict",
                    config: MMDiTConfig | None = None, vae_config: VAEConfig | None = None) -> dict[str, dict]:
    """{"transformer": torchsd MMDiT, "vae": torchsd VAE (when present), "clip_l"/"clip_g"/"t5xxl": the text
    encoders' tensors in transformers' layout (when present), for the CLIP and T5 readers}."""
    from .bfl import vae_from_original

    out: dict[str, dict] = {"transformer": from_original(state, config, source)}
    if "first_stage_model.decoder.conv_in.weight" in state:
        out["vae"] = vae_from_original(state, vae_config or VAEConfig.sd3(), source)
    for name in TEXT_ENCODERS:
        prefix = f"text_encoders.{name}.transformer."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if tensors:
            out[name] = tensors
    return out


def all_in_one_tensors(transformer: Mapping[str, torch.Tensor], config: MMDiTConfig,
                       vae: Mapping[str, torch.Tensor] | None = None, vae_config: VAEConfig | None = None,
                       text_encoders: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                       ) -> dict[str, torch.Tensor]:
    """The inverse of ``read_all_in_one``: torchsd's MMDiT (and VAE), with the text encoders' tensors in
    transformers' layout, as one Stability-layout state dict."""
    from .bfl import vae_to_original

    out = to_original(transformer, config)
    if vae is not None:
        vae_tensors = vae_to_original(vae, vae_config or VAEConfig.sd3())
        out.update({"first_stage_model." + k: v for k, v in vae_tensors.items()})
    for name, tensors in (text_encoders or {}).items():
        if name not in TEXT_ENCODERS:
            raise ValueError(f"text encoder {name!r}: an SD 3 single file holds {TEXT_ENCODERS}")
        out.update({f"text_encoders.{name}.transformer.{k}": v for k, v in tensors.items()})
    return out
