"""Quantized files, read without dequantizing: fp8 safetensors as ComfyUI and A1111 save them, and GGUF
(city96's FLUX.1 / SD 3.5 GGUFs hold the original single-file names). Their 2-D weights become
``QuantizedTensor``s; ``load_quantized`` builds the model on the meta device and swaps a
``models.quantized.QuantizedLinear`` in for every linear layer whose weight is quantized, so only the
quantized bytes are ever held.

fp8 layouts: plain ``float8_e4m3fn`` / ``float8_e5m2`` weights (weight = stored value), and ComfyUI's "scaled
fp8" (a ``scaled_fp8`` marker tensor, ``<layer>.scale_weight`` and ``<layer>.scale_input``) or its newer
``<layer>.weight_scale`` / ``input_scale`` (weight = stored value * scale, a scalar or one per output row).
The input scales only matter to fp8 matrix units; the dequantized product is the same without them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ..models.quantized import GGUF_BLOCKS, QuantizedLinear, QuantizedTensor
from .io import CheckpointError, load_state_dict

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
WEIGHT_SCALES = ("scale_weight", "weight_scale")
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
IGNORED_KEYS = ("scaled_fp8",)

Tensors = dict[str, "torch.Tensor | QuantizedTensor"]


def read_fp8(path: str | Path, keep: Callable[[str], bool] | None = None, dtype: torch.dtype | None = None
             ) -> Tensors:
    """An fp8 safetensors file: fp8 matrices as QuantizedTensors (with their scales), the rest as stored.
    ``keep``: only the tensors whose names it accepts (a part of an all-in-one file; nothing else is read).
    ``dtype``: 16- and 32-bit float weights converted to it as they are read (not the fp8 ones, nor scales)."""
    def cast(key: str, value: torch.Tensor) -> torch.Tensor:
        wide = value.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return value.to(dtype) if wide and key.rsplit(".", 1)[-1] not in WEIGHT_SCALES else value

    state = load_state_dict(path, keep=keep, cast=cast if dtype is not None else None)
    out: Tensors = {}
    for key, value in state.items():
        if key.split(".")[-1] in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES) or \
                key.rsplit(".", 1)[-1] in WEIGHT_SCALES:
            continue
        scale = next((state[f"{key[:-len('weight')]}{s}"] for s in WEIGHT_SCALES
                      if key.endswith(".weight") and f"{key[:-len('weight')]}{s}" in state), None)
        if value.dtype in FP8 and value.ndim == 2:
            out[key] = QuantizedTensor(value, str(value.dtype).removeprefix("torch."), value.shape, scale)
        elif value.dtype in FP8 or scale is not None:
            out[key] = value.float() * (scale.float() if scale is not None else 1)
        else:
            out[key] = value
    return out


def read_gguf(path: str | Path, keep: Callable[[str], bool] | None = None) -> Tensors:
    """A GGUF file: block-quantized and F16/BF16 matrices as QuantizedTensors (copied into memory as
    stored), F32 and 1-D tensors as torch tensors. GGUF lists dimensions innermost first. ``keep``: only
    the tensors whose names it accepts."""
    try:
        import gguf
    except ImportError as error:
        raise CheckpointError(f"{path}: reading GGUF files needs the 'gguf' package "
                              f"(pip install 'torchsd[gguf]')") from error

    out: Tensors = {}
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as error:  # a bad header, or tensors past the file's end
        raise CheckpointError(f"{path}: not a readable GGUF file ({error}); is the download complete?") from error
    with open(path, "rb") as file:
        for tensor in reader.tensors:
            if keep is None or keep(tensor.name):
                out[tensor.name] = gguf_tensor(reader, tensor, read_bytes(file, tensor.data_offset, tensor.n_bytes),
                                               path)
    return out


def gguf_tensor(reader, tensor, data: torch.Tensor, path: str | Path) -> "torch.Tensor | QuantizedTensor":
    """One GGUF tensor from its stored bytes: a QuantizedTensor for a matrix, a torch tensor otherwise."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    # ComfyUI-GGUF stores convolutions flattened to 2-D, with their shape in the metadata
    field = reader.fields.get(f"comfy.gguf.orig_shape.{tensor.name}")
    true_shape = tuple(int(field.parts[i][0]) for i in field.data) if field is not None else shape
    kind = tensor.tensor_type.name
    if kind == "F32":
        return data.view(torch.float32).reshape(true_shape)
    if kind in ("F16", "BF16"):
        value = data.view(torch.float16 if kind == "F16" else torch.bfloat16)
        return (QuantizedTensor(value.reshape(shape), kind, shape) if len(true_shape) == 2
                else value.float().reshape(true_shape))
    if kind in GGUF_BLOCKS:
        if len(true_shape) == 2:
            return QuantizedTensor(data.reshape(shape[0], -1), kind, shape)
        # vectors and convolutions are small: dequantized once, here
        flat = QuantizedTensor(data.reshape(1, -1), kind, (1, math.prod(shape)))
        return flat.dequantize().reshape(true_shape)
    raise CheckpointError(f"{path}: tensor {tensor.name} is {kind}; torchsd reads F32, F16, BF16 and "
                          f"{', '.join(GGUF_BLOCKS)} GGUF tensors")


