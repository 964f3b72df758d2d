"""``optimize(model, device, dtype)``: the models' plain blocks swapped for the fast ones of ``accel``.

The swap is a table, plain class -> fast class. Each fast module is built from the plain one it replaces
and takes over its state as it is: the same child modules, Parameters, buffers and hooks (nothing is
copied), so the state dict keeps its keys, a LoRA merged into a weight is seen by both, and ``deoptimize``
gives the plain classes back. Nothing patches ``forward`` on a live object: the fast classes define it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models.clip import EncoderLayer
from ..models.layers import Downsample, ResnetBlock, Upsample
from ..models.unet import CrossAttention, GEGLUFeedForward, SpatialTransformer
from ..models.vae import SelfAttention2d
from . import fused
from .modules import (
    BandedFeedForward,
    FastCrossAttention,
    FastSelfAttention2d,
    FusedDownsample,
    FusedEncoderLayer,
    FusedResnetBlock,
    FusedSpatialTransformer,
    SubpixelUpsample,
)
from .prepacked import PackableConv2d, is_packing

# plain class -> fast class. Exact types only, so a subclass (a model's own variant of a block) is
# left as it is; of the convolutions only the 3x3 ones, which ``packed_weights`` packs.
FAST: dict[type, type] = {
    ResnetBlock: FusedResnetBlock,
    Downsample: FusedDownsample,
    Upsample: SubpixelUpsample,
    CrossAttention: FastCrossAttention,
    GEGLUFeedForward: BandedFeedForward,
    SpatialTransformer: FusedSpatialTransformer,
    SelfAttention2d: FastSelfAttention2d,
    EncoderLayer: FusedEncoderLayer,
    nn.Conv2d: PackableConv2d,
}
PLAIN = {fast: plain for plain, fast in FAST.items()}
# instance attributes that only a fast module has (caches, per-loop state), dropped by ``deoptimize``
_FAST_ONLY = {FastCrossAttention: ("_context_cache",), PackableConv2d: ("packing",)}
_DTYPES = (torch.float32, torch.bfloat16)


def applies(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``optimize`` swaps anything in: a CPU, float32 or bfloat16, PyTorch with the oneDNN ops."""
    return torch.device(device).type == "cpu" and dtype in _DTYPES and fused.available()


def optimize(model: nn.Module, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> nn.Module:
    """Swap ``model``'s plain blocks for their fast versions, in place, for inference on ``device`` in
    ``dtype`` (default: where ``model``'s parameters are, and their dtype). Where nothing applies (not a
    CPU, float16, no oneDNN) ``model`` is left as it is. Optimizing twice changes nothing.

    Returns ``model``, or its replacement where ``model`` is itself one of the swapped blocks."""
    parameter = next(model.parameters(), None)
    if device is None:
        device = parameter.device if parameter is not None else "cpu"
    if dtype is None:
        dtype = parameter.dtype if parameter is not None else torch.float32
    if not applies(device, dtype):
        return model
    return _convert(model, _fast_version, {})


def deoptimize(model: nn.Module) -> nn.Module:
    """The inverse of ``optimize``: the plain classes back, holding the same layers (outside a sampling
    loop's ``packed_weights``). Returns ``model``, or its replacement where it is itself a fast block."""
    if any(is_packing(m) for m in model.modules()):
        raise ValueError("deoptimize inside packed_weights (a sampling loop): its weights are packed; "
                         "call it after the loop")
    return _convert(model, _plain_version, {})


def _fast_version(module: nn.Module) -> nn.Module | None:
    fast = FAST.get(type(module))
    if fast is None or (fast is PackableConv2d and module.kernel_size != (3, 3)):
        return None
    return _rebuild(fast, module)


def _plain_version(module: nn.Module) -> nn.Module | None:
    plain = PLAIN.get(type(module))
    if plain is None:
        return None
    return _rebuild(plain, module, drop=_FAST_ONLY.get(type(module), ()))


def _rebuild(cls: type, module: nn.Module, drop: tuple[str, ...] = ()) -> nn.Module:
    """A ``cls`` holding ``module``'s state: its attribute dict's entries, the containers of child modules,
    Parameters, buffers and hooks among them, taken over as they are."""
    new = cls.__new__(cls)
    new.__dict__.update((k, v) for k, v in module.__dict__.items() if k not in drop)
    return new


def _convert(module: nn.Module, version: Callable[[nn.Module], nn.Module | None], done: dict) -> nn.Module:
    """``module`` with every submodule (and itself) replaced where ``version`` gives a replacement; a
    module reached twice (shared) gets one replacement."""
    if id(module) in done:
        return done[id(module)]
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _convert(child, version, done)
            if new is not child:
                module._modules[name] = new
    replaced = version(module) or module
    done[id(module)] = replaced
    return replaced
