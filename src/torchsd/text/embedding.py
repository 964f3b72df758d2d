"""A textual-inversion embedding (Gal et al. 2022): learned token vectors that a prompt uses by name.

Files are read by ``checkpoints/embeddings.py``; prompts splice the vectors in (``conditioning.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # (n_vectors, width), float32 on the CPU
    path: Path

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.shape[1]


class EmbeddingSource(Protocol):
    """Where a prompt's embedding names are looked up (``checkpoints.embeddings.EmbeddingLibrary``)."""

    dirs: list[Path]

    def files(self) -> dict[str, Path]: ...

    def load(self, name: str, path: Path) -> Embedding: ...
