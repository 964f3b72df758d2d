"""Which operations make the host wait for a CUDA device: PyTorch's sync debug mode, turned into a record of
call sites. Used by ``gpu_issue10.py`` on a GPU and by ``tests/test_gpu_syncs_offload_memory.py`` (whose
self-test runs it on simulated syncs, without a GPU)."""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import torch

SYNC_MESSAGE = "synchronizing CUDA operation"  # torch's text in sync debug modes "warn" and "error"


def record_syncs(fn, set_mode=torch.cuda.set_sync_debug_mode) -> dict[str, list]:
    """Run ``fn`` with CUDA sync debugging on "warn": {"file:line function": [count, stack]} of every
    operation that made the host wait for the device (``set_mode`` is replaceable for the self-test)."""
    sites: dict[str, list] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE not in str(message):
            return previous(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        key = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}"
        if key not in sites:
            sites[key] = [0, "".join(traceback.format_list(frames[-10:]))]
        sites[key][0] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        previous = warnings.showwarning
        warnings.showwarning = show
        set_mode("warn")
        try:
            fn()
        finally:
            set_mode("default")
    return sites


def first_sync_error(fn, set_mode=torch.cuda.set_sync_debug_mode) -> str | None:
    """Run ``fn`` with CUDA sync debugging on "error": the traceback of the first synchronising op, or None."""
    set_mode("error")
    try:
        fn()
    except RuntimeError as err:
        if SYNC_MESSAGE not in str(err):
            raise
        return traceback.format_exc()
    finally:
        set_mode("default")
    return None


def describe(sites: dict[str, list]) -> str:
    return "\n".join(f"{site} x{count}, called from:\n{stack}" for site, (count, stack) in sites.items())
