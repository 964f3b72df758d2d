"""Samplers: pure functions over ``denoise(x, sigma) -> x0``, one signature, one registry.

Every sampler is ``sample_<name>(denoise, x, sigmas, *, generator=None, callback=None, **options)``:
``x`` starts at noise level ``sigmas[0]`` and the sampler walks it down through ``sigmas``. Samplers keep no
state between calls (a multistep history lives in the call), so runs can go side by side. Stochastic ones
draw all their noise from ``generator`` (one CPU generator per image), so a seed reproduces an image.

Which reference each one matches (tests/test_samplers_parity.py checks them on the same tiny model):

  ddpm, ddim, plms   diffusers DDPMScheduler, DDIMScheduler, PNDMScheduler(skip_prk_steps) (= the LDM code)
  euler, euler_a, heun, dpm2, dpm2_a, lms
                     k-diffusion's sample_* (AUTOMATIC1111) = diffusers' Euler/EulerAncestral/Heun/KDPM2/
                     KDPM2Ancestral/LMSDiscreteScheduler on the same levels
  dpmpp_2m, dpmpp_2m_sde
                     k-diffusion = diffusers DPMSolverMultistepScheduler (dpmsolver++ / sde-dpmsolver++, whose
                     noise stream is the same) on the same levels
  dpmpp_2s_a         k-diffusion only (diffusers has no ancestral single-step solver)
  dpmpp_sde          k-diffusion = diffusers DPMSolverSDEScheduler: they draw a Brownian path from a torchsde tree,
                     we draw the same path's increments from the image's generator (same law, other numbers)
  unipc              diffusers UniPCMultistepScheduler (bh2, order 2) on AUTOMATIC1111's UniPC levels
                     (AUTOMATIC1111's own defaults are bh1, order 3: options variant="bh1", order=3)
  lcm                diffusers LCMScheduler, minus its c_skip/c_out (< 1e-5 here), as AUTOMATIC1111 does
  tcd                diffusers TCDScheduler (eta = the paper's gamma, default 0.3) on the same LCM grid

Where AUTOMATIC1111 and diffusers disagree we follow AUTOMATIC1111: its "Automatic" schedule per sampler
(Karras for the DPM++ solvers and DPM2, exponential for DPM++ 2M SDE), k-diffusion's linspace timesteps
(diffusers' multistep schedulers space n + 1 points and drop the last), noise * sigma_max as the first sample
of the k-diffusion samplers, and DPM2's dropped next-to-last level. docs/samplers.md has the details.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ScheduleConfig, TimestepSpacing
from .samplers_ddim import sample_ddim, sample_ddpm, sample_lcm, sample_plms, sample_tcd
from .samplers_dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_sde
from .samplers_karras import (
    sample_dpm2,
    sample_dpm2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from .samplers_unipc import sample_unipc
from .schedulers import SCHEDULERS, Scheduler, find_scheduler, get_scheduler, noise_levels, normalise_name
from .schedules import final_sigma
from .stepping import Callback, Step  # noqa: F401  (part of this module's API)


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``final``: "alpha_bar_0" ends a run at the noise level of t=0 unless the schedule sets alpha to one or the
    levels reach it anyway (DDIM's convention); "zero" ends fully denoised. ``init_noise``: how unit noise
    is scaled to the first level: "vp" gives z_T = noise exactly, i.e. x = noise * sqrt(1 + sigma_max^2);
    "sigma" gives noise * sigma_max (k-diffusion). ``scheduler``: what "automatic" means for this sampler.
    ``spacing``: the timesteps "normal" visits, None for the model's own. ``options``: fixed keyword arguments."""

    name: str
    function: Callable[..., torch.Tensor]
    label: str  # the AUTOMATIC1111 name
    aliases: tuple[str, ...] = ()
    stochastic: bool = False
    final: str = "zero"
    init_noise: str = "vp"
    scheduler: str = "normal"
    spacing: TimestepSpacing | None = None
    discard_penultimate_sigma: bool = False  # AUTOMATIC1111's DPM2: n + 1 levels, the next-to-last dropped
    options: dict = field(default_factory=dict)


SAMPLERS: dict[str, SamplerSpec] = {}


