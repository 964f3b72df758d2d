"""Linear and convolution layers with their epilogue fused in, for CPU inference.

A layer's output is usually consumed at once by one cheap elementwise step: a residual add, the
time-embedding add, GEGLU's GELU and product. Done separately, each step reads and writes the whole
activation again, and on a CPU that memory traffic is a visible share of a U-Net step. oneDNN can apply
such a step to each output block while it is still in cache (its "post-ops"); PyTorch exposes that as
``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``, the ops Inductor emits for the
same fusions. They also bring oneDNN's matmul, faster here than the BLAS behind ``F.linear``
(docs/performance.md), with the bias added in the kernel rather than copied into the output first.

Every function here means exactly its plain PyTorch expression, which it falls back to wherever the
fused kernel does not apply: under autograd, off the CPU, in float16, while ``torch.compile`` traces
(Inductor fuses on its own), and for any layer that is not a plain ``nn.Linear`` / ``nn.Conv2d``
(a LoRA wrapper, a layer with hooks such as sequential offload's). The models never call these: the
blocks of ``accel.modules``, swapped in by ``accel.optimize``, do.
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
    """A bare Linear/Conv2d (or a subclass that declares ``plain_call``, as ``prepacked.PackableConv2d``
    does) whose call is just its weights: no hooks, no forward replaced on the object."""
    return ((type(layer) in (nn.Linear, nn.Conv2d) or getattr(type(layer), "plain_call", False))
            and not layer._forward_hooks and not layer._forward_pre_hooks and "forward" not in layer.__dict__)


# A convolution may hold its weight packed for a while (``prepacked.PackableConv2d``, which calls this module,
# so it is recognised by what it offers rather than imported): ``packing`` is set inside ``packed_weights``,
# ``packed_weight(x)`` gives the reordered weight, ``plain_weight()`` the plain one written back first.

def _is_packing(conv: nn.Module) -> bool:
    return getattr(conv, "packing", None) is not None


def _plain_weight(conv: nn.Conv2d) -> torch.Tensor:
    return conv.plain_weight() if hasattr(conv, "plain_weight") else conv.weight


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


def linear_gelu(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``F.gelu(layer(x))`` (exact, erf GELU)."""
    if _fusable(x, layer):
        return _mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu", [], "none")
    return F.gelu(layer(x))


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
        return winograd.conv3x3(x, _plain_weight(conv), conv.bias, residual)
    weight = None
    if _is_packing(conv) and _packing_pays(x, conv):  # inside ``prepacked.packed_weights``
        weight = conv.packed_weight(x)
    if weight is None:
        weight = _plain_weight(conv)  # written back first if it was packed at another size
        if _as_matmul_wins(x, conv):
            return _conv_as_matmul(x, weight, conv, residual)
    args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None:
        return _mkldnn._convolution_pointwise(x, weight, conv.bias, *args, "none", [], "")
    return _mkldnn._convolution_pointwise.binary(x, residual, weight, conv.bias, *args, "add", None, None, [], None)


def _output_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))


WINOGRAD_MIN_PIXELS = 2048  # output pixels in the batch; below, the per-call filter transform no longer pays


def _winograd_wins(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """float32 3x3 convolutions over at least ``WINOGRAD_MIN_PIXELS`` output pixels in the batch (32x32 at
    batch 2), on a CPU where they beat oneDNN's direct convolution (``winograd.pays``; docs/performance.md,
    "Winograd")."""
    B, _, H, W = x.shape
    return (B * H * W >= WINOGRAD_MIN_PIXELS and winograd.applies(x, conv.weight, conv.padding, conv.stride,
                                                                   conv.dilation, conv.groups) and winograd.pays())


PACKING_PIXELS = {torch.float32: (256, 512), torch.bfloat16: (128, 512)}  # output pixels in the batch


def _packing_pays(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Where a weight reordered once (``prepacked``) beats reordering it at every call by enough to repay
    the reorder in and out within a few steps: ``PACKING_PIXELS`` (16x16 at batch 2, and 8x8 in bf16);
    larger maps make the per-call reorder a small share (docs/performance.md, "--prepack")."""
    B = x.shape[0]
    h, w = _output_size(x, conv)
    low, high = PACKING_PIXELS.get(x.dtype, (256, 512))
    return low <= B * h * w <= high


AS_MATMUL_MAX_PIXELS = 64  # output pixels per image (8x8); bf16 only up to 16 (4x4) unless over 1280 channels


def _as_matmul_wins(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """At a few output pixels, oneDNN's direct convolution spends much of its time reordering the weight.
    As a matmul with the weight as the left operand, the weight is read as it is and only the (small)
    unfolded input is reordered: faster up to 8x8 in float32, and in bf16 at 4x4 and for the up path's
    wide skip concatenations at 8x8 (docs/performance.md, "Few-pixel convolutions")."""
    h, w = _output_size(x, conv)
    limit = AS_MATMUL_MAX_PIXELS if x.dtype == torch.float32 or x.shape[1] > 1280 else 16
    return conv.groups == 1 and conv.kernel_size != (1, 1) and h * w <= limit


def _conv_as_matmul(x: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d,
                    residual: torch.Tensor | None) -> torch.Tensor:
    """The convolution as unfold (im2col) and one matmul: weight (out, in*kh*kw) @ columns (in*kh*kw, B*hw)."""
    B = x.shape[0]
    h, w = _output_size(x, conv)
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (B, in*kh*kw, hw)
    cols = cols.transpose(1, 2).reshape(B * h * w, -1)  # (B*hw, in*kh*kw): the matmul's "weight" operand
    y = matmul_nt(weight.flatten(1), cols)  # (out, B*hw)
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
