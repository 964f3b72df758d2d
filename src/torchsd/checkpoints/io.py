"""Safe reading and atomic writing of tensor files.

safetensors files are memory-mapped; pickled ``.ckpt``/``.pt``/``.bin`` files are read only through
``torch.load(weights_only=True)``, which refuses any pickle that would run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


def load_state_dict(path: str | Path, *, device: str = "cpu", keep: Callable[[str], bool] | None = None,
                    cast: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or pickled checkpoint file, flat, nothing executed. ``keep``: only the
    names it accepts (a .safetensors file then reads nothing else: one part of an all-in-one file).
    ``cast(name, tensor)``: applied to each tensor as a .safetensors file is read, one at a time, so that an
    fp16 file read into bf16 never holds both copies of every weight."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device, keep, cast)
    if path.suffix in PICKLE_SUFFIXES:
        tensors = _load_pickle(path, device)
        return {k: cast(k, v) if cast is not None else v for k, v in tensors.items() if keep is None or keep(k)}
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or "
                          f"one of {', '.join(PICKLE_SUFFIXES)}")


# --- the weights of one model folder (diffusers' ModelMixin and transformers' PreTrainedModel layouts) ---

# Stems of the weight files the reference libraries write: diffusers' models, transformers' safetensors,
# transformers' pickles. A variant ("fp16") goes before the last suffix: model.fp16.safetensors,
# diffusion_pytorch_model.safetensors.index.fp16.json, model.fp16-00001-of-00002.safetensors.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (diffusers' and transformers' rule)."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def weight_file_names(variant: str | None) -> list[str]:
    """The file names a folder's weights may have, in the order the reference libraries look for them:
    diffusers' models try a shard index before one file, transformers' one file before an index; both
    prefer safetensors to pickles."""
    names = []
    for suffix in ("safetensors", "bin"):
        index = add_variant(f"diffusion_pytorch_model.{suffix}.index.json", variant)
        names += [index, add_variant(f"diffusion_pytorch_model.{suffix}", variant)]
        if variant is not None:  # diffusers < 0.27 named variant indexes ...safetensors.fp16.index.json
            names.append(f"diffusion_pytorch_model.{suffix}.{variant}.index.json")
    for suffix, stem in (("safetensors", "model"), ("bin", "pytorch_model")):
        names += [add_variant(f"{stem}.{suffix}", variant), add_variant(f"{stem}.{suffix}.index.json", variant)]
    return names


def variants_in(folder: Path) -> list[str]:
    """The variants ("fp16", "ema" …) whose weight files ``folder`` holds: the part after the stem's dot,
    as diffusers reads it (``model.fp16-00001-of-00002.safetensors`` -> "fp16")."""
    found = set()
    for path in folder.iterdir() if folder.is_dir() else ():
        parts = path.name.split(".")
        if parts[0].split("-")[0] in WEIGHT_STEMS and len(parts) > 2:
            part = parts[1].split("-")[0]
            if part not in ("safetensors", "bin"):
                found.add(part)
    return sorted(found)


def has_variant(folder: Path, variant: str) -> bool:
    """diffusers' test of whether a pipeline component comes in ``variant``: some file in its folder has a
    second dot-separated part starting with the variant's name."""
    return folder.is_dir() and any(len(p.name.split(".")) > 1 and p.name.split(".")[1].startswith(variant)
                                   for p in folder.iterdir())


def find_weights(folder: str | Path, variant: str | None = None) -> Path:
    """The weights file, or the shard index, of one model folder (``unet/``, ``text_encoder/`` …).

    Like diffusers and transformers, a ``variant`` is looked for under its own names only, and no variant
    under the plain names only: a folder that holds only ``model.fp16.safetensors`` needs ``variant="fp16"``."""
    folder = Path(folder)
    for name in weight_file_names(variant):
        if (folder / name).is_file():
            return folder / name
    expected = f"{add_variant('diffusion_pytorch_model.safetensors', variant)} (diffusers) or " \
               f"{add_variant('model.safetensors', variant)} (transformers), or their .bin or sharded .index.json forms"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; it should hold {expected}")
    present = variants_in(folder)
    if variant is None and present:
        raise CheckpointError(f"{folder}: holds only {' and '.join(present)} variant weights, no plain ones; load it "
                              f"with variant={present[0]!r} (--variant {present[0]}), as diffusers requires")
    there = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    hint = f"; the variants there are {', '.join(present)}" if present and variant not in present else ""
    raise CheckpointError(f"{folder}: no weights file; expected {expected}. The folder holds: {there}{hint}")


