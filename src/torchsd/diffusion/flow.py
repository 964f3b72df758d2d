"""Rectified-flow models (SD 3.5, FLUX.1) in the samplers' ``denoise(x, sigma) -> x0`` interface.

The forward process is x_t = (1 - t) x0 + t eps, t in [0, 1], and the network predicts the velocity
v = dx_t/dt = eps - x0, so x0 = x_t - t v. Written with that x0, the flow ODE is

    dx/dt = v = (x - x0(x, t)) / t,

which is exactly the probability-flow ODE every k-diffusion sampler solves, dx/dsigma = (x - x0(x, sigma)) / sigma
(Karras et al. 2022), with sigma = t and x = x_t unscaled. So the samplers are handed the flow times as their
sigmas (1 -> 0) and run unchanged, as ComfyUI's CONST model sampling does: Euler's step
x + (t' - t)(x - x0)/t = x + (t' - t) v is diffusers' FlowMatchEulerDiscreteScheduler step exactly, and Heun
is its FlowMatchHeunDiscreteScheduler. DPM++ 2M and UniPC run too and converge to the same solution
(tests/test_flow_matching.py), but on flow times their exponential integrators, derived for
x = x0 + sigma * eps, are not diffusers' flow solvers: for those, run them unchanged in the VE variable of
``flow_as_ve`` below (what diffusers' DPMSolverMultistep/UniPCMultistep with use_flow_sigmas compute, and
what ComfyUI now does for flow models through the half log-SNR). The first sample is noise * sigmas[0] = noise
(t = 1), the k-diffusion "sigma" initialisation unchanged.

Not valid on flow times: the ancestral and SDE samplers, whose fresh noise assumes x = x0 + sigma * eps (VE);
on flow times the noise must be re-mixed as (1 - t) x0 + t eps (ComfyUI's CONST branch). In the VE variable
of ``flow_as_ve`` that assumption holds; no test here covers them yet.

Why flow times and not only the VE variable: dividing by (1 - t) gives y = x_t / (1 - t) = x0 + (t / (1 - t)) eps,
a true VE variable, but its first level t = 1 is sigma = infinity, which no sampler can start from; the
SD 3 and FLUX.1 schedules (and diffusers' Euler) start at t = 1 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..config import FlowScheduleConfig
from .denoisers import sigma_per_image


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD 3's timestep shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23): more steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def time_shift_exponential(mu: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX.1's shift: t' = e^mu / (e^mu + (1/t - 1)), the SD 3 shift with s = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def dynamic_shift_mu(config: FlowScheduleConfig, image_seq_len: int) -> float:
    """mu, linear in the image token count: base_shift at base_image_seq_len, max_shift at max_image_seq_len."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return config.base_shift + slope * (image_seq_len - config.base_image_seq_len)


def flow_sigmas(config: FlowScheduleConfig, steps: int, image_seq_len: int | None = None) -> torch.Tensor:
    """The ``steps + 1`` flow times t (float64, from 1 down, ending at 0) that diffusers' pipelines visit.

    ``image_seq_len``: the transformer's image token count, (H/16)(W/16) for 8x latents in 2x2 patches;
    needed with ``dynamic_shift``."""
    if steps < 1:
        raise ValueError(f"flow_sigmas needs at least one step; got {steps}")
    n = config.num_train_timesteps
    if config.spacing == "uniform":
        t = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    else:  # between the end points of the (shifted, unless dynamic) training schedule t = 1/n ... 1
        ends = torch.tensor([1.0, 1.0 / n], dtype=torch.float64)
        if not config.dynamic_shift:
            ends = shift_times(ends, config.shift)
        t = torch.linspace(float(ends[0]), float(ends[1]), steps, dtype=torch.float64)
    if config.dynamic_shift:
        if image_seq_len is None:
            raise ValueError("flow_sigmas: a dynamic shift (FLUX.1-dev) depends on the image size; pass "
                             "image_seq_len = (height // 16) * (width // 16)")
        t = time_shift_exponential(dynamic_shift_mu(config, image_seq_len), t)
    else:
        t = shift_times(t, config.shift)
    return torch.cat([t, t.new_zeros(1)])


def flow_img2img_start(steps: int, strength: float) -> int:
    """Where image-to-image starts among a flow run's steps + 1 times: strength s runs the last ceil(s * steps)
    steps, as diffusers' SD 3 and FLUX.1 image-to-image pipelines count (their ``get_timesteps`` keeps
    int(steps - s * steps) out; the U-Net pipelines, and ``schedulers.img2img_start``, keep floor(s * steps)
    in). 0 runs none (the image comes back unchanged), 1 all. The 1e-9 guards the float product where
    diffusers does not: 25 steps at 0.56 give 14.000000000000002, which means 14 (diffusers runs 15 there)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be between 0 and 1; got {strength}")
    run = 0 if strength == 0 else max(1, math.ceil(steps * strength - 1e-9))
    return steps - min(run, steps)


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps: where image-to-image starts (diffusers' ``scale_noise``)."""
    return (1 - t) * x0 + t * noise


class VelocityModel(Protocol):
    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor, **extras) -> torch.Tensor: ...


