"""The samplers of the original latent-diffusion code, LCM and TCD: DDIM, DDPM, PLMS and multistep consistency.

All are written in the sampler's parametrisation x = x0 + sigma * eps (see ``schedules``); in it, DDIM's
update is exactly the ancestral Euler step, and PNDM's "transfer" is exactly DDIM's deterministic step.
"""

from __future__ import annotations

import torch

from ..config import ScheduleConfig
from ..noise import Generators, randn_like
from .denoisers import Denoise
from .schedules import timestep_of_sigma, training_sigmas
from .stepping import Callback, ancestral_step, notify


@torch.no_grad()
def sample_ddim(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
                generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """DDIM, Song et al. 2021, eq. (12) with the variance of eq. (16) scaled by eta; eta=1 is DDPM's posterior.

    Divided by sqrt(alpha_bar_next), eq. (12) reads x_next = x0 + sigma_down * eps + sigma_up * noise with
    sigma_up^2 = eta^2 * sigma_next^2 * (sigma^2 - sigma_next^2) / sigma^2: the ancestral Euler step."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        eps = (x - x0) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + sigma_down * eps
        if sigma_up > 0:
            x = x + sigma_up * randn_like(x, generator)
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """DDPM ancestral sampling, Ho et al. 2020, eq. (6)-(7): draw x_{t-1} from q(x_{t-1} | x_t, x0_pred).

    With strided timesteps the posterior is taken between the visited levels, which is DDIM with eta=1."""
    return sample_ddim(denoise, x, sigmas, eta=1.0, generator=generator, callback=callback)


# Adams-Bashforth weights on (eps_now, eps_prev, ...) for 2, 3 and 4 stored slopes
_ADAMS_BASHFORTH = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@torch.no_grad()
def sample_plms(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """PLMS, Liu et al. 2022 (PNDM), eq. (12): 4th-order Adams-Bashforth on eps with DDIM's transfer step.

    As in the latent-diffusion code and diffusers' ``skip_prk_steps``, the first step is a pseudo improved-Euler
    step (one extra model call) instead of PNDM's Runge-Kutta warm-up, and later steps use the slopes so far."""
    levels = sigmas.tolist()
    history: list[torch.Tensor] = []  # eps of earlier steps, oldest first
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        eps = (x - x0) / sigma
        if not history:
            eps_prime = eps
            if sigma_next > 0:
                x_euler = x + (sigma_next - sigma) * eps
                eps_prime = (eps + (x_euler - denoise(x_euler, sigma_next)) / sigma_next) / 2
        else:
            weights = _ADAMS_BASHFORTH[len(history) + 1]
            eps_prime = sum(w * e for w, e in zip(weights, [eps, *reversed(history)]))
        history = (history + [eps])[-3:]
        # PNDM's transfer phi(x, eps, t, t-1), eq. (11), is DDIM's deterministic step: x0 + sigma_next * eps
        x = x + (sigma_next - sigma) * eps_prime
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_lcm(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
               generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """Multistep latent consistency sampling, Luo et al. 2023 (LCM), Algorithm 1: predict x0, re-noise it.

    The consistency boundary scalings (c_skip <= 7e-6 and c_out >= 1 - 4e-6 at the timesteps LCM visits) are
    left out, as AUTOMATIC1111 and ComfyUI do; diffusers' ``LCMScheduler`` keeps them."""
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        x0 = denoise(x, levels[i])
        x = x0 if levels[i + 1] == 0 else x0 + levels[i + 1] * randn_like(x, generator)
        notify(callback, i, levels, x, x0)
    return x


@torch.no_grad()
def sample_tcd(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.3,
               schedule: ScheduleConfig | None = None, generator: Generators = None,
               callback: Callback | None = None) -> torch.Tensor:
    """Trajectory consistency distillation, Zheng et al. 2024 (TCD), eq. (10): strategic stochastic sampling.

    ``eta`` is the paper's gamma: from t the step goes back along the predicted trajectory to s = (1 - gamma) t_next
    (x_s = x0 + sigma_s * eps, deterministic), then forward to t_next with fresh noise. gamma = 0 is DDIM-like
    (no noise), gamma = 1 is LCM. s is floor((1 - gamma) * t_next) on the training timesteps, as diffusers'
    ``TCDScheduler`` takes it, so the sampler needs the model's ``schedule`` (default: SD's)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD's eta (the paper's gamma) must be between 0 (deterministic) and 1 (LCM); got {eta}")
    log_sigmas = training_sigmas(schedule or ScheduleConfig()).log()
    levels = sigmas.tolist()
    for i in range(len(levels) - 1):
        sigma, sigma_next = levels[i], levels[i + 1]
        x0 = denoise(x, sigma)
        eps = (x - x0) / sigma
        if sigma_next == 0:  # a schedule ending clean (set_alpha_to_one): the last step lands on x0
            x = x0
        else:
            t_next = float(timestep_of_sigma(log_sigmas, torch.tensor(sigma_next, dtype=torch.float64)))
            # the levels arrive as float32: snap timesteps of the integer grid before flooring
            t_next = round(t_next) if abs(t_next - round(t_next)) < 1e-3 else t_next
            sigma_s = float(log_sigmas[int((1 - eta) * t_next)].exp())
            x = x0 + sigma_s * eps
            if sigma_next > sigma_s:  # the VP forward step z_s -> z_next, divided by sqrt(alpha_bar_next)
                x = x + (sigma_next ** 2 - sigma_s ** 2) ** 0.5 * randn_like(x, generator)
        notify(callback, i, levels, x, x0)
    return x
