"""Convolution weights kept in oneDNN's own layout for the length of a sampling loop (CPU inference).

A plain ``F.conv2d`` on a CPU hands oneDNN a weight in PyTorch's OIHW layout, which oneDNN reorders into
its blocked layout on every call. For the U-Net's wide 3x3 convolutions at low resolution that reorder
costs as much as the convolution (docs/performance.md, "--prepack"), and a sampling loop makes the same
reorders at every step.

``accel.optimize`` swaps each 3x3 ``nn.Conv2d`` for a ``PackableConv2d``: the same layer (its Parameters,
its state-dict keys), which outside ``packed_weights`` is exactly ``nn.Conv2d``. ``packed_weights(model)``
is a context for a sampling loop. Inside it, each packable convolution at the sizes where the per-call
reorder is a large share (``fused._packing_pays``) reorders its weight at its first call, as Inductor's
weight freezing does, and then *releases the plain copy* (its storage is resized to nothing), so the
model holds one copy of each weight, never two. On leaving, the plain weights are written back from the
reordered ones: a reorder only moves numbers, so they come back bit for bit, in the same Parameters.
What the loop costs is one reorder in and one out per weight, against one per weight per step without it.

Inside the context:
- a weight whose storage other tensors share (a state dict kept aside, another model built on the same
  tensors) is left as it is: releasing it would break them, and keeping both would be a second copy;
- anything that needs the plain weight (autograd, float16, a hook, a replaced Parameter, code that reads
  the weight itself through ``plain_weight``) gets it back first, and that convolution then stays
  plain until the context ends.
"""

from __future__ import annotations

import enum
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..memory import return_freed_memory
from . import fused

_lock = threading.Lock()
_depth: dict[int, int] = {}  # id(model) -> how many contexts are open on it (nested or from threads)


def prepacking_available() -> bool:
    return fused.available() and hasattr(torch._C, "_storage_Use_Count")


class _Packed:
    """The reordered weight of one convolution, and what is needed to give the plain one back."""

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor):
        w = self.param = conv.weight  # the Parameter to give the weight back to, even if conv.weight changes
        self.stride = w.stride()
        self.weight = torch.ops.mkldnn._reorder_convolution_weight(
            w, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape))
        w.untyped_storage().resize_(0)  # the plain copy's memory goes back now
        return_freed_memory()


def _releasable(w: torch.Tensor) -> bool:
    """Whether ``w``'s memory is this Parameter's alone: one storage reference from the tensor, one from
    the temporary asked here. Views, ``.data``/``detach()`` aliases and state dicts each hold another."""
    storage = w.untyped_storage()
    return (storage.resizable() and storage.nbytes() > 0 and w.storage_offset() == 0
            and storage.nbytes() == w.numel() * w.element_size()
            and torch._C._storage_Use_Count(storage._cdata) == 2)


class Stage(enum.Enum):
    """Where a ``PackableConv2d`` is inside ``packed_weights``, before or instead of being packed."""

    PENDING = "pending"  # released for packing: packs at its first call where packing pays
    PLAIN = "plain"  # keeps its plain weight until the context ends


class PackableConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight ``packed_weights`` may hold in oneDNN's layout for a while (see the module
    doc). ``packing``: None outside the context, else a ``Stage`` or the packed weight."""

    packing: Stage | _Packed | None = None
    plain_call = True  # its call is its weights' (``fused.is_plain``): the fused kernels may run it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packing is None:
            return super().forward(x)
        # inside the context: ``fused`` uses the packed weight where its kernels apply (CPU inference in
        # fp32/bf16); anything else writes the plain weight back and takes the ordinary path
        y = fused.try_conv2d(x, self)
        if y is not None:
            return y
        return self._conv_forward(x, self.plain_weight(), self.bias)

    @property
    def packed(self) -> bool:
        """Whether the weight is held packed now (its plain copy released)."""
        return isinstance(self.packing, _Packed)

    def packed_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The reordered weight for input ``x`` inside ``packed_weights`` (made at the first call), or None
        where the plain weight is to be used."""
        state = self.packing
        if state is Stage.PENDING:
            if not _releasable(self.weight):
                self.packing = Stage.PLAIN
                return None
            state = self.packing = _Packed(self, x)
        if not isinstance(state, _Packed):
            return None
        if state.param is not self.weight:  # a new Parameter was assigned inside the loop: use it as it is
            self._restore(state)
            return None
        return state.weight

    def plain_weight(self) -> torch.Tensor:
        """``self.weight``, written back first if it is packed: for code that reads the weight itself."""
        if isinstance(self.packing, _Packed):
            self._restore(self.packing)
        return self.weight

    def _restore(self, state: _Packed) -> None:
        """Write the plain weight back from the packed one into the Parameter it came from (``self.weight``,
        unless another was assigned since); the convolution stays plain from now on."""
        self.packing = Stage.PLAIN
        w = state.param
        dense = state.weight.to_dense()  # contiguous OIHW
        if dense.stride() != state.stride:  # the layout it had (channels-last weights)
            dense = torch.empty_strided(dense.shape, state.stride, dtype=dense.dtype).copy_(dense)
        w.data = dense  # the same Parameter, on a new storage: nothing else referred to the released one


def is_packing(conv: nn.Module) -> bool:
    """Whether ``conv`` is a packable convolution inside ``packed_weights``."""
    return type(conv) is PackableConv2d and conv.packing is not None


def plain_weight(conv: nn.Conv2d) -> torch.Tensor:
    """``conv.weight`` of any convolution, written back first if it is packed."""
    return conv.plain_weight() if isinstance(conv, PackableConv2d) else conv.weight


def _convolutions(model: nn.Module) -> list[PackableConv2d]:
    return [m for m in model.modules() if type(m) is PackableConv2d and m.kernel_size == (3, 3) and fused.is_plain(m)]


@contextmanager
def packed_weights(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: ``model``'s packable 3x3 convolutions (``accel.optimize`` swaps them in) use weights
    reordered once (see the module doc). Opened again on the same model (nested), the outermost context
    does the work. One sampling loop per model at a time, as the server's single worker runs them: the
    first call of each convolution packs its weight."""
    if not (enabled and prepacking_available()):
        yield
        return
    with _lock:
        first = _depth.get(id(model), 0) == 0
        convs = _convolutions(model) if first else []
        if first and not convs and any(type(m) is nn.Conv2d and m.kernel_size == (3, 3) for m in model.modules()):
            raise ValueError("packed_weights packs the convolutions that accel.optimize swaps in, and this model "
                             "has plain ones: call torchsd.accel.optimize(model, 'cpu', dtype) first (the "
                             "runtime does, for a CPU)")
        _depth[id(model)] = _depth.get(id(model), 0) + 1
        for conv in convs:
            conv.packing = Stage.PENDING
    try:
        yield
    finally:
        with _lock:
            _depth[id(model)] -= 1
            if _depth[id(model)] == 0:
                del _depth[id(model)]
                for conv in model.modules():
                    if "packing" in conv.__dict__:
                        conv.plain_weight()
                        del conv.packing
                return_freed_memory()  # the packed copies', now that the plain weights are back
