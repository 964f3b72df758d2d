"""Folders of add-on files named by their file names, as AUTOMATIC1111 finds LoRAs and embeddings.

A folder is listed when a name is looked up; a file is read on first use and again only when it changes
on disk (its modification time or size), and its hash is computed once per version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, TypeVar

from .io import named_files

T = TypeVar("T")


@dataclass
class FileLibrary:
    """The base of ``LoraLibrary`` and ``EmbeddingLibrary``: its folders, and what it has read from them."""

    suffixes: ClassVar[tuple[str, ...]] = ()
    missing_folder: ClassVar[str] = "folder {folder!r} does not exist"  # the error for add_dir, with the fix

    dirs: list[Path] = field(default_factory=list)
    max_cached: int = 8  # files kept read, the most recently used
    _loaded: dict[Path, tuple[tuple[int, int], object]] = field(default_factory=dict, repr=False)
    _hashes: dict[tuple[Path, int, int], str] = field(default_factory=dict, repr=False)

    def add_dir(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(self.missing_folder.format(folder=str(folder)))
        if folder not in self.dirs:
            self.dirs.append(folder)

    def files(self) -> dict[str, Path]:
        """name -> file under the folders (the first of equal names wins)."""
        return named_files(self.dirs, self.suffixes)

    def cached(self, path: Path, read: Callable[[], T]) -> T:
        """``read()``'s result for ``path``, read again only when the file changed."""
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._loaded.pop(path, None)
        if cached is None or cached[0] != stamp:
            cached = (stamp, read())
        self._loaded[path] = cached  # most recently used last
        while len(self._loaded) > self.max_cached:
            self._loaded.pop(next(iter(self._loaded)))
        return cached[1]

    def file_hash(self, path: Path, compute: Callable[[Path], str]) -> str:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = compute(path)
        return self._hashes[key]
