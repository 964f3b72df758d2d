"""Handing freed memory back to the system, for the CPU paths that drop large tensors mid-run (packed weights
swapped in and out, text encoders freed before a transformer).

glibc keeps freed blocks below its mmap threshold (32 MiB; a bf16 1280-channel 3x3 weight is 29 MB) for
reuse, so a process that frees many such blocks and then allocates differently-sized ones stacks the new on
top of the old. ``malloc_trim(0)`` returns those pages. On other C libraries this does nothing."""

from __future__ import annotations

import ctypes
import functools
import gc


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory(collect: bool = False) -> None:
    """Give the pages of freed heap blocks back to the system; ``collect``: run the garbage collector first,
    so that tensors only cycles still hold are freed too."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