def read_weights(folder: str | Path, variant: str | None = None, dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """All tensors of one model folder: one file, or every shard its index names. ``dtype``: float tensors
    converted to it as they are read (one copy at a time, not two of the whole model)."""
    path = find_weights(folder, variant)
    cast = (lambda key, value: value.to(dtype) if value.is_floating_point() else value) if dtype is not None else None
    return read_sharded(path, cast) if path.name.endswith(".json") else load_state_dict(path, cast=cast)


def read_sharded(index: Path, cast: Callable[[str, torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The shards an ``*.index.json`` names ({"weight_map": {key: shard file}}), checked against its map."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a shard index ({type(err).__name__}: {err}); it should be JSON with a "
                              f"\"weight_map\" of tensor name -> shard file") from None
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = index.parent / shard
        if Path(shard).name != shard or not path.is_file():
            raise CheckpointError(f"{index}: names the shard {shard!r}, which is not in {index.parent}; the download "
                                  f"is incomplete: fetch every file the index lists")
        state.update(load_state_dict(path, cast=cast))
    missing = [key for key, shard in weight_map.items() if key not in state]
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} tensors it lists are in none of its shards (first: "
                              f"{missing[0]} in {weight_map[missing[0]]}); a shard is stale or from another model")
    return state


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _load_safetensors(path: Path, device: str, keep: Callable[[str], bool] | None = None,
                      cast: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if keep is None and cast is None:
            return load_file(str(path), device=device)
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: cast(k, f.get_tensor(k)) if cast is not None else f.get_tensor(k)
                    for k in f.keys() if keep is None or keep(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from None


def _load_pickle(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, which would run the code; say what it tried instead
        blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
        if blocked is None:
            operand = re.search(r"Unsupported operand \d+", str(err))
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): the pickle is not "
                                  f"a PyTorch checkpoint ({operand.group(0) if operand else 'unreadable'})") from None
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors (it would import "
            f"{blocked.group(1)}: run code or build arbitrary objects, which torchsd never allows). Convert it to "
            f".safetensors with a tool you trust, or ask its author for a .safetensors file") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): it asks for more "
                              f"memory than this machine has") from None
    except Exception as err:  # noqa: BLE001 - random bytes make the unpickler fail in any way (IndexError, KeyError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): "
                              f"{type(err).__name__}: {err}") from None
    return flatten_state_dict(obj, path)


def flatten_state_dict(obj: object, path: Path | str = "checkpoint") -> dict[str, torch.Tensor]:
    """Accept {"state_dict": {...}} (Lightning), {"model": ...}, {"params_ema": ...} (BasicSR: the EMA weights
    before the raw ones, as Real-ESRGAN and AUTOMATIC1111 use them), or a flat dict of tensors."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module", "params_ema", "params"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path}: holds no tensors; it is not a model checkpoint")


def file_sha256(path: str | Path, offset: int = 0) -> str:
    """sha256 of a file's bytes from ``offset`` on, read in 1 MiB blocks (the hashes A1111 shows are prefixes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def named_files(folders: list[Path], suffixes: tuple[str, ...]) -> dict[str, Path]:
    """name (file stem) -> file for every file with one of ``suffixes`` under ``folders``; the first of
    equal names wins. How LoRA and embedding names in prompts are found, as AUTOMATIC1111 finds them."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix in suffixes and path.is_file():
                found.setdefault(path.stem, path)
    return found


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what ``atomic_path`` leaves in ``folder`` when its process is killed mid-write (a SIGKILL
    runs no cleanup). Only for a folder the caller owns, such as a training run being resumed."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
