"""k-diffusion's ``sampling.py`` (what AUTOMATIC1111 runs) as a test reference, without its package.

k-diffusion is installed with ``--no-deps``: its package ``__init__`` imports torchvision, clean-fid and more,
so ``import k_diffusion`` fails. ``sampling.py`` itself needs only scipy, torchdiffeq, torchsde, tqdm and
``utils.append_dims`` (``external.py`` also needs ``sampling``); this loads them by file path under a stand-in
parent package that provides just that.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_PACKAGE = "_k_diffusion_standin"


def _append_dims(x, target_dims):
    """k-diffusion's utils.append_dims: trailing singleton dimensions up to ``target_dims``."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def _load(module: str) -> types.ModuleType:
    name = f"{_PACKAGE}.{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = []
        package.utils = types.SimpleNamespace(append_dims=_append_dims)
        sys.modules[_PACKAGE] = package
        sys.modules[f"{_PACKAGE}.utils"] = package.utils
    path = Path(next(iter(spec.submodule_search_locations))) / f"{module}.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    loaded = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = loaded
    module_spec.loader.exec_module(loaded)
    setattr(sys.modules[_PACKAGE], module, loaded)
    return loaded


def load_sampling() -> types.ModuleType:
    """k_diffusion.sampling: the sample_* functions and get_sigmas_karras / _exponential."""
    return _load("sampling")


def load_external() -> types.ModuleType:
    """k_diffusion.external: the discrete-schedule denoisers AUTOMATIC1111 wraps its model in."""
    load_sampling()
    return _load("external")


class BrownianPath:
    """A Brownian motion W in sigma, extended downward from the first level with normal increments drawn from
    ``generator``: a stand-in for k-diffusion's torchsde ``BrownianTreeNoiseSampler`` (the same law) whose
    numbers come from a torch generator, so that they can be matched.

    Called as k-diffusion calls a noise sampler, ``(sigma, sigma_next)`` with sigma already on the path, it returns
    (W(sigma_next) - W(sigma)) / sqrt(sigma - sigma_next): intervals that overlap share their increments."""

    def __init__(self, like, generator):
        self.like, self.generator = like, generator
        self.points: dict[float, object] = {}  # sigma -> W(sigma)

    def _at(self, sigma: float):
        return self.points[min(self.points, key=lambda known: abs(known - sigma))]

    def __call__(self, sigma, sigma_next):
        import torch

        sigma, sigma_next = float(sigma), float(sigma_next)
        if not self.points:
            self.points[sigma] = torch.zeros_like(self.like)
        lowest = min(self.points)
        if sigma_next < lowest * (1 - 1e-6):
            step = torch.randn(self.like.shape, generator=self.generator, dtype=self.like.dtype)
            self.points[sigma_next] = self.points[lowest] + (lowest - sigma_next) ** 0.5 * step
        return (self._at(sigma_next) - self._at(sigma)) / (sigma - sigma_next) ** 0.5
