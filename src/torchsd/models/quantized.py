"""Weights kept quantized in memory and dequantized layer by layer when the layer runs, so that a model
larger than memory in bfloat16 (FLUX.1: 12 B parameters, 24 GB) fits: fp8 (ComfyUI / A1111 files, with an
optional per-tensor or per-row scale) and GGUF's block formats (llama.cpp's ggml: Q8_0, Q4_0, Q4_K, Q5_K,
and F16/BF16 kept as they are).

``QuantizedLinear`` replaces an ``nn.Linear`` at load time (checkpoints/quantized.py swaps it in, as accel
swaps faster modules in); the model files keep building plain layers. The GGUF block layouts are those of
ggml-quants.c; the dequantizers here are torch ports of the ``gguf`` package's numpy reference, tested
against it: as fast as numpy on one CPU core, and they run where the weights are (a GPU), so only the
quantized bytes ever live on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QK_K = 256  # values per K-quant super-block
# ggml type -> (values per block, bytes per block)
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144), "Q5_K": (256, 176)}
FLOAT_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn,
               "float8_e5m2": torch.float8_e5m2}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32 of the little-endian halves."""
    return raw.contiguous().view(torch.float16).float()


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 34): d (f16), 32 int8 -> (n, 32) = d * q."""
    return _f16(blocks[:, :2]) * blocks[:, 2:].contiguous().view(torch.int8).float()


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 18): d, 16 bytes of nibbles (low nibbles are values 0-15, high 16-31) -> d * (q - 8)."""
    qs = blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float() - 8
    return _f16(blocks[:, :2]) * q


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of 6-bit scales and mins of the 8 sub-blocks of a Q4_K / Q5_K super-block -> (n, 8) each."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, 128) bytes -> (n, 8, 32): each 32 bytes give the low nibbles of one sub-block, then the high."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 144): d, dmin, 12 bytes of scales, 128 bytes of nibbles -> (n, 256) = d*sc*q - dmin*min."""
    sc, mn = _k_scales(blocks[:, 4:16])
    d, dmin = _f16(blocks[:, 0:2]) * sc, _f16(blocks[:, 2:4]) * mn  # (n, 8)
    q = _k_low_nibbles(blocks[:, 16:]).float()
    return (d[..., None] * q - dmin[..., None]).reshape(-1, QK_K)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """(n, 176): as Q4_K plus 32 bytes of high bits (bit j of byte i is the fifth bit of sub-block j's value i)."""
    sc, mn = _k_scales(blocks[:, 4:16])
    d, dmin = _f16(blocks[:, 0:2]) * sc, _f16(blocks[:, 2:4]) * mn
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=blocks.device)[:, None]
    q = (_k_low_nibbles(blocks[:, 48:]) | ((qh & 1) << 4)).float()
    return (d[..., None] * q - dmin[..., None]).reshape(-1, QK_K)


_DEQUANTIZE = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_K": dequantize_q4_k, "Q5_K": dequantize_q5_k}


@dataclass
class QuantizedTensor:
    """A 2-D weight as stored: GGUF blocks as (rows, bytes per row) uint8, or an fp8/F16/BF16 tensor, with
    an optional fp8 scale (a scalar or one per row). ``shape`` is the logical (rows, columns)."""

    data: torch.Tensor
    qtype: str
    shape: torch.Size
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.qtype not in _DEQUANTIZE and self.qtype not in FLOAT_TYPES:
            raise ValueError(f"unsupported quantization {self.qtype!r}; supported: "
                             f"{sorted(_DEQUANTIZE) + sorted(FLOAT_TYPES)}")
        if len(self.shape) != 2 or self.data.shape[0] != self.shape[0]:
            raise ValueError(f"a quantized weight is (rows, columns) with its data stored by rows; got shape "
                             f"{tuple(self.shape)} with data {tuple(self.data.shape)}")

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.qtype in _DEQUANTIZE:
            size, nbytes = GGUF_BLOCKS[self.qtype]
            weight = _DEQUANTIZE[self.qtype](self.data.reshape(-1, nbytes)).reshape(self.shape)
        else:
            weight = self.data.float() if self.scale is not None else self.data
        if self.scale is not None:
            scale = self.scale.float()
            weight = weight * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))
        return weight.to(dtype)

    def split(self, sizes: list[int], dim: int = 0) -> tuple["QuantizedTensor", ...]:
        """Row ranges (fused q, k, v of an original file): rows are stored independently."""
        if dim != 0:
            raise ValueError("quantized weights split by rows only")
        scales = (self.scale.reshape(-1).split(sizes) if self.scale is not None and self.scale.numel() > 1
                  else [self.scale] * len(sizes))
        return tuple(QuantizedTensor(d, self.qtype, (n, self.shape[1]), s)
                     for d, n, s in zip(self.data.split(sizes), sizes, scales))

    def chunk(self, chunks: int, dim: int = 0) -> tuple["QuantizedTensor", ...]:
        return self.split([self.shape[0] // chunks] * chunks, dim)

    @staticmethod
    def cat(parts: list["QuantizedTensor"]) -> "QuantizedTensor":
        first = parts[0]
        if any(p.qtype != first.qtype or p.shape[1] != first.shape[1] for p in parts):
            raise ValueError("only quantized weights of one type and width concatenate")
        scales = [p.scale for p in parts]
        if all(s is None for s in scales):
            scale = None
        elif all(s is not None and s.numel() == 1 for s in scales) and all(torch.equal(s, scales[0]) for s in scales):
            scale = scales[0]
        else:
            scale = torch.cat([s.float().reshape(-1).expand(p.shape[0]) for s, p in zip(scales, parts)])
        data = torch.cat([p.data.view(torch.uint8) for p in parts]).view(first.data.dtype)
        return QuantizedTensor(data, first.qtype, (sum(p.shape[0] for p in parts), first.shape[1]), scale)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored quantized and dequantized to x's dtype on each call: the float weight
    lives only while this layer runs. The stored bytes (``data``, and an fp8 ``scale``) are uint8 buffers, so
    ``model.to(device)`` moves them and ``model.to(dtype)`` leaves them as they are (it would otherwise
    widen fp8 and F16 weights, undoing the point)."""

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype = weight.qtype
        self.storage_dtype = weight.data.dtype
        self.register_buffer("data", weight.data.contiguous().view(torch.uint8))
        scale = weight.scale.float().reshape(-1) if weight.scale is not None else None
        self.register_buffer("scale", scale.view(torch.uint8) if scale is not None else None)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.loras: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (down, up, scale) side paths

    def add_lora(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        """A low-rank update kept beside the quantized weight: y += scale * (x downᵀ) upᵀ."""
        if down.shape[1] != self.in_features or up.shape[0] != self.out_features:
            raise ValueError(f"LoRA {tuple(up.shape)} @ {tuple(down.shape)} does not fit a "
                             f"({self.out_features}, {self.in_features}) layer")
        self.loras.append((down, up, scale))

    def remove_loras(self) -> None:
        self.loras.clear()

    def quantized_weight(self) -> QuantizedTensor:
        scale = self.scale.view(torch.float32) if self.scale is not None else None
        return QuantizedTensor(self.data.view(self.storage_dtype), self.qtype, (self.out_features, self.in_features),
                               scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight().dequantize(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = F.linear(x, weight, bias)
        for down, up, scale in self.loras:
            y = y + scale * F.linear(F.linear(x, down.to(x)), up.to(x))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}"
