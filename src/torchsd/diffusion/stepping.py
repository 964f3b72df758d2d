"""What every sampler shares: the record a callback sees after each step, and the ancestral split of a step.

Samplers read their noise levels once as Python floats (``sigmas.tolist()``): the step coefficients are then
computed in float64 whatever the dtype of ``x``, and no step waits on the device for a scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Step:
    """What a callback sees after each step."""

    index: int  # 0-based
    total: int
    x: torch.Tensor  # the sample after this step
    sigma: float  # the noise level the step started from
    x0: torch.Tensor  # the denoiser's prediction of the clean sample at ``sigma``


Callback = Callable[[Step], None]


def notify(callback: Callback | None, i: int, levels: list[float], x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback(Step(i, len(levels) - 1, x, levels[i], x0))


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step from ``sigma`` to ``sigma_next`` into a deterministic step down to ``sigma_down`` and fresh
    noise of size ``sigma_up`` (sigma_down^2 + sigma_up^2 = sigma_next^2).

    eta=1 draws the variance of the DDPM posterior q(x_next | x, x0) (Ho et al. 2020, eq. 7, in sigma form);
    eta=0 is the deterministic step. The same split as k-diffusion's ``get_ancestral_step``."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up