def register(spec: SamplerSpec) -> SamplerSpec:
    SAMPLERS[spec.name] = spec
    return spec


_LINSPACE = TimestepSpacing.LINSPACE
# the original latent-diffusion samplers, on the model's own timesteps
register(SamplerSpec("ddim", sample_ddim, "DDIM", final="alpha_bar_0"))
register(SamplerSpec("ddpm", sample_ddpm, "DDPM", stochastic=True))
register(SamplerSpec("plms", sample_plms, "PLMS", aliases=("pndm",), final="alpha_bar_0"))
# k-diffusion's samplers, with AUTOMATIC1111's names, aliases and default schedules
_K = dict(init_noise="sigma", spacing=_LINSPACE)
register(SamplerSpec("euler", sample_euler, "Euler", aliases=("k_euler",), **_K))
register(SamplerSpec("euler_a", sample_euler_ancestral, "Euler a",
                     aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral"), stochastic=True, **_K))
register(SamplerSpec("heun", sample_heun, "Heun", aliases=("k_heun",), **_K))
register(SamplerSpec("dpm2", sample_dpm2, "DPM2", aliases=("k_dpm_2", "dpm_2"), scheduler="karras",
                     discard_penultimate_sigma=True, **_K))
register(SamplerSpec("dpm2_a", sample_dpm2_ancestral, "DPM2 a", aliases=("k_dpm_2_a", "dpm_2_ancestral"),
                     stochastic=True, scheduler="karras", discard_penultimate_sigma=True, **_K))
register(SamplerSpec("lms", sample_lms, "LMS", aliases=("k_lms",), **_K))
register(SamplerSpec("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M", aliases=("k_dpmpp_2m",), scheduler="karras", **_K))
register(SamplerSpec("dpmpp_2s_a", sample_dpmpp_2s_ancestral, "DPM++ 2S a",
                     aliases=("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), stochastic=True, scheduler="karras", **_K))
register(SamplerSpec("dpmpp_sde", sample_dpmpp_sde, "DPM++ SDE", aliases=("k_dpmpp_sde",), stochastic=True,
                     scheduler="karras", **_K))
register(SamplerSpec("dpmpp_2m_sde", sample_dpmpp_2m_sde, "DPM++ 2M SDE", aliases=("k_dpmpp_2m_sde",),
                     stochastic=True, scheduler="exponential", **_K))
register(SamplerSpec("dpmpp_2m_sde_heun", sample_dpmpp_2m_sde, "DPM++ 2M SDE Heun", aliases=("k_dpmpp_2m_sde_heun",),
                     stochastic=True, scheduler="exponential", options={"solver_type": "heun"}, **_K))
# newer solvers. UniPC on AUTOMATIC1111's UniPC levels: n + 1 timesteps from 999 to 0, all visited, ending
# at the level of timestep 0.
# (k-diffusion's linspace then a jump to 0 makes the step before the jump very uneven, which a multistep
# solver extrapolates badly; diffusers' levels jump to 0 from timestep ~50, which blurs.)
register(SamplerSpec("unipc", sample_unipc, "UniPC", final="alpha_bar_0", scheduler="sgm_uniform",
                     spacing=_LINSPACE))
register(SamplerSpec("lcm", sample_lcm, "LCM", aliases=("k_lcm",), stochastic=True, scheduler="lcm"))
# TCD (ComfyUI's and Forge's name "TCD") ends, as diffusers' TCDScheduler does, at the level of timestep 0
register(SamplerSpec("tcd", sample_tcd, "TCD", aliases=("k_tcd",), stochastic=True, final="alpha_bar_0",
                     scheduler="lcm"))


def _match(name: str) -> SamplerSpec | None:
    key = normalise_name(name)
    for spec in SAMPLERS.values():
        if key in {normalise_name(n) for n in (spec.name, spec.label, *spec.aliases)}:
            return spec
    return None


def _split_scheduler_suffix(name: str) -> tuple[SamplerSpec, Scheduler] | None:
    """AUTOMATIC1111's combined names: "DPM++ 2M Karras", "DPM++ 2M SDE Exponential", "k_dpmpp_2m_ka"."""
    parts = normalise_name(name).split("_")
    for cut in range(len(parts) - 1, 0, -1):
        spec, scheduler = _match("_".join(parts[:cut])), find_scheduler("_".join(parts[cut:]))
        if spec is not None and scheduler is not None and scheduler.name != "automatic":
            return spec, scheduler
    return None


def _unknown(name: str) -> ValueError:
    names = sorted(SAMPLERS)
    candidates = {normalise_name(n): spec.name for spec in SAMPLERS.values()
                  for n in (spec.name, spec.label, *spec.aliases)}
    candidates.update({f"{normalise_name(n)}_{scheduler.name}": f"{spec.label} {scheduler.label}"
                       for spec in SAMPLERS.values() for n in (spec.name, spec.label)
                       for scheduler in SCHEDULERS.values() if scheduler.name != "automatic"})
    nearest = difflib.get_close_matches(normalise_name(name), list(candidates), n=1)
    hint = f" Did you mean {candidates[nearest[0]]!r}?" if nearest else ""
    return ValueError(f"unknown sampler {name!r}.{hint} Valid samplers: {', '.join(names)} "
                      f"(or their AUTOMATIC1111 names, e.g. 'Euler a', 'DPM++ 2M Karras')")


def resolve_sampler(sampler: str, scheduler: str = "automatic") -> tuple[SamplerSpec, Scheduler]:
    """The sampler and the schedule a request names. ``sampler`` is our name, its AUTOMATIC1111 label or an
    alias, optionally with AUTOMATIC1111's old schedule suffix ("DPM++ 2M Karras"); "automatic" is the
    sampler's own default schedule."""
    spec, suffix = _match(sampler), None
    if spec is None:
        split = _split_scheduler_suffix(sampler)
        if split is None:
            raise _unknown(sampler)
        spec, suffix = split
    chosen = get_scheduler(scheduler)
    if suffix is not None:
        if chosen.name not in ("automatic", suffix.name):
            raise ValueError(f"sampler {sampler!r} already names the {suffix.label} schedule but scheduler is "
                             f"{scheduler!r}; give the sampler as {spec.label!r} or drop the scheduler")
        chosen = suffix
    if chosen.name == "automatic":
        chosen = get_scheduler(spec.scheduler)
    return spec, chosen


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by our name, its AUTOMATIC1111 label or an alias (case and spacing ignored)."""
    return resolve_sampler(name)[0]


def build_sigmas(schedule: ScheduleConfig, steps: int, spec: SamplerSpec,
                 scheduler: str | Scheduler = "automatic") -> torch.Tensor:
    """The noise levels a run of ``steps`` steps visits, steps + 1 of them, float64 on the CPU."""
    chosen = scheduler if isinstance(scheduler, Scheduler) else get_scheduler(scheduler)
    if chosen.name == "automatic":
        chosen = get_scheduler(spec.scheduler)
    last = final_sigma(schedule) if spec.final == "alpha_bar_0" else 0.0
    spacing = spec.spacing or schedule.timestep_spacing
    if not spec.discard_penultimate_sigma:
        return noise_levels(schedule, steps, chosen, spacing, last)
    sigmas = noise_levels(schedule, steps + 1, chosen, spacing, last)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def sampler_options(spec: SamplerSpec, generator, eta: float | None = None,
                    schedule: ScheduleConfig | None = None) -> dict:
    """The keyword arguments a run passes to ``spec.function``: its fixed options, the per-image generators,
    ``eta`` where the sampler takes one and it is set (None keeps the sampler's default), and the model's
    ``schedule`` where the sampler steps on training timesteps (TCD)."""
    options = dict(spec.options, generator=generator)
    parameters = inspect.signature(spec.function).parameters
    if eta is not None and "eta" in parameters:
        options["eta"] = eta
    if schedule is not None and "schedule" in parameters:
        options["schedule"] = schedule
    return options


def initial_noise_scale(sigmas: torch.Tensor, spec: SamplerSpec) -> float:
    sigma_max = float(sigmas[0])
    return (sigma_max ** 2 + 1) ** 0.5 if spec.init_noise == "vp" else sigma_max
