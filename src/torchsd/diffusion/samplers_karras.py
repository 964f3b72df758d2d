"""Solvers of the probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma, Karras et al. 2022, and their
ancestral (noise-adding) variants: Euler, Euler a, Heun, DPM2, DPM2 a and LMS.

Each step follows k-diffusion's function of the same name (what AUTOMATIC1111 runs); diffusers' ``*Discrete``
schedulers compute the same steps. A step that ends at sigma = 0 is an Euler step, as there.
"""

from __future__ import annotations

import math

import torch

from ..noise import Generators, randn_like
from .denoisers import Denoise
from .stepping import Callback, ancestral_step, notify


@torch.no_grad()
def sample_euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                 generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Euler's method, Karras et al. 2022, Algorithm 2 without churn."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        x = x + (sigma_next - sigma) * (x - x0) / sigma
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0,
                           generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of size sigma_up (k-diffusion)."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * (x - x0) / sigma
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Heun's method (2nd order, trapezoidal), Karras et al. 2022, Algorithm 1."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        d = (x - x0) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, sigma_next)) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        notify(callback, i, levels, x, x0)
    return x


def _dpm2_step(denoise: Denoise, x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_target: float) -> torch.Tensor:
    """The midpoint step of DPM-Solver-2 in sigma: the slope at the geometric mean of sigma and sigma_target."""
    d = (x - x0) / sigma
    if sigma_target == 0:
        return x - sigma * d
    sigma_mid = math.sqrt(sigma * sigma_target)
    x_mid = x + (sigma_mid - sigma) * d
    return x + (sigma_target - sigma) * (x_mid - denoise(x_mid, sigma_mid)) / sigma_mid


@torch.no_grad()
def sample_dpm2(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) in the Karras sigma form of k-diffusion's ``sample_dpm_2``."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        x0 = denoise(x, levels[i])
        x = _dpm2_step(denoise, x, x0, levels[i], levels[i + 1])
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_dpm2_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0,
                          generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Ancestral DPM-Solver-2: a DPM2 step down to sigma_down, then fresh noise of size sigma_up (k-diffusion)."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm2_step(denoise, x, x0, sigma, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        notify(callback, i, levels, x, x0)
    return x


# 3-point Gauss-Legendre rule: integrates polynomials up to degree 5 exactly (LMS of order <= 6)
_GAUSS_NODES = (-math.sqrt(3 / 5), 0.0, math.sqrt(3 / 5))
_GAUSS_WEIGHTS = (5 / 9, 8 / 9, 5 / 9)


def lms_coefficient(nodes: list[float], j: int, start: float, end: float) -> float:
    """The integral from ``start`` to ``end`` of the Lagrange basis polynomial on ``nodes`` that is 1 at nodes[j]."""
    def basis(tau: float) -> float:
        value = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                value *= (tau - node) / (nodes[j] - node)
        return value

    half, mid = (end - start) / 2, (end + start) / 2
    return half * sum(w * basis(mid + half * u) for u, w in zip(_GAUSS_NODES, _GAUSS_WEIGHTS))


@torch.no_grad()
def sample_lms(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, order: int = 4,
               generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Linear multistep in sigma (Adams-Bashforth with variable steps), as k-diffusion's ``sample_lms``.

    The slope is extrapolated by the polynomial through the last ``order`` slopes and integrated exactly."""
    if not 1 <= order <= 6:
        raise ValueError(f"LMS order must be between 1 and 6; got {order}")
    levels = sigmas.tolist()
    slopes: list[torch.Tensor] = []  # newest first
    for i in range(len(levels) - 1):
        x0 = denoise(x, levels[i])
        slopes = [(x - x0) / levels[i], *slopes][:order]
        nodes = levels[i::-1][:len(slopes)]  # sigma_i, sigma_{i-1}, ...
        x = x + sum(lms_coefficient(nodes, j, levels[i], levels[i + 1]) * d for j, d in enumerate(slopes))
        notify(callback, i, levels, x, x0)
    return x
