"""DPM-Solver++, Lu et al. 2022 ("DPM-Solver++: Fast Solver for Guided Sampling"): exponential integrators on
the data prediction x0, in the half-log-SNR lambda = -log(sigma). Over a step of size h = lambda_next - lambda
the linear part is solved exactly: x_next = (sigma_next / sigma) * x + (1 - e^-h) * x0.

Each function follows k-diffusion's of the same name (what AUTOMATIC1111 runs). diffusers'
``DPMSolverMultistepScheduler`` (``dpmsolver++`` and ``sde-dpmsolver++``) and ``DPMSolverSDEScheduler`` compute the
same steps on the same levels; its multistep scheduler picks different levels by default (see ``schedulers``).
"""

from __future__ import annotations

import math

import torch

from ..noise import Generators, randn_like
from .denoisers import Denoise
from .stepping import Callback, ancestral_step, notify


def _first_order(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """DPM-Solver++(1) from sigma to sigma_next (= DDIM's step): exact for a constant x0."""
    if sigma_next == 0:
        return x0
    h = math.log(sigma / sigma_next)
    return (sigma_next / sigma) * x - math.expm1(-h) * x0


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: x0 extrapolated linearly in lambda from the last two steps."""
    levels = sigmas.tolist()
    x0_prev = None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        if x0_prev is None or sigma_next == 0:  # first step, and the last one: first order
            x_new = _first_order(x, x0, sigma, sigma_next)
        else:
            r = math.log(levels[i - 1] / sigma) / math.log(sigma / sigma_next)  # h_prev / h
            x_new = _first_order(x, (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev, sigma, sigma_next)
        x, x0_prev = x_new, x0
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0,
                              generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1, r = 1/2) down to sigma_down, then fresh noise
    of size sigma_up, as k-diffusion's ``sample_dpmpp_2s_ancestral``. eta=0 is the deterministic DPM-Solver++(2S)."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x0
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)  # lambda halfway to sigma_down
            x_mid = _first_order(x, x0, sigma, sigma_mid)
            x = _first_order(x, denoise(x_mid, sigma_mid), sigma, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0,
                     generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Stochastic DPM-Solver++ (k-diffusion's ``sample_dpmpp_sde``, r = 1/2): two ancestral first-order
    substeps per step, the second from the start with x0 taken at the midpoint in lambda.

    The noise is a Brownian path in sigma, as k-diffusion's Brownian tree draws it: the whole step's increment
    extends the half step's. k-diffusion and AUTOMATIC1111 seed a torchsde tree per image; here the increments
    come from the image's generator: the same law, other numbers."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            sigma_mid = math.sqrt(sigma * sigma_next)
            noise_mid = randn_like(x, generator)  # (W(sigma_mid) - W(sigma)) / sqrt(sigma - sigma_mid)
            down, up = ancestral_step(sigma, sigma_mid, eta)
            x_mid = _first_order(x, x0, sigma, down) + up * noise_mid
            share = (sigma - sigma_mid) / (sigma - sigma_next)  # of the whole step's Brownian variance
            noise = math.sqrt(share) * noise_mid + math.sqrt(1 - share) * randn_like(x, generator)
            down, up = ancestral_step(sigma, sigma_next, eta)
            x = _first_order(x, denoise(x_mid, sigma_mid), sigma, down) + up * noise
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 1.0,
                        solver_type: str = "midpoint", generator: Generators = None,
                        callback: Callback | None = None) -> torch.Tensor:
    """The SDE counterpart of DPM-Solver++(2M) (Lu et al. 2022), as k-diffusion's ``sample_dpmpp_2m_sde``.

    eta scales the noise; ``solver_type`` "midpoint" or "heun" weighs the 2nd-order term (with eta=0 the
    midpoint form is exactly DPM-Solver++(2M))."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun'; got {solver_type!r}")
    levels = sigmas.tolist()
    x0_prev, h_prev = None, None
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            decay = -math.expm1(-h - eta * h)  # 1 - e^{-(1 + eta) h}
            x = (sigma_next / sigma) * math.exp(-eta * h) * x + decay * x0
            if x0_prev is not None:
                slope = (h / h_prev) * (x0 - x0_prev)  # (x0 - x0_prev) / r
                weight = 0.5 * decay if solver_type == "midpoint" else 1 - decay / ((1 + eta) * h)
                x = x + weight * slope
            if eta:
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * randn_like(x, generator)
            h_prev = h
        x0_prev = x0
        notify(callback, i, levels, x, x0)
    return x
