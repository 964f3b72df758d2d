"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors used by file name inside prompts.

Three file layouts are read:
- AUTOMATIC1111 ``.pt``: ``{"string_to_param": {"*": (n_vectors, width)}, "name": …, "step": …}``
- ``.safetensors``: ``{"emb_params": (n_vectors, width)}``
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": (width,) or (n_vectors, width)}``
- SDXL ``.safetensors``: ``{"clip_l": (n_vectors, 768), "clip_g": (n_vectors, 1280)}``, one set per encoder

An embedding is named after its file (``EasyNegative.safetensors`` -> ``EasyNegative``), as in
AUTOMATIC1111; the name is matched against the prompt's tokens, so matching ignores case. Files are
listed when a folder is scanned but read only when a prompt uses them, so one broken or foreign file
in a folder never stops the others from working.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..text.embedding import Embedding
from .io import CheckpointError, _load_safetensors, file_sha256
from .library import FileLibrary

SUFFIXES = (".pt", ".bin", ".safetensors")


def load_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read one embedding file in any of the three layouts."""
    path = Path(path)
    name = name or path.stem
    if path.suffix == ".safetensors":
        data: object = _load_safetensors(path, "cpu")
    elif path.suffix in (".pt", ".bin"):
        data = _load_pickled(path)
    else:
        raise CheckpointError(f"{path}: embeddings are .pt, .bin or .safetensors files; got {path.suffix!r}")
    if isinstance(data, dict) and "clip_l" in data and "clip_g" in data:  # SDXL: a set per text encoder
        sets = [data["clip_l"], data["clip_g"]]
        if any(not isinstance(v, torch.Tensor) or v.ndim != 2 for v in sets) or sets[0].shape[0] != sets[1].shape[0]:
            raise CheckpointError(f"{path}: SDXL embedding {name!r} needs clip_l and clip_g of shape (n_vectors, "
                                  f"width) with the same n_vectors; got {[tuple(v.shape) for v in sets]}")
        clip_l, clip_g = (v.detach().float().cpu() for v in sets)
        return Embedding(name, clip_l, path, other_vectors=(clip_g,))
    vectors = _vectors_of(data, path)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise CheckpointError(f"{path}: embedding {name!r} has shape {tuple(vectors.shape)}; expected "
                              f"(n_vectors, width)")
    return Embedding(name, vectors.detach().float().cpu(), path)


def _load_pickled(path: Path) -> object:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than tensors and plain containers (old "
            f"AUTOMATIC1111 files store a ParameterDict). Re-save it as .safetensors with "
            f"{{'emb_params': tensor}}. Detail: {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable embedding file (truncated or corrupt?): {err}") from None


def _vectors_of(data: object, path: Path) -> torch.Tensor:
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not an embedding file (expected a dict of tensors)")
    if "string_to_param" in data:  # AUTOMATIC1111 .pt
        params = data["string_to_param"]
        tensors = [v for v in params.values() if isinstance(v, torch.Tensor)] if isinstance(params, dict) else []
        if len(tensors) != 1:
            raise CheckpointError(f"{path}: string_to_param must hold exactly one tensor; found {len(tensors)}")
        return tensors[0]
    if "emb_params" in data:
        return data["emb_params"]
    if "clip_l" in data or "clip_g" in data:
        raise CheckpointError(f"{path}: an SDXL embedding needs both clip_l and clip_g; it has only "
                              f"{'clip_l' if 'clip_l' in data else 'clip_g'}")
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1 and len(data) == 1:  # diffusers learned_embeds {token: vector}
        return tensors[0]
    raise CheckpointError(f"{path}: neither an AUTOMATIC1111 embedding (string_to_param / emb_params) nor a "
                          f"diffusers learned_embeds file (one token -> tensor); keys: {', '.join(list(data)[:5])}")


@dataclass
class EmbeddingLibrary(FileLibrary):
    """The embedding folders of a pipeline: names from file names, files read on first use."""

    suffixes: ClassVar[tuple[str, ...]] = SUFFIXES
    missing_folder: ClassVar[str] = ("embeddings folder {folder!r} does not exist; give a folder holding "
                                     ".pt/.safetensors embedding files")
    max_cached: int = 1024  # small tensors: a prompt may use many

    def load(self, name: str, path: Path) -> Embedding:
        return self.cached(path, lambda: load_embedding(path, name))

    def shorthash(self, embedding: Embedding) -> str:
        """sha256[:10] of the file, as AUTOMATIC1111 writes it into "TI hashes"."""
        return self.file_hash(embedding.path, lambda path: file_sha256(path)[:10])
