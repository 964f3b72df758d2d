"""Schedule types: which noise levels a run of n steps visits (AUTOMATIC1111's "Schedule type").

``normal``       the model's own discrete timesteps, spaced as the sampler spaces them (leading, trailing or
                 linspace; k-diffusion's ``get_sigmas`` is linspace); ``leading``/``trailing``/``linspace``
                 force that spacing (Lin et al. 2023, Table 2)
``karras``       Karras et al. 2022, eq. (5), rho = 7, between the model's smallest and largest sigma
``exponential``  evenly spaced in log sigma between the same two
``sgm_uniform``  n timesteps evenly spaced from the last one, excluding timestep 0 (Stability's sgm code)
``lcm``          the LCM distillation grid (every 20th timestep), subsampled as diffusers' ``LCMScheduler``

A run ends at sigma = 0, or for DDIM, PLMS and UniPC at the noise level of timestep 0 (the original code's
convention) unless its levels reached that already. Everything is float64 on the CPU.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ScheduleConfig, TimestepSpacing
from .schedules import exponential_sigmas, inference_timesteps, karras_sigmas, sigma_at, training_sigmas

Levels = Callable[[ScheduleConfig, int, TimestepSpacing], torch.Tensor]


@dataclass(frozen=True)
class Scheduler:
    name: str
    label: str  # the AUTOMATIC1111 name
    levels: Levels | None  # (schedule, n, the sampler's spacing) -> the n levels, noisiest first; None: automatic
    aliases: tuple[str, ...] = ()


def _normal(config: ScheduleConfig, n: int, spacing: TimestepSpacing) -> torch.Tensor:
    return sigma_at(config, inference_timesteps(config, n, spacing))


def _spaced(spacing: TimestepSpacing) -> Levels:
    return lambda config, n, _: sigma_at(config, inference_timesteps(config, n, spacing))


def _karras(config: ScheduleConfig, n: int, _: TimestepSpacing) -> torch.Tensor:
    sigmas = training_sigmas(config)
    return karras_sigmas(float(sigmas[0]), float(sigmas[-1]), n)


def _exponential(config: ScheduleConfig, n: int, _: TimestepSpacing) -> torch.Tensor:
    sigmas = training_sigmas(config)
    return exponential_sigmas(float(sigmas[0]), float(sigmas[-1]), n)


def _sgm_uniform(config: ScheduleConfig, n: int, _: TimestepSpacing) -> torch.Tensor:
    last = config.num_train_timesteps - 1
    return sigma_at(config, torch.linspace(last, 0, n + 1, dtype=torch.float64)[:-1])


LCM_ORIGINAL_STEPS = 50  # the teacher schedule LCMs are distilled on


def lcm_timesteps(config: ScheduleConfig, n: int, original_steps: int = LCM_ORIGINAL_STEPS) -> torch.Tensor:
    """n of the distillation grid's timesteps k-1, 2k-1, ... (k = T // original_steps), from the last one down."""
    if n > original_steps:
        raise ValueError(f"the LCM schedule has at most {original_steps} steps; got {n} — "
                         f"use fewer steps (LCMs need 2-8) or another scheduler")
    k = config.num_train_timesteps // original_steps
    grid = (torch.arange(1, original_steps + 1, dtype=torch.float64) * k - 1).flip(0)
    return grid[[i * original_steps // n for i in range(n)]]


def _lcm(config: ScheduleConfig, n: int, _: TimestepSpacing) -> torch.Tensor:
    return sigma_at(config, lcm_timesteps(config, n))


SCHEDULERS: dict[str, Scheduler] = {s.name: s for s in (
    Scheduler("automatic", "Automatic", None),
    Scheduler("normal", "Normal", _normal, aliases=("uniform",)),
    Scheduler("karras", "Karras", _karras, aliases=("ka",)),
    Scheduler("exponential", "Exponential", _exponential),
    Scheduler("sgm_uniform", "SGM Uniform", _sgm_uniform, aliases=("sgmuniform",)),
    Scheduler("lcm", "LCM", _lcm),
    Scheduler("leading", "Leading", _spaced(TimestepSpacing.LEADING), aliases=("ddim_uniform",)),
    Scheduler("trailing", "Trailing", _spaced(TimestepSpacing.TRAILING)),
    Scheduler("linspace", "Linspace", _spaced(TimestepSpacing.LINSPACE)),
)}


def normalise_name(name: str) -> str:
    """Case, spaces, '+' and '-' ignored: "DPM++ 2M" -> "dpmpp_2m", "SGM Uniform" -> "sgm_uniform"."""
    return name.strip().lower().replace(" ", "_").replace("+", "p").replace("-", "_")


def _keys(scheduler: Scheduler) -> set[str]:
    return {normalise_name(n) for n in (scheduler.name, scheduler.label, *scheduler.aliases)}


def find_scheduler(name: str) -> Scheduler | None:
    key = normalise_name(name)
    return next((s for s in SCHEDULERS.values() if key in _keys(s)), None)


def get_scheduler(name: str) -> Scheduler:
    """Look a schedule type up by our name, its AUTOMATIC1111 label or an alias."""
    found = find_scheduler(name)
    if found is None:
        nearest = difflib.get_close_matches(normalise_name(name), list(SCHEDULERS), n=1)
        hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
        raise ValueError(f"unknown scheduler {name!r}.{hint} Valid schedulers: {', '.join(SCHEDULERS)}")
    return found


def noise_levels(config: ScheduleConfig, steps: int, scheduler: Scheduler, spacing: TimestepSpacing,
                 final_sigma: float = 0.0) -> torch.Tensor:
    """The steps + 1 levels a run visits: ``scheduler``'s ``steps`` levels, then where the sampler ends,
    ``final_sigma``: 0, or the noise level of timestep 0 (DDIM's convention), or 0 when the levels got there."""
    if scheduler.levels is None:
        raise ValueError("resolve 'automatic' to the sampler's own scheduler before building levels")
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    sigmas = scheduler.levels(config, steps, spacing)
    # levels that reach timestep 0 already (linspace, Karras, ...) end at 0 rather than repeat that level
    last = final_sigma if final_sigma < float(sigmas[-1]) * (1 - 1e-6) else 0.0
    return torch.cat([sigmas, sigmas.new_tensor([last])])


def img2img_start(steps: int, strength: float) -> int:
    """Where image-to-image starts among a run's steps + 1 levels: strength s runs the last floor(s * steps)
    steps (diffusers' count; AUTOMATIC1111 runs one more), at least one when s > 0. 0 runs none (the image
    comes back unchanged) and 1 runs them all: text-to-image, the image ignored.

    The 1e-9 guards the float product: 100 steps at strength 0.29 give 28.999999999999996, but mean 29."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1; got {strength}")
    run = 0 if strength == 0 else max(1, math.floor(steps * strength + 1e-9))
    return steps - min(run, steps)
