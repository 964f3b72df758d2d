"""Linear and convolution layers with their epilogue fused in, for CPU inference.

A layer's output is usually consumed at once by one cheap elementwise step: a residual add, the
time-embedding add, GEGLU's GELU and product. Done separately, each step reads and writes the whole
activation again, and on a CPU that memory traffic is a visible share of a U-Net step. oneDNN can apply
such a step to each output block while it is still in cache (its "post-ops"); PyTorch exposes that as
``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``, the ops Inductor emits for the
same fusions. They also bring oneDNN's matmul, faster here than the BLAS behind ``F.linear``
(fp32 8192x320 @ 320x320, 1 thread: 106 against 76 GFLOP/s), with the bias added in the kernel
rather than copied into the output first.

Every function here means exactly its plain PyTorch expression, which it falls back to wherever the
fused kernel does not apply: under autograd, off the CPU, in float16, while ``torch.compile`` traces
(Inductor fuses on its own), and for any layer that is not a plain ``nn.Linear`` / ``nn.Conv2d``
(a LoRA wrapper, a layer with hooks such as sequential offload's).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import winograd

_DTYPES = (torch.float32, torch.bfloat16)
_mkldnn = torch.ops.mkldnn
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


@functools.cache
def available() -> bool:
    """Whether this PyTorch has the oneDNN ops in the form used here (their signatures are internal and
    have changed between releases): one tiny call of each, once."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, w, b = torch.ones(1, 2, 3, 3), torch.ones(2, 2, 3, 3), torch.zeros(2)
    try:
        _mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
        _mkldnn._convolution_pointwise.binary(x, x, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, None, [], None)
        t, m = torch.ones(3, 2), torch.ones(2, 2)
        _mkldnn._linear_pointwise(t, m, None, "gelu", [], "none")
        _mkldnn._linear_pointwise.binary(t, t, m, b, "mul")
    except (AttributeError, RuntimeError, TypeError):
        return False
    return True


def is_plain(layer: nn.Module) -> bool:
    """A bare Linear/Conv2d whose call is just its weights: no hooks, no replaced forward (except
    ``prepacked``'s, whose weights this module uses itself)."""
    return (type(layer) in (nn.Linear, nn.Conv2d) and not layer._forward_hooks and not layer._forward_pre_hooks
            and ("forward" not in layer.__dict__ or "_prepacked" in layer.__dict__))


