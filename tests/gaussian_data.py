"""Gaussian data, where everything is known in closed form: the test bed of the sampler accuracy checks.

Data x0 ~ N(mu, diag(s^2)). At noise level sigma, x = x0 + sigma * eps ~ N(mu, s^2 + sigma^2), and
  the ideal denoiser      E[x0 | x] = mu + s^2 / (s^2 + sigma^2) * (x - mu),
  the probability-flow ODE keeps (x - mu) / sqrt(s^2 + sigma^2) constant,
so an exact sampler maps x(sigma_max) to x(sigma_end) = mu + sqrt((s^2 + sigma_end^2) / (s^2 + sigma_max^2)) * (x - mu).
"""

from __future__ import annotations

import torch

MU = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
STD = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)  # three data scales, one per dimension


def ideal_denoiser(x: torch.Tensor, sigma) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + STD ** 2 / (STD ** 2 + sigma ** 2) * (x - MU)


def marginal_std(sigma: float) -> torch.Tensor:
    return (STD ** 2 + sigma ** 2).sqrt()


def exact_flow(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    return MU + marginal_std(sigma_to) / marginal_std(sigma_from) * (x - MU)


def whitened_normal(n: int, seed: int = 0) -> torch.Tensor:
    """n x 3 normal samples shifted and scaled to mean exactly 0 and std exactly 1 per column."""
    xi = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (xi - xi.mean(0)) / xi.std(0)


def flow_error(name: str, sigmas: torch.Tensor, **options) -> float:
    """max |x_numeric - x_exact| at sigmas[-1] for the registered sampler ``name``, from
    x(sigmas[0]) = mu + the marginal std (one point, one unit deviation per dimension)."""
    from torchsd.diffusion.samplers import SAMPLERS

    spec = SAMPLERS[name]
    start, end = float(sigmas[0]), float(sigmas[-1])
    x = MU + marginal_std(start) * torch.ones(1, 3, dtype=torch.float64)
    out = spec.function(ideal_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0),
                        **{**spec.options, **options})
    return float((out - exact_flow(x, start, end)).abs().max())


# (registry name, options, the order theory gives, the least slope the test accepts) for the deterministic solvers
ORDERS = [
    ("euler", {}, 1, 0.9),
    ("ddim", {}, 1, 0.9),
    ("euler_a", {"eta": 0.0}, 1, 0.9),
    ("heun", {}, 2, 1.9),
    ("dpm2", {}, 2, 1.9),
    ("dpm2_a", {"eta": 0.0}, 2, 1.9),
    ("lms", {}, 4, 2.5),
    ("plms", {}, 4, 1.9),
    ("dpmpp_2m", {}, 2, 1.9),
    ("dpmpp_2s_a", {"eta": 0.0}, 2, 1.9),
    ("dpmpp_sde", {"eta": 0.0}, 2, 1.9),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2, 1.9),
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, 2, 1.9),
    ("unipc", {}, 3, 2.8),
    ("unipc", {"order": 3}, 4, 2.4),
]