class FlowDenoiser:
    """Wraps a velocity-predicting transformer: ``(x, sigma, context, pooled, **extras) -> x0``.

    sigma is the flow time t; the network sees x_t as it is (no input scaling) and the timestep
    t * num_train_timesteps, as both MMDiT and FLUX.1 were trained."""

    def __init__(self, model: VelocityModel, config: FlowScheduleConfig | None = None):
        self.model = model
        self.num_train_timesteps = (config or FlowScheduleConfig()).num_train_timesteps
        self.sigma_min, self.sigma_max = 0.0, 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, context: torch.Tensor,
                 pooled: torch.Tensor, **extras) -> torch.Tensor:
        t = sigma_per_image(sigma, x)
        v = self.model(x.to(context.dtype), t * self.num_train_timesteps, context, pooled, **extras).to(x.dtype)
        return x - t[:, None, None, None] * v


@dataclass(frozen=True)
class SkipLayerGuidance:
    """SD 3.5's skip-layer guidance (diffusers' ``skip_guidance_layers``; "SLG" in Forge and ComfyUI): at the
    steps between ``start`` and ``stop`` (fractions of the loop's steps), x0 moves ``scale`` times further along
    x0_cond - x0_skip, where x0_skip is the prompt's prediction with the joint ``blocks`` left out. Those
    middle blocks carry structure, so guiding away from the model without them sharpens anatomy and layout
    (Stability's SD 3.5 Medium recipe: blocks 7, 8, 9, scale 2.8, from 1 % to 20 % of the steps)."""

    blocks: tuple[int, ...]
    scale: float
    start: float
    stop: float
    levels: tuple[float, ...]  # the flow times the sampler loop visits, first to last

    def applies(self, t: float) -> bool:
        """diffusers' window on the 0-based step i of N: start * N < i < stop * N. A call's step is the last
        level at or above its t (Heun's second call, at the next level, counts as the next step)."""
        steps = len(self.levels) - 1
        i = sum(1 for level in self.levels[1:steps] if level >= t - 1e-6 * max(t, 1e-8))
        return self.start * steps < i < self.stop * steps


def flow_guidance(model: FlowDenoiser, cond: tuple[torch.Tensor, torch.Tensor],
                  uncond: tuple[torch.Tensor, torch.Tensor] | None, guidance_scale: float, *,
                  skip_layers: SkipLayerGuidance | None = None,
                  observer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None, **extras
                  ) -> Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]:
    """Classifier-free guidance (Ho & Salimans 2022) of a flow model, both halves in one call.

    ``cond`` and ``uncond`` are (context, pooled) pairs. x0 is linear in v at fixed x and t, so guiding x0
    equals diffusers' guiding of the velocity. ``skip_layers``: skip-layer guidance on top, one more call on
    the prompt's half where it applies. ``observer`` sees (t, x0_cond, x0_uncond) at every guided call.
    ``extras`` (FLUX.1-dev's ``guidance=``) go to every call."""
    context, pooled = cond
    if uncond is None or guidance_scale == 1.0:
        return lambda x, sigma: model(x, sigma, context, pooled, **extras)
    both_context = torch.cat([uncond[0], context])
    both_pooled = torch.cat([uncond[1], pooled])

    def denoise(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = sigma_per_image(sigma, x)
        x0_uncond, x0_cond = model(torch.cat([x, x]), torch.cat([sigma, sigma]), both_context, both_pooled,
                                   **extras).chunk(2)
        if observer is not None:
            observer(sigma, x0_cond, x0_uncond)
        x0 = x0_uncond + guidance_scale * (x0_cond - x0_uncond)
        if skip_layers is not None and skip_layers.applies(float(sigma[0])):
            x0_skip = model(x, sigma, context, pooled, skip_blocks=skip_layers.blocks, **extras)
            x0 = x0 + skip_layers.scale * (x0_cond - x0_skip)
        return x0

    return denoise


# --- the same ODE in a VE variable, for the exponential integrators (DPM++, UniPC) ---------------------------

def ve_sigmas_of_flow(t: torch.Tensor) -> torch.Tensor:
    """Flow times t < 1 -> VE noise levels sigma = t / (1 - t): x_t / (1 - t) = x0 + sigma * eps.

    In this variable lambda = -log(sigma) is the half log-SNR log((1 - t) / t) that DPM-Solver and UniPC are
    derived in, so their steps are diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler with
    ``use_flow_sigmas=True``. t = 1 would be sigma = infinity: those schedules start just below it."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if bool((t >= 1).any()):
        raise ValueError("ve_sigmas_of_flow: t = 1 is an infinite VE noise level; start the schedule below 1 "
                         "(diffusers' flow DPM++/UniPC levels do) or sample with the flow times directly")
    return t / (1 - t)


def flow_as_ve(denoise: Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]
               ) -> Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]:
    """A flow ``denoise(x_t, t) -> x0`` as a VE one ``(y, sigma) -> x0`` with y = x_t / (1 - t),
    t = sigma / (1 + sigma). x0 is the same in both variables. Start from y = x_t / (1 - t_0); the result at
    sigma = 0 is x_0 itself."""
    def denoise_ve(y: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        sigma = sigma_per_image(sigma, y).double()
        t = sigma / (1 + sigma)
        scale = (1 - t).to(y.dtype)[:, None, None, None]
        return denoise(y * scale, t.to(torch.float32) if y.dtype != torch.float64 else t)

    return denoise_ve