def cpu_inference(x: torch.Tensor) -> bool:
    """Where the oneDNN kernels here (and ``cpu_attention``'s) may replace plain PyTorch: CPU inference
    in fp32/bf16, not under autograd, not while ``torch.compile`` traces."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and not torch.is_grad_enabled() and not _is_compiling()
            and available())


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for a (M, K) and b (N, K), through oneDNN: fp32 accumulation, output in the inputs' dtype."""
    return _mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _fusable(x: torch.Tensor, layer: nn.Module) -> bool:
    return (cpu_inference(x) and is_plain(layer) and layer.weight.dtype == x.dtype
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


def linear(x: torch.Tensor, layer: nn.Module, *, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x) + residual``."""
    if _fusable(x, layer):
        if residual is None:
            return _mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
        return _mkldnn._linear_pointwise.binary(x, residual, layer.weight, layer.bias, "add")
    y = layer(x)
    return y if residual is None else y.add_(residual)  # a fresh output: in place is safe under autograd


def geglu(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """GEGLU (Shazeer 2020): ``hidden * gelu(gate)`` where ``hidden, gate = proj(x).chunk(2, -1)``.

    Fused: the gate half of ``proj`` with GELU as its epilogue, then the hidden half with "multiply by
    the gate" as its epilogue; the (tokens, 2 * inner) projection is never written out."""
    if _fusable(x, proj):
        inner = proj.out_features // 2
        w, b = proj.weight, proj.bias
        b_hidden, b_gate = (None, None) if b is None else (b[:inner], b[inner:])
        gate = _mkldnn._linear_pointwise(x, w[inner:], b_gate, "gelu", [], "none")  # "none": exact (erf) GELU
        return _mkldnn._linear_pointwise.binary(x, gate, w[:inner], b_hidden, "mul")
    hidden, gate = proj(x).chunk(2, dim=-1)
    if torch.is_grad_enabled():
        return hidden * F.gelu(gate)
    return F.gelu(gate).mul_(hidden)  # one allocation fewer at inference


def conv2d(x: torch.Tensor, conv: nn.Conv2d, *, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x) + residual``; residual has the output's shape or broadcasts over H, W as (B, C, 1, 1)."""
    y = try_conv2d(x, conv, residual=residual)
    if y is not None:
        return y
    y = conv(x)
    return y if residual is None else y.add_(residual)


def try_conv2d(x: torch.Tensor, conv: nn.Conv2d, *, residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """``conv2d`` through oneDNN, or None where that does not apply (the caller then takes the plain path)."""
    if not (_fusable(x, conv) and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)):
        return None
    if _winograd_wins(x, conv):
        from ..prepacked import plain_weight  # not released by ``prepacked`` unless it ran packed before
        return winograd.conv3x3(x, plain_weight(conv), conv.bias, residual)
    weight = None
    if "_prepacked" in conv.__dict__ and _packing_pays(x, conv):  # inside ``prepacked.packed_weights``
        from ..prepacked import packed_weight
        weight = packed_weight(conv, x)
    if weight is None:
        if _as_matmul_wins(x, conv):
            return _conv_as_matmul(x, conv, residual)
        weight = conv.weight
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None:
        return _mkldnn._convolution_pointwise(x, weight, conv.bias, *args, "none", [], "")
    return _mkldnn._convolution_pointwise.binary(x, residual, weight, conv.bias, *args, "add", None, None, [], None)


def _output_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def _winograd_wins(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """float32 3x3 convolutions over at least 2048 output pixels in the batch (32x32 at batch 2). Measured
    here against oneDNN's direct convolution, 1 thread, SD 1.5 U-Net shapes at batch 2: 0.74-0.80x at 64x64
    and 32x32 up to 960 input channels, 0.86-0.91x with 1280-1920; at 16x16 1280 channels 1.17x (the filter
    transform, made per call, no longer pays). VAE shapes at batch 1, 64-256 px: 0.68-0.76x."""
    B, _, H, W = x.shape
    return B * H * W >= 2048 and winograd.applies(x, conv.weight, conv.padding, conv.stride, conv.dilation,
                                                   conv.groups)


def _packing_pays(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Where a weight reordered once (``prepacked``) beats reordering it at every call by enough to repay
    the reorder in and out within a few steps: 256-512 output pixels in the batch (16x16 at batch 2), and
    in bf16 from 128 (8x8). Chosen per layer (1 thread, SD 1.5 U-Net, each layer timed alone): bf16 8x8
    and 16x16 repaid in 4-9 steps, fp32 16x16 in 3-4, fp32 8x8 in 13 (its reorder is slower and its weight
    twice the bytes), 4x4 in 35-80; from 32x32 up the per-call reorder is a small share. Inside a whole
    step the saving was smaller: the loop repaid in 3-7 steps except bf16 at 256 px, 26 steps
    (docs/performance.md), which is why packing is opt-in."""
    B = x.shape[0]
    h, w = _output_size(x, conv)
    return (128 if x.dtype == torch.bfloat16 else 256) <= B * h * w <= 512


def _as_matmul_wins(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """At a few output pixels, oneDNN's direct convolution spends much of its time reordering the weight.
    As a matmul with the weight as the left operand, the weight is read as it is and only the (small)
    unfolded input is reordered. Measured here, 1 thread, 1280 channels at 4x4 / 8x8 outputs: float32
    40 / 64 ms direct against 11 / 42 ms as a matmul; bfloat16 9.8 / 21 against 6.1 / 22. With the wider
    inputs of the up path's skip concatenations bf16 gains at 8x8 too (2560 -> 1280: 68 against 45 ms,
    1920 -> 1280: 51 against 32), but not at 16x16 (163 against 180)."""
    h, w = _output_size(x, conv)
    limit = 64 if x.dtype == torch.float32 or x.shape[1] > 1280 else 16
    return conv.groups == 1 and conv.kernel_size != (1, 1) and h * w <= limit


def _conv_as_matmul(x: torch.Tensor, conv: nn.Conv2d, residual: torch.Tensor | None) -> torch.Tensor:
    """The convolution as unfold (im2col) and one matmul: weight (out, in*kh*kw) @ columns (in*kh*kw, B*hw)."""
    B = x.shape[0]
    h, w = _output_size(x, conv)
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, in*kh*kw, hw)
    cols = cols.transpose(1, 2).reshape(B * h * w, -1)  # (B*hw, in*kh*kw): the matmul's "weight" operand
    y = matmul_nt(conv.weight.flatten(1), cols)  # (out, B*hw)
    y = y.view(-1, B, h, w).transpose(0, 1)  # (B, out, h, w), a view
    out = torch.empty(y.shape, dtype=y.dtype, device=x.device, memory_format=torch.channels_last if is_channels_last(x)
                      else torch.contiguous_format)
    if conv.bias is None:
        out.copy_(y)
    else:
        torch.add(y, conv.bias[:, None, None], out=out)
    return out if residual is None else out.add_(residual)


def is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
