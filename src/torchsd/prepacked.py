"""Convolutions with weights reordered once for oneDNN, not on every call (CPU inference).

A plain ``F.conv2d`` on a CPU hands oneDNN a weight in PyTorch's OIHW layout, which oneDNN reorders into
its blocked layout on every call. For the U-Net's wide 3x3 convolutions at low resolution that reorder
costs as much as the convolution (measured here, 1 thread, fp32: 1280 channels at 8x8, 61 ms plain against
33 ms prepacked). ``prepack_convolutions`` keeps a reordered copy beside each 3x3 weight, as
Inductor's weight freezing does, without compiling anything. The price is memory: a second copy of those
weights (about 2.2 GB for an SD 1.5 U-Net in float32, 1.1 GB in bfloat16), hence opt-in.

The copy is remade whenever the weight changes (in-place edits such as LoRA merges bump the tensor's
version; a new Parameter is another object). The packed weight is used by ``models.fused`` wherever its
oneDNN kernels apply; anything else (gradients, another device, float16, padding modes, hooks) takes the
ordinary convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import fused


def prepacking_available() -> bool:
    return fused.available()


class _Packed:
    """The reordered weight of one convolution and what it was made from."""

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor):
        self.source = _source(conv)
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            conv.weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape))


def _source(conv: nn.Conv2d) -> tuple:
    w = conv.weight
    return id(w), w._version, w.data_ptr(), w.dtype


def packed_weight(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The reordered weight of a prepacked ``conv`` for input ``x``, made again if the weight changed."""
    packed = conv._prepacked
    if packed is None or packed.source != _source(conv):
        packed = conv._prepacked = _Packed(conv, x)
    return packed.weight


def _forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The replaced forward: ``fused`` uses the packed weight where its kernels apply (inference on the
    CPU in fp32/bf16); anything else is the ordinary convolution, never this forward again."""
    y = fused.try_conv2d(x, conv)
    return y if y is not None else conv._conv_forward(x, conv.weight, conv.bias)


def prepack_convolutions(model: nn.Module, enabled: bool = True) -> int:
    """Route every 3x3 ``Conv2d`` of ``model`` through a prepacked weight (or back, ``enabled=False``).
    Returns how many convolutions changed. The state dict is untouched; copies are made at first use."""
    if enabled and not prepacking_available():
        raise RuntimeError("prepacked convolutions need PyTorch built with oneDNN (mkldnn); this build has none")
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            if enabled:
                module._prepacked = None
                module.forward = _forward.__get__(module)
            else:
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_prepacked", None)
            changed += 1
    return changed
