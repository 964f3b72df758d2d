"""Building blocks shared by the U-Net and the autoencoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_attention, fused


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, *,
              causal: bool = False, mask: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention; the one place every model attends.

    q: (B, Tq, C), k and v: (B, Tk, C) -> (B, Tq, C). ``mask`` is additive, broadcastable to
    (B, heads, Tq, Tk). Uses torch SDPA, which picks flash / memory-efficient kernels where it can, except
    for bfloat16 on the CPU over many keys, where ``cpu_attention`` is faster at the same precision.
    ``chunk``: attend at most this many queries at a time, so that a kernel that materialises the
    (Tq, Tk) score matrix holds only (chunk, Tk) of it (large images on backends without flash kernels).
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"attention chunk must be a positive number of queries; got {chunk}")
    if cpu_attention.applies(q, k, causal, mask):
        return cpu_attention.attention(q, k, v, num_heads, block=chunk)
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
        # the adds ride on the convolutions (fused.conv2d): the time embedding as a (B, C, 1, 1) broadcast
        t = None if self.time_emb_proj is None else \
            repeat_rows(self.time_emb_proj(F.silu(temb))[:, :, None, None], x.shape[0])
        h = fused.conv2d(silu(self.norm1(x)), self.conv1, residual=t)
        skip = x if self.conv_shortcut is None else fused.conv2d(x, self.conv_shortcut)
        return fused.conv2d(silu(self.norm2(h)), self.conv2, residual=skip)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The autoencoder pads asymmetrically (right/bottom), the U-Net symmetrically."""

    def __init__(self, channels: int, *, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return fused.conv2d(x, self.conv)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _subpixel_applies(x, self.conv):
            from ..prepacked import plain_weight  # the weight is read here, not through the conv's forward
            return upsample_conv_subpixel(x, plain_weight(self.conv), self.conv.bias)
        # bf16 nearest-upsampling is missing on MPS; the result is exact in any dtype. Elsewhere the
        # direct bf16 kernel is 2-4x faster than a float32 round trip (measured on CPU, NCHW and NHWC)
        if x.dtype == torch.bfloat16 and x.device.type == "mps":
            return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))
        return fused.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), self.conv)


def _subpixel_applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """On a CPU, where there are enough pixels to pay for folding the weight on each call: from 16x16 up,
    and in bf16 from 8x8 where the batch has at least a tenth of an input pixel per channel. Measured here
    (1 thread) against upsample-then-conv: 0.48-0.69x the time at 32x32 and up; at 16x16, 1280 channels
    0.68x in fp32 and 0.53x in bf16 (batch 2; batch 1: 0.89x, 0.61x); at 8x8 in bf16 0.82x for 1280
    channels at batch 2 but 1.14x at batch 1, and in fp32 1.3-1.7x; 4x4 slower still. Not on CUDA,
    whose 3x3 convolutions already use Winograd's saving."""
    B, C, H, W = x.shape
    enough = H * W >= 256 or (x.dtype == torch.bfloat16 and H * W >= 64 and 10 * B * H * W >= C)
    return (x.device.type == "cpu" and enough and fused.is_plain(conv)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


# _SUBPIXEL_TAPS[p, a, k]: for output pixels of parity p, which source offset a (0: the earlier of the two
# source pixels the 3-tap window covers, 1: the later) each kernel tap k reads after nearest 2x upsampling.
_SUBPIXEL_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],    # even: tap 0 -> i-1; taps 1, 2 -> i
                               [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])   # odd: taps 0, 1 -> i; tap 2 -> i+1


def upsample_conv_subpixel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv3x3(upsample_nearest_2x(x))`` without the upsampled map: each of the four output parities
    (even/odd row x even/odd column) sees only a 2x2 window of x, so the 3x3 kernel folds into four 2x2
    kernels (taps that land on the same source pixel summed), each run at the input's resolution.
    16 instead of 36 multiply-adds per input pixel and channel pair, the same result up to float rounding
    of the summed weights (the "resize-convolution" identity)."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    taps = _SUBPIXEL_TAPS.to(x.device)
    # (3x3 taps, parity, 2x2 taps) of 0s and 1s: exact in any dtype, and a bf16 matmul sums in fp32, so
    # each folded weight is rounded once, as folding in fp32 and casting would
    fold = torch.einsum("pak,qcl->klpqac", taps, taps).reshape(9, 4, 4).to(weight.dtype)
    w = weight.reshape(O * C, 9)
    y = torch.empty((B, O, 2 * H, 2 * W), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if fused.is_channels_last(x) else torch.contiguous_format)
    parities = y.view(B, O, H, 2, W, 2)
    for py in range(2):
        for px in range(2):
            folded = (w @ fold[:, 2 * py + px]).view(O, C, 2, 2)
            # padded by 1 all round, a 2x2 kernel gives (H+1, W+1) outputs; even rows/columns read
            # pixels i-1 and i (the first H), odd ones i and i+1 (the last H). One parity at a time: the
            # peak is one (B, O, H+1, W+1) map beside the result, not four
            out = F.conv2d(x, folded, bias, padding=1)
            parities[:, :, :, py, :, px] = out[:, :, py:py + H, px:px + W]
    return y
