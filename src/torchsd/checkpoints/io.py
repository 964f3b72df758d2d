"""Safe reading and atomic writing of tensor files.

safetensors files are memory-mapped; pickled ``.ckpt``/``.pt``/``.bin`` files are read only through
``torch.load(weights_only=True)``, which refuses any pickle that would run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


def load_state_dict(path: str | Path, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or pickled checkpoint file, flat, nothing executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, device)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or "
                          f"one of {', '.join(PICKLE_SUFFIXES)}")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _load_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
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
    """Accept {"state_dict": {...}} (Lightning), {"model": ...}, or a flat dict of tensors."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
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


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
