"""Building blocks shared by the U-Net and the autoencoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, *,
              causal: bool = False, mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention; the one place every model attends.

    q: (B, Tq, C), k and v: (B, Tk, C) -> (B, Tq, C). ``mask`` is additive, broadcastable to
    (B, heads, Tq, Tk). Uses torch SDPA, which picks flash / memory-efficient kernels where it can
    (``accel.optimize`` swaps in blocks that use a faster kernel for bfloat16 on some CPUs).
    ``chunk``: attend at most this many queries at a time, so that a kernel that materialises the
    (Tq, Tk) score matrix holds only (chunk, Tk) of it (large images on backends without flash kernels).
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention chunk must be a positive number of queries; got {chunk}")
    B, Tq, C = q.shape
    head_dim = C // num_heads
    q, k, v = (t.view(B, -1, num_heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
    if chunk is None or chunk >= Tq:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    else:
        if causal:  # query i attends to keys 0..i: an explicit mask keeps each chunk's offset right
            mask = _causal_mask(Tq, k.shape[2], q.dtype, q.device) if mask is None else \
                mask + _causal_mask(Tq, k.shape[2], mask.dtype, mask.device)
        out = torch.cat([
            F.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v, attn_mask=_rows(mask, i, chunk, Tq))
            for i in range(0, Tq, chunk)], dim=2)
    return out.transpose(1, 2).reshape(B, Tq, C)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) per head, (B, heads, Tq, Tk): the weights ``attention`` applies.

    SDPA never materialises them, so this is computed separately, only for whoever asks to see them."""
    B, Tq, C = q.shape
    head_dim = C // num_heads
    q, k = (t.view(B, -1, num_heads, head_dim).transpose(1, 2) for t in (q, k))  # (B, heads, T, head_dim)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(head_dim)  # (B, heads, Tq, Tk)
    return scores.softmax(dim=-1)


def _causal_mask(Tq: int, Tk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril()  # top-left aligned, as SDPA's is_causal
    return torch.zeros(Tq, Tk, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def _rows(mask: torch.Tensor | None, start: int, chunk: int, Tq: int) -> torch.Tensor | None:
    """The query rows start:start+chunk of a mask broadcastable to (B, heads, Tq, Tk)."""
    if mask is None or mask.ndim < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:start + chunk, :]


def set_attention_chunk(model: nn.Module, chunk: int | None) -> None:
    """Make every attention layer of ``model`` attend ``chunk`` queries at a time (None: all at once)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention chunk must be a positive number of queries (or None); got {chunk}")
    for module in model.modules():
        if hasattr(module, "attention_chunk"):
            module.attention_chunk = chunk


def repeat_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` repeated as a whole until it has ``rows`` rows: where the U-Net's latents, shared by several
    contexts, part ways (see ``UNet.forward``). A no-op when the counts already agree."""
    return t if t.shape[0] == rows else t.repeat(rows // t.shape[0], *(1,) * (t.ndim - 1))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a fresh activation (a norm's output), in place when no gradient flows: one allocation
    fewer per call, which on a CPU means fewer page faults (see ``benchmarks/cpu_vs_diffusers.py``)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as in the original LDM code."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with an optional timestep embedding added in between."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None, groups: int,
                 eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # the adds go in place into the convolutions' fresh outputs (safe under autograd: a convolution's
        # backward does not read its output)
        h = self.conv1(silu(self.norm1(x)))
        if self.time_emb_proj is not None:  # per channel: a (B, C, 1, 1) broadcast
            h += repeat_rows(self.time_emb_proj(F.silu(temb))[:, :, None, None], x.shape[0])
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return self.conv2(silu(self.norm2(h))).add_(skip)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The autoencoder pads asymmetrically (right/bottom), the U-Net symmetrically."""

    def __init__(self, channels: int, *, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 nearest-upsampling is missing on MPS; the result is exact in any dtype. Elsewhere the
        # direct bf16 kernel is faster than a float32 round trip
        if x.dtype == torch.bfloat16 and x.device.type == "mps":
            return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
