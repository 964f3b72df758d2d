"""The forward-process noise schedule and the noise levels an inference run visits.

Everything is computed in float64 and cast by the caller. In the sampler's parametrisation
x = z / sqrt(alpha_bar) = x0 + sigma * eps, with sigma = sqrt((1 - alpha_bar) / alpha_bar)
(Karras et al. 2022, "VE" form of the VP process), so every sampler is written in sigma.
"""

from __future__ import annotations

import math

import torch

from ..config import BetaSchedule, ScheduleConfig, TimestepSpacing


def betas(config: ScheduleConfig) -> torch.Tensor:
    n = config.num_train_timesteps
    if config.beta_schedule is BetaSchedule.LINEAR:
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    if config.beta_schedule is BetaSchedule.SCALED_LINEAR:
        return torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    # cosine schedule: alpha_bar(t) = cos^2((t/n + s)/(1 + s) * pi/2), betas capped at 0.999
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=torch.float64)


def alphas_cumprod(config: ScheduleConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), t = 0 … num_train_timesteps-1."""
    return torch.cumprod(1.0 - betas(config), dim=0)


def training_sigmas(config: ScheduleConfig) -> torch.Tensor:
    """sigma_t for every training timestep t (increasing)."""
    alpha_bar = alphas_cumprod(config)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + sigma ** 2)


def inference_timesteps(config: ScheduleConfig, steps: int,
                        spacing: TimestepSpacing | None = None) -> torch.Tensor:
    """The training timesteps visited by a run of ``steps`` steps, from the noisiest down (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    n = config.num_train_timesteps
    if steps > n:
        raise ValueError(f"steps must be at most num_train_timesteps ({n}); got {steps}")
    spacing = TimestepSpacing(spacing or config.timestep_spacing)
    if spacing is TimestepSpacing.LEADING:
        ratio = n // steps
        t = torch.arange(steps, dtype=torch.float64) * ratio + config.steps_offset
    elif spacing is TimestepSpacing.TRAILING:
        t = torch.round(torch.arange(n, 0, -n / steps, dtype=torch.float64)).flip(0) - 1
    else:
        t = torch.linspace(0, n - 1, steps, dtype=torch.float64)
    return t.flip(0)


def sigma_at(config: ScheduleConfig, timesteps: torch.Tensor) -> torch.Tensor:
    """sigma at (possibly fractional) training timesteps, interpolating log-sigma linearly."""
    log_sigmas = training_sigmas(config).log()
    t = timesteps.to(torch.float64).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(log_sigmas) - 1)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def timestep_of_sigma(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The inverse of ``sigma_at``: the fractional training timestep whose sigma is ``sigma``.

    ``log_sigmas`` are the training log-sigmas (increasing), computed once by the caller."""
    log_sigma = sigma.to(log_sigmas.dtype).log()
    idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
    low, high = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((log_sigma - low) / (high - low)).clamp(0, 1)
    return idx - 1 + w


def final_sigma(config: ScheduleConfig) -> float:
    """Where a DDIM-style run ends: clean (0) if ``set_alpha_to_one``, else the noise level of t=0."""
    return 0.0 if config.set_alpha_to_one else float(training_sigmas(config)[0])


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Noise levels of Karras et al. 2022, eq. (5): spaced evenly in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, steps: int) -> torch.Tensor:
    """Noise levels spaced evenly in log(sigma)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def q_sample(config: ScheduleConfig, z0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process in closed form, Ho et al. 2020 eq. (4):
    z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps.

    ``timesteps``: (B,) integer training timesteps, one per sample of ``z0`` (B, ...)."""
    alpha_bar = alphas_cumprod(config)[timesteps.cpu()].to(z0.device, z0.dtype)
    alpha_bar = alpha_bar.reshape(-1, *([1] * (z0.ndim - 1)))
    return alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
