"""UniPC, Zhao et al. 2023 ("UniPC: A Unified Predictor-Corrector Framework"): a multistep predictor (UniP)
and a corrector (UniC) that reuses the model call the next step makes anyway, on the data prediction x0 in
lambda = -log(sigma).

It computes what diffusers' ``UniPCMultistepScheduler`` does with ``predict_x0``: the lower orders while the
history fills, order 1 for the last step, the corrector after every step, and rho = 1/2 for the 2nd-order
predictor as in the authors' code. AUTOMATIC1111 runs its own copy of that code (default variant bh1, order 3)
on a time-uniform VP schedule; pass ``variant="bh1", order=3`` for its update rule.
"""

from __future__ import annotations

import math

import torch

from ..noise import Generators
from .denoisers import Denoise
from .stepping import Callback, notify


def _phi_terms(hh: float, order: int, variant: str) -> tuple[float, float, list[float]]:
    """h*phi_1(h), B(h), and the right-hand side b_k = h*phi_{k+1}(h) * k! / B(h) of UniPC's order conditions."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)).tolist()


def _unipc_update(x: torch.Tensor, sigma: float, sigma_next: float, x0s: list[torch.Tensor], lambdas: list[float],
                  order: int, variant: str, x0_next: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP step from sigma to sigma_next using ``order`` stored predictions (newest first, x0s[0] at sigma);
    with ``x0_next`` (the prediction at sigma_next) it is the UniC correction of that step instead."""
    lam, lam_next = -math.log(sigma), -math.log(sigma_next)
    h = lam_next - lam
    rks = [(lambdas[k] - lam) / h for k in range(1, order)] + [1.0]
    differences = [(x0s[k] - x0s[0]) / rks[k - 1] for k in range(1, order)]
    h_phi_1, b_h, b = _phi_terms(-h, order, variant)
    powers = [[rk ** p for rk in rks] for p in range(order)]
    x_next = (sigma_next / sigma) * x - h_phi_1 * x0s[0]
    if x0_next is None:  # predictor
        if order == 1:
            return x_next
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in powers[:-1]], b[:-1])
        return x_next - b_h * sum(rho * d for rho, d in zip(rhos, differences))
    rhos = [0.5] if order == 1 else _solve(powers, b)
    correction = sum(rho * d for rho, d in zip(rhos[:-1], differences)) + rhos[-1] * (x0_next - x0s[0])
    return x_next - b_h * correction


@torch.no_grad()
def sample_unipc(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, order: int = 2, variant: str = "bh2",
                 generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """UniPC-p (Zhao et al. 2023, Algorithms 2 and 3) with B(h) = h ("bh1") or e^h - 1 ("bh2")."""
    if not 1 <= order <= 3:
        raise ValueError(f"UniPC order must be 1, 2 or 3; got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2'; got {variant!r}")
    levels = sigmas.tolist()
    steps = len(levels) - 1
    x0s: list[torch.Tensor] = []  # the predictions so far, newest first
    lambdas: list[float] = []
    x_start, used_order = x, 0  # where the last predictor step started, and its order
    for i in range(steps):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        if x0s:  # UniC: redo the last step with the prediction just made at its end
            x = _unipc_update(x_start, levels[i - 1], sigma, x0s, lambdas, used_order, variant, x0_next=x0)
        x0s, lambdas = [x0, *x0s][:order], [-math.log(sigma), *lambdas][:order]
        used_order = min(order, steps - i, len(x0s))
        x_start = x
        x = x0 if sigma_next == 0 else _unipc_update(x, sigma, sigma_next, x0s, lambdas, used_order, variant)
        notify(callback, i, levels, x, x0)
    return x
