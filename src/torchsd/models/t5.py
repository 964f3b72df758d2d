"""The T5 v1.1 encoder (Raffel et al. 2020; v1.1: gated-GELU, no bias anywhere, untied output): the third
text encoder of SD 3.5 and the main one of FLUX.1.

Pre-norm blocks with RMSNorm; attention logits are *not* scaled by 1/sqrt(head_dim) (the initialisation
absorbs it) and get a learnt bias per head and relative-position bucket, computed once from the first
layer's table and shared by every layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import T5Config


class RMSNorm(nn.Module):
    """x / rms(x) * weight, no mean subtraction and no bias (Zhang & Sennrich 2019); statistics in float32."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional buckets of key - query offsets: half the buckets per direction; in each, exact offsets
    below num_buckets/4, then logarithmic bins up to max_distance (Mesh TensorFlow's rule)."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    log_bin = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                           * (num_buckets - max_exact)).long()
    log_bin = log_bin.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bin)


class T5Attention(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        inner = c.num_heads * c.head_dim
        self.num_heads = c.num_heads
        self.q = nn.Linear(c.width, inner, bias=False)
        self.k = nn.Linear(c.width, inner, bias=False)
        self.v = nn.Linear(c.width, inner, bias=False)
        self.o = nn.Linear(inner, c.width, bias=False)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # (B, heads, T, head_dim); scale=1: T5 does not divide the logits by sqrt(head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class GatedGELU(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)) (Shazeer 2020, "GEGLU")."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.gate = nn.Linear(c.width, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.width, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class T5Block(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.attention_norm = RMSNorm(c.width, c.norm_eps)
        self.attention = T5Attention(c)
        self.ffn_norm = RMSNorm(c.width, c.norm_eps)
        self.ffn = GatedGELU(c)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), position_bias)
        return x + self.ffn(self.ffn_norm(x))


class T5Encoder(nn.Module):
    """token ids (B, T) -> final-normed hidden states (B, T, width), what SD 3.5 and FLUX.1 condition on."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.relative_attention_bias = nn.Embedding(config.num_buckets, config.num_heads)
        self.blocks = nn.ModuleList(T5Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.width, config.norm_eps)

    def position_bias(self, T: int, device: torch.device, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(1 or B, heads, T, T) additive logits: the bucket bias, and -inf where a key is padding."""
        position = torch.arange(T, device=device)
        buckets = relative_position_bucket(position[None, :] - position[:, None], self.config.num_buckets,
                                           self.config.max_distance)  # (T query, T key)
        bias = self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (1, heads, T, T)
        if attention_mask is not None:
            bias = bias.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(bias.dtype).min)
        return bias

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` (B, T), 1 for real tokens: SD 3.5 and FLUX.1 pass none (padding is attended)."""
        x = self.token_embedding(ids)  # (B, T, width)
        bias = self.position_bias(ids.shape[1], ids.device, attention_mask)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)
