"""Convolution weights kept in oneDNN's own layout for the length of a sampling loop (CPU inference).

A plain ``F.conv2d`` on a CPU hands oneDNN a weight in PyTorch's OIHW layout, which oneDNN reorders into
its blocked layout on every call. For the U-Net's wide 3x3 convolutions at low resolution that reorder
costs as much as the convolution (measured here, 1 thread, fp32: 1280 channels at 8x8, 61 ms plain against
33 ms reordered once), and a sampling loop makes the same reorders at every step.

``packed_weights(model)`` is a context for such a loop. Inside it, each 3x3 convolution at the sizes where
the per-call reorder is a large share (``fused._packing_pays``) reorders its weight at its first call, as
Inductor's weight freezing does, and then *releases the plain copy* (its storage is resized to nothing),
so the model holds one copy of each weight, never two. On leaving, the plain weights are written back
from the reordered ones: a reorder only moves numbers, so they come back bit for bit, in the same
Parameters. What the loop costs is one reorder in and one out per weight, against one per weight per
step without it (docs/performance.md has both).

Inside the context:
- a weight whose storage other tensors share (a state dict kept aside, another model built on the same
  tensors) is left as it is: releasing it would break them, and keeping both would be a second copy;
- anything that needs the plain weight (autograd, float16, a hook, a replaced Parameter, code that reads
  ``conv.weight`` itself through ``plain_weight``) gets it back first, and that convolution then stays
  plain until the context ends.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .models import fused

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
        _return_freed_memory()


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Hand the pages of just-freed blocks back to the system. glibc keeps blocks under 32 MB (a bf16
    1280-channel weight is 29 MB) for reuse instead, so the packed copies made next would stack on top of
    the released plain ones: measured here, a first bf16 step at 256 px peaked 0.45 GiB higher, the size
    of the packed weights."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _releasable(w: torch.Tensor) -> bool:
    """Whether ``w``'s memory is this Parameter's alone: one storage reference from the tensor, one from
    the temporary asked here. Views, ``.data``/``detach()`` aliases and state dicts each hold another."""
    storage = w.untyped_storage()
    return (storage.resizable() and storage.nbytes() > 0 and w.storage_offset() == 0
            and storage.nbytes() == w.numel() * w.element_size()
            and torch._C._storage_Use_Count(storage._cdata) == 2)


def packed_weight(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """The reordered weight of ``conv`` for input ``x`` inside ``packed_weights`` (made at the first call),
    or None where the plain weight is to be used."""
    state = conv.__dict__.get("_prepacked", False)
    if state is None:  # released and not yet made
        if not _releasable(conv.weight):
            conv._prepacked = False
            return None
        state = conv._prepacked = _Packed(conv, x)
    if state is False:
        return None
    if state.param is not conv.weight:  # a new Parameter was assigned inside the loop: use it as it is
        _restore(conv, state)
        return None
    return state.weight


def plain_weight(conv: nn.Conv2d) -> torch.Tensor:
    """``conv.weight``, written back first if it is packed: for code that reads the weight itself."""
    state = conv.__dict__.get("_prepacked")
    if state:
        _restore(conv, state)
    return conv.weight


def _restore(conv: nn.Conv2d, state: _Packed) -> None:
    """Write the plain weight back from the packed one into the Parameter it came from (``conv.weight``,
    unless another was assigned since); the convolution stays plain from now on."""
    conv._prepacked = False
    w = state.param
    dense = state.weight.to_dense()  # contiguous OIHW
    if dense.stride() != state.stride:  # the layout it had (channels-last weights)
        dense = torch.empty_strided(dense.shape, state.stride, dtype=dense.dtype).copy_(dense)
    w.data = dense  # the same Parameter, on a new storage: nothing else referred to the released one


def _forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The forward inside the context: ``fused`` uses the packed weight where its kernels apply (CPU
    inference in fp32/bf16); anything else writes the plain weight back and takes the ordinary path."""
    y = fused.try_conv2d(x, conv)
    if y is not None:
        return y
    plain_weight(conv)
    return conv._conv_forward(x, conv.weight, conv.bias)


def _convolutions(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and fused.is_plain(m)]


@contextmanager
def packed_weights(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: ``model``'s 3x3 convolutions use weights reordered once (see the module doc). Opened again
    on the same model (nested), the outermost context does the work. One sampling loop per model at a
    time, as the server's single worker runs them: the first call of each convolution packs its weight."""
    if not (enabled and prepacking_available()):
        yield
        return
    with _lock:
        first = _depth.get(id(model), 0) == 0
        _depth[id(model)] = _depth.get(id(model), 0) + 1
        convs = _convolutions(model) if first else []
        for conv in convs:
            conv._prepacked = None
            conv.forward = _forward.__get__(conv)
    try:
        yield
    finally:
        with _lock:
            _depth[id(model)] -= 1
            if _depth[id(model)] == 0:
                del _depth[id(model)]
                for conv in model.modules():
                    if "_prepacked" in conv.__dict__:
                        plain_weight(conv)
                        del conv._prepacked
                        conv.__dict__.pop("forward", None)
                _return_freed_memory()  # the packed copies', now that the plain weights are back
