"""Helpers that build the reference implementations (diffusers, transformers) with torchsd's weights."""

from __future__ import annotations

import torch

from torchsd.checkpoints.diffusers import (
    text_config_to_transformers,
    to_diffusers_keys,
    unet_config_to_diffusers,
    vae_config_to_diffusers,
)
from torchsd.config import ModelConfig
from torchsd.pipeline import StableDiffusion


def _strip_private(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def diffusers_unet(sd: StableDiffusion):
    from diffusers import UNet2DConditionModel

    latent_size = sd.config.sample_size // sd.config.vae.downscale_factor
    cfg = _strip_private(unet_config_to_diffusers(sd.config.unet, latent_size))
    model = UNet2DConditionModel(**cfg)
    model.load_state_dict(to_diffusers_keys(sd.unet.state_dict(), "unet"), strict=True)
    return model.eval()


def diffusers_vae(sd: StableDiffusion):
    from diffusers import AutoencoderKL

    cfg = _strip_private(vae_config_to_diffusers(sd.config.vae, sd.config.sample_size))
    model = AutoencoderKL(**cfg)
    model.load_state_dict(to_diffusers_keys(sd.vae.state_dict(), "vae"), strict=True)
    return model.eval()


def transformers_text_encoder(sd: StableDiffusion):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**text_config_to_transformers(sd.config.text)))
    state = to_diffusers_keys(sd.text_encoder.state_dict(), "text_encoder")
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 drops the nesting
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


def random_pipeline(family: str = "sd1", prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusion:
    import dataclasses

    config = ModelConfig.tiny(family)
    if prediction_type != "epsilon":
        config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule,
                                                                          prediction_type=prediction_type))
    sd = StableDiffusion.from_config(config, seed=seed)
    # random init leaves some layers (zero-initialised in real training) at values far from typical;
    # perturb every parameter so that no path through the network is trivially zero
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for model in (sd.unet, sd.vae, sd.text_encoder):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return sd


def optimized(sd: StableDiffusion) -> StableDiffusion:
    """``sd`` with the CPU speed-ups swapped into its networks, as the runtime does on a CPU."""
    from torchsd.accel import optimize

    for model in sd.networks:  # U-Net, VAE and every text encoder (SDXL base: two)
        optimize(model)
    return sd


def max_rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |a - b| relative to the output's scale (its max |b|)."""
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp_min(1e-12))


# --- CLIP (joint model) --------------------------------------------------------------------------

def random_clip(seed: int = 0, text_config=None, vision_config=None):
    """A tiny joint CLIP with every parameter perturbed (LayerNorms away from 1/0, biases non-zero)."""
    from torchsd.models.clip import CLIP

    torch.manual_seed(seed)
    tiny_text, tiny_vision = CLIP.tiny_configs()
    clip = CLIP(text_config or tiny_text, vision_config or tiny_vision).eval()
    _perturb(clip, seed)
    return clip


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def transformers_clip(clip):
    """transformers' CLIPModel holding the weights of torchsd's ``clip``."""
    from transformers import CLIPConfig, CLIPModel

    from torchsd.checkpoints.clip import configs_to_transformers, to_transformers_keys

    model = CLIPModel(CLIPConfig(**configs_to_transformers(clip.text.config, clip.vision.config)))
    missing, unexpected = model.load_state_dict(to_transformers_keys(clip.state_dict()), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


def features(output) -> torch.Tensor:
    """transformers < 5 returns the projected features, >= 5 an output object holding them."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class OpenCLIPReference(torch.nn.Module):
    """OpenCLIP's ViT CLIP, written from its published layout: ``nn.MultiheadAttention`` with the fused
    ``in_proj``, sequence-first transformer, (in, out) projection matrices used as ``x @ proj``, text
    pooled at the largest token id. Its ``state_dict`` has OpenCLIP's key names."""

    def __init__(self, text, vision, activation: str = "gelu"):
        from torch import nn

        super().__init__()
        act = nn.GELU if activation == "gelu" else _QuickGELU
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.randn(text.max_positions, text.width) * 0.01)
        self.transformer = _OpenCLIPTransformer(text.width, text.num_layers, text.num_heads, text.ffn_dim, act)
        self.ln_final = nn.LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.randn(text.width, text.projection_dim) * text.width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.visual = nn.Module()
        v = self.visual
        grid = vision.image_size // vision.patch_size
        v.conv1 = nn.Conv2d(3, vision.width, vision.patch_size, stride=vision.patch_size, bias=False)
        v.class_embedding = nn.Parameter(torch.randn(vision.width) * 0.1)
        v.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, vision.width) * 0.1)
        v.ln_pre = nn.LayerNorm(vision.width)
        v.transformer = _OpenCLIPTransformer(vision.width, vision.num_layers, vision.num_heads, vision.ffn_dim, act)
        v.ln_post = nn.LayerNorm(vision.width)
        v.proj = nn.Parameter(torch.randn(vision.width, vision.projection_dim) * vision.width ** -0.5)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)
        x = self.token_embedding(ids) + self.positional_embedding[:T]
        x = self.ln_final(self.transformer(x, mask))
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x), None)
        return v.ln_post(x[:, 0]) @ v.proj


class _QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _OpenCLIPTransformer(torch.nn.Module):
    def __init__(self, width, layers, heads, ffn, act):
        from collections import OrderedDict

        from torch import nn

        super().__init__()
        self.resblocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.ln_1 = nn.LayerNorm(width)
            block.attn = nn.MultiheadAttention(width, heads)
            block.ln_2 = nn.LayerNorm(width)
            block.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, ffn)), ("gelu", act()),
                                                   ("c_proj", nn.Linear(ffn, width))]))
            self.resblocks.append(block)

    def forward(self, x, mask):
        x = x.transpose(0, 1)  # (T, B, width): MultiheadAttention's default layout
        for b in self.resblocks:
            h = b.ln_1(x)
            x = x + b.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
            x = x + b.mlp(b.ln_2(x))
        return x.transpose(0, 1)
def pixels(image) -> torch.Tensor:
    """A PIL image as a float32 tensor of its 8-bit values."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32))
