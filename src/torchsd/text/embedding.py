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
    # SDXL files hold one set per text encoder (clip_l, clip_g): the sets beyond ``vectors``
    other_vectors: tuple[torch.Tensor, ...] = ()

    def vectors_for(self, width: int) -> torch.Tensor | None:
        """The vectors for a text encoder of this width (SDXL: CLIP-L's 768 or bigG's 1280); None if none."""
        return next((v for v in (self.vectors, *self.other_vectors) if v.shape[1] == width), None)

    @property
    def widths(self) -> list[int]:
        return [v.shape[1] for v in (self.vectors, *self.other_vectors)]

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
