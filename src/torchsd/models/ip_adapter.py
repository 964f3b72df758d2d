"""IP-Adapter (Ye et al. 2023): an image prompt as extra tokens that the U-Net's cross-attention reads apart.

A CLIP image encoder's output becomes a few tokens of the text context's width: the basic adapter projects
the pooled image embedding (Linear to T tokens, LayerNorm: ``ImageProjection``), "Plus" resamples the
penultimate hidden states with a small Perceiver (``Resampler``: learned queries cross-attending to the image
features). Each cross-attention layer gets its own keys and values for those tokens (``to_k_ip``, ``to_v_ip``)
and adds ``scale * attention(q, k_ip, v_ip)`` to its text attention before the output projection
("decoupled cross-attention"); the U-Net's weights are unchanged. Module names follow the original files
(``image_proj.proj``, ``image_proj.layers.{i}.0.to_kv`` …); ``checkpoints/ip_adapter.py`` maps the per-layer
weights, which the files number in diffusers' processor order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import CLIPVisionConfig
from .clip import CLIPVisionModel
from .layers import attention


@dataclass(frozen=True)
class IPAdapterConfig:
    """``plus``: the Resampler (image hidden states) instead of the projection of the pooled embedding."""

    image_dim: int = 1024  # the image encoder's embedding (basic) or hidden width (plus)
    context_dim: int = 768  # the U-Net's cross-attention width
    tokens: int = 4
    plus: bool = False
    hidden_dim: int = 768  # the Resampler's width, depth and heads (plus only)
    depth: int = 4
    head_dim: int = 64
    heads: int = 12
    ffn_mult: int = 4


class ImageProjection(nn.Module):
    def __init__(self, c: IPAdapterConfig):
        super().__init__()
        self.tokens = c.tokens
        self.proj = nn.Linear(c.image_dim, c.tokens * c.context_dim)
        self.norm = nn.LayerNorm(c.context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, image_dim) pooled embedding -> (B, tokens, context_dim)."""
        return self.norm(self.proj(image_embeds).reshape(image_embeds.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """The queries (latents) attend to the image features and to themselves."""

    def __init__(self, dim: int, head_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = head_dim * heads
        self.norm1 = nn.LayerNorm(dim)  # the image features
        self.norm2 = nn.LayerNorm(dim)  # the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)  # (B, T + Q, inner)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class Resampler(nn.Module):
    def __init__(self, c: IPAdapterConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, c.tokens, c.hidden_dim) / c.hidden_dim ** 0.5)
        self.proj_in = nn.Linear(c.image_dim, c.hidden_dim)
        self.proj_out = nn.Linear(c.hidden_dim, c.context_dim)
        self.norm_out = nn.LayerNorm(c.context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.hidden_dim, c.head_dim, c.heads),
                           nn.Sequential(nn.LayerNorm(c.hidden_dim),
                                         nn.Linear(c.hidden_dim, c.hidden_dim * c.ffn_mult, bias=False),
                                         nn.GELU(), nn.Linear(c.hidden_dim * c.ffn_mult, c.hidden_dim, bias=False))])
            for _ in range(c.depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T, image_dim) image hidden states -> (B, tokens, context_dim)."""
        latents = self.latents.repeat(hidden_states.shape[0], 1, 1)
        x = self.proj_in(hidden_states)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPKeysValues(nn.Module):
    def __init__(self, context_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)


class IPAdapter(nn.Module):
    """The image projection and one key/value pair per U-Net cross-attention layer, in the order the U-Net
    runs them (down levels, middle, up levels). ``widths``: each layer's width."""

    def __init__(self, config: IPAdapterConfig, widths: list[int]):
        super().__init__()
        self.config = config
        self.image_proj = Resampler(config) if config.plus else ImageProjection(config)
        self.layers = nn.ModuleList(IPKeysValues(config.context_dim, w) for w in widths)

    def image_tokens(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.image_proj(image_features)

    def keys_values(self, tokens: torch.Tensor, scale: float) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """The extra keys and values of every cross-attention layer for these image tokens (computed once: the
        image is the same at every step), as ``UNet.forward(image_keys_values=)`` takes them."""
        return [(layer.to_k_ip(tokens), layer.to_v_ip(tokens), scale) for layer in self.layers]


def cross_attention_widths(unet) -> list[int]:
    """The width of every cross-attention layer of a torchsd U-Net, in the order its forward runs them."""
    return [m.attn2.to_q.out_features for m in unet.modules() if hasattr(m, "attn2")]


class ImageEncoder(nn.Module):
    """CLIP's image tower with its projection (transformers' CLIPVisionModelWithProjection, the
    ``image_encoder/`` IP-Adapters ship with): the projected embedding for the basic adapter, the penultimate
    layer's hidden states for "Plus"."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision = CLIPVisionModel(config)
        self.visual_projection = nn.Linear(config.width, config.projection_dim, bias=False)

    def features(self, pixels: torch.Tensor, plus: bool) -> torch.Tensor:
        """CLIP-normalised (B, 3, S, S) -> (B, projection_dim) embeds, or (B, 1 + patches, width) for "Plus"."""
        if not plus:
            return self.visual_projection(self.vision(pixels))
        v = self.vision  # the tower's own steps, stopping one layer early (its penultimate hidden states)
        patches = v.patch_embedding(pixels.to(v.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.to(patches.dtype).expand(pixels.shape[0], 1, -1), patches], dim=1)
        x = v.pre_layernorm(x + v.position_embedding.weight[None])
        for layer in v.layers[:-1]:
            x = layer(x, causal=False)
        return x
