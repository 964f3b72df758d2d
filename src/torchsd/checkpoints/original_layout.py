"""Original single-file layouts that fuse several of torchsd's tensors into one (FLUX.1's ``img_attn.qkv``,
``single_blocks.N.linear1``; SD 3's ``attn.qkv``) and store some modulations as (shift, scale) where torchsd
keeps (scale, shift). A ``Layout`` is built by rules from the exact names and shapes a config implies, so
reading checks the exact key set and every shape, and writing is its inverse."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..models.quantized import QuantizedTensor
from .io import CheckpointError

Rules = list[tuple[str, str]]  # (torchsd regex, original replacement); first full-prefix match wins


@dataclass(frozen=True)
class Layout:
    what: str  # e.g. "FLUX.1 transformer (BFL layout)"
    parts: dict[str, tuple[str, ...]]  # original name -> torchsd names, concatenated along dim 0 in order
    part_shapes: dict[str, tuple[int, ...]]  # torchsd name -> shape
    swapped: frozenset[str]  # original names stored (shift, scale); torchsd's are (scale, shift)

    def shape(self, original: str) -> tuple[int, ...]:
        shapes = [self.part_shapes[n] for n in self.parts[original]]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self.parts}


def build_layout(what: str, shapes: Mapping[str, tuple[int, ...]], rules: Rules,
                 is_swapped: Callable[[str], bool] = lambda name: False) -> Layout:
    compiled = [(re.compile(p), r) for p, r in rules]
    parts: dict[str, list[str]] = {}
    for name in shapes:
        parts.setdefault(_original_name(name, compiled, what), []).append(name)
    return Layout(what, {k: tuple(v) for k, v in parts.items()}, dict(shapes),
                  frozenset(k for k in parts if is_swapped(k)))


def _original_name(name: str, rules, what: str) -> str:
    for pattern, replacement in rules:
        match = pattern.match(name)
        if match:
            return match.expand(replacement) + name[match.end():]
    raise KeyError(f"no original {what} name for torchsd parameter {name!r}")


def swap_halves(t):
    """(a; b) -> (b; a) along the rows, also for weights kept quantized (their rows are stored apart)."""
    first, second = t.chunk(2, dim=0)
    return QuantizedTensor.cat([second, first]) if isinstance(t, QuantizedTensor) else torch.cat([second, first])


def check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str,
               source: object) -> None:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: not a {what} of the expected size: missing {missing[:5]}"
                              f"{'…' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
                              f"{'…' if len(unexpected) > 5 else ''} ({len(unexpected)}) — another variant or "
                              f"model size?")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(f"{source}: {what} tensor {name} has shape {tuple(state[name].shape)}; "
                                  f"expected {tuple(shape)}")


def read(layout: Layout, state: Mapping[str, torch.Tensor], source: object = "state dict"
         ) -> dict[str, torch.Tensor]:
    """Original names -> torchsd's; fused tensors split by the parts' sizes (views, no copies)."""
    check_keys(state, layout.expected_shapes(), layout.what, source)
    out = {}
    for original, names in layout.parts.items():
        tensor = state[original]
        if original in layout.swapped:
            tensor = swap_halves(tensor)
        sizes = [layout.part_shapes[n][0] for n in names]
        out.update(zip(names, tensor.split(sizes, dim=0)))
    return out


def write(layout: Layout, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchsd's names -> the original layout (fused tensors concatenated)."""
    check_keys(state, layout.part_shapes, layout.what, "torchsd state dict")
    out = {}
    for original, names in layout.parts.items():
        tensor = torch.cat([state[n] for n in names]) if len(names) > 1 else state[names[0]].contiguous()
        out[original] = swap_halves(tensor) if original in layout.swapped else tensor
    return out


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str, marker: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` with it removed when ``prefix + marker`` is present (all-in-one files,
    ComfyUI's saves), else all of them as they are (transformer-only files)."""
    if prefix + marker in state:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)
