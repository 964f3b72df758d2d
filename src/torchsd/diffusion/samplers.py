"""Samplers: pure functions over ``denoise(x, sigma) -> x0``, one signature, one registry.

Every sampler is ``sample_<name>(denoise, x, sigmas, *, generator=None, callback=None, **options)``:
``x`` starts at noise level ``sigmas[0]`` and the sampler walks it down through ``sigmas``.
Samplers keep no state between calls, so runs can go side by side.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .denoisers import Denoise
from ..config import ScheduleConfig
from .noise import Generators, randn_like


@dataclass(frozen=True)
class Step:
    """What a callback sees after each step."""

    index: int  # 0-based
    total: int
    x: torch.Tensor  # the sample after this step
    sigma: float  # the noise level the step started from
    x0: torch.Tensor  # the denoiser's prediction of the clean sample at ``sigma``


Callback = Callable[[Step], None]


def _notify(callback: Callback | None, i: int, sigmas: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> None:
    if callback is not None:
        callback(Step(i, len(sigmas) - 1, x, float(sigmas[i]), x0))


@torch.no_grad()
def sample_ddim(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
                generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """DDIM, Song et al. 2021, eq. (12), in sigma form; eta=0 is deterministic, eta=1 is DDPM's posterior."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma)
        eps = (x - x0) / sigma
        if eta > 0 and sigma_next > 0:
            alpha_bar, alpha_bar_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
            # eq. (16): the variance of the reverse step in z-space; divided by alpha_bar_next for x-space
            variance = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
            sigma_up = (eta * variance.sqrt() / alpha_bar_next.sqrt()).clamp(max=sigma_next)
            sigma_down = (sigma_next ** 2 - sigma_up ** 2).sqrt()
            x = x0 + sigma_down * eps + sigma_up * randn_like(x, generator)
        else:
            x = x0 + sigma_next * eps
        _notify(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, *,
                generator: Generators = None, callback: Callback | None = None) -> torch.Tensor:
    """DDPM ancestral sampling, Ho et al. 2020, eq. (6)-(7): draw x_{t-1} from q(x_{t-1} | x_t, x0_pred).

    With strided timesteps the posterior is taken between the visited levels, which is DDIM with eta=1."""
    return sample_ddim(denoise, x, sigmas, eta=1.0, generator=generator, callback=callback)


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``timesteps``: "model" visits the model's own discrete timesteps (DDPM/DDIM style);
    ``final``: "alpha_bar_0" ends at the noise level of t=0 unless the schedule sets alpha to one
    (DDIM's convention), "zero" ends fully denoised. ``init_noise``: how unit noise is scaled to the first
    level: "vp" gives z_T = noise exactly, i.e. x = noise * sqrt(1 + sigma_max^2); "sigma" gives noise * sigma_max."""

    name: str
    function: Callable[..., torch.Tensor]
    label: str  # the AUTOMATIC1111 name
    aliases: tuple[str, ...] = ()
    stochastic: bool = False
    final: str = "zero"
    init_noise: str = "vp"
    options: dict = field(default_factory=dict)


SAMPLERS: dict[str, SamplerSpec] = {}


def register(spec: SamplerSpec) -> SamplerSpec:
    SAMPLERS[spec.name] = spec
    return spec


register(SamplerSpec("ddim", sample_ddim, "DDIM", aliases=("ddim",), final="alpha_bar_0"))
register(SamplerSpec("ddpm", sample_ddpm, "DDPM", aliases=("ddpm",), stochastic=True))


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("+", "p").replace("-", "_")


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by our name, its AUTOMATIC1111 label or an alias (case and spacing ignored)."""
    key = _normalise(name)
    for spec in SAMPLERS.values():
        if key in {_normalise(spec.name), _normalise(spec.label), *(_normalise(a) for a in spec.aliases)}:
            return spec
    names = sorted(SAMPLERS)
    nearest = difflib.get_close_matches(key, names + [_normalise(s.label) for s in SAMPLERS.values()], n=1)
    hint = f" Did you mean {nearest[0]!r}?" if nearest else ""
    raise ValueError(f"unknown sampler {name!r}.{hint} Valid samplers: {', '.join(names)}")


def build_sigmas(schedule: ScheduleConfig, steps: int, spec: SamplerSpec) -> torch.Tensor:
    """The noise levels a run of ``steps`` steps visits, steps + 1 of them, float64 on the CPU."""
    from .schedules import final_sigma, inference_timesteps, sigma_at

    sigmas = sigma_at(schedule, inference_timesteps(schedule, steps))
    last = final_sigma(schedule) if spec.final == "alpha_bar_0" else 0.0
    return torch.cat([sigmas, sigmas.new_tensor([last])])


def initial_noise_scale(sigmas: torch.Tensor, spec: SamplerSpec) -> float:
    sigma_max = float(sigmas[0])
    return (sigma_max ** 2 + 1) ** 0.5 if spec.init_noise == "vp" else sigma_max