def read_bytes(file, offset: int, size: int) -> torch.Tensor:
    """``size`` bytes at ``offset`` read straight into a new tensor. Not through the reader's memory map: a
    mapped page touched by the copy counts in the process's RSS until the map is closed, which doubled the
    peak while a 6 GiB FLUX.1 file loaded; read() leaves them in the page cache only."""
    data = torch.empty(size, dtype=torch.uint8)
    file.seek(offset)
    if file.readinto(memoryview(data.numpy())) != size:
        raise CheckpointError(f"{file.name}: the file ends inside a tensor (truncated download?)")
    return data


def read_quantized(path: str | Path, keep: Callable[[str], bool] | None = None, dtype: torch.dtype | None = None
                   ) -> Tensors:
    """``dtype``: for safetensors files, see ``read_fp8`` (GGUF files keep their float tensors as stored)."""
    return read_gguf(path, keep) if Path(path).suffix == ".gguf" else read_fp8(path, keep, dtype)


def load_quantized(build: Callable[[], nn.Module], state: Mapping[str, "torch.Tensor | QuantizedTensor"],
                   dtype: torch.dtype = torch.float32, source: object = "state dict") -> nn.Module:
    """``build()`` on the meta device, then every quantized linear weight swapped in as a QuantizedLinear
    (its bias with it) and the other tensors assigned in ``dtype``; every name and shape is checked."""
    with torch.device("meta"):
        model = build()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plain, quantized = {}, set()
    for name, value in state.items():
        if name not in expected:
            continue  # reported by the strict check below
        if tuple(value.shape) != expected[name]:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(value.shape)}; expected "
                                  f"{expected[name]}")
        if isinstance(value, QuantizedTensor):
            path = name.removesuffix(".weight")
            if not name.endswith(".weight") or not isinstance(model.get_submodule(path), nn.Linear):
                plain[name] = value.dequantize(dtype)
                continue
            bias = state.get(f"{path}.bias")
            model.set_submodule(path, QuantizedLinear(value, bias.to(dtype) if bias is not None else None))
            quantized.update({name, f"{path}.bias"})
        else:
            plain[name] = value.to(dtype)
    missing = sorted(set(expected) - set(plain) - quantized)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    model.load_state_dict({k: v for k, v in plain.items() if k not in quantized}, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no values for {left[:5]} (tensors the model computes, not stored)")
    return model.eval()


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights of a model (what stays resident between layers)."""
    return sum(m.quantized_weight().nbytes for m in model.modules() if isinstance(m, QuantizedLinear))


def load_flux(path: str | Path, config=None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A FLUX.1 transformer from a BFL-layout GGUF or fp8 file (or a plain one), weights kept quantized."""
    from ..models.flux import Flux
    from . import bfl

    tensors = bfl.transformer_tensors(read_quantized(path))
    config = config or bfl.config_of(tensors, path)
    return load_quantized(lambda: Flux(config), bfl.from_bfl(tensors, config, path), dtype, path)


def load_mmdit(path: str | Path, config=None, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """An SD 3 / 3.5 MMDiT from a Stability-layout GGUF or fp8 file (transformer-only or all-in-one)."""
    from ..models.mmdit import MMDiT
    from . import sd3_original

    tensors = sd3_original.transformer_tensors(read_quantized(path))
    config = config or sd3_original.config_of(tensors, path)
    return load_quantized(lambda: MMDiT(config), sd3_original.from_original(tensors, config, path), dtype, path)
