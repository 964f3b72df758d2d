"""Closed-form checks: with Gaussian data the ideal denoiser and the exact ODE solution are known
(``gaussian_data``), so each sampler's accuracy is measured against the truth, not against another tool."""

import math

import pytest
import torch

from gaussian_data import MU, ORDERS, STD, flow_error, ideal_denoiser, marginal_std, whitened_normal
from torchsd.config import ScheduleConfig
from torchsd.diffusion.samplers import SAMPLERS, build_sigmas
from torchsd.diffusion.schedules import exponential_sigmas, training_sigmas

SCHEDULE = ScheduleConfig()  # SD's own noise levels
SIGMA_MIN, SIGMA_MAX = (float(s) for s in training_sigmas(SCHEDULE)[[0, -1]])
DETERMINISTIC = [name for name, spec in SAMPLERS.items() if not spec.stochastic]
# LCM jumps to E[x0 | x] and re-noises: right for a consistency-distilled model, not for the ideal denoiser of
# the diffusion itself, whose posterior mean has less variance than the data; so it has no distribution check here
STOCHASTIC = [name for name, spec in SAMPLERS.items() if spec.stochastic and name != "lcm"]


def run(name: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int = 1) -> torch.Tensor:
    spec = SAMPLERS[name]
    return spec.function(ideal_denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed), **spec.options)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_lands_on_the_data_mean_and_variance(name):
    sigmas = build_sigmas(SCHEDULE, 50, SAMPLERS[name], "karras")
    xi = whitened_normal(2000)
    out = run(name, MU + marginal_std(float(sigmas[0])) * xi, sigmas)
    assert torch.allclose(out.mean(0), MU, atol=1e-9)  # the flow is linear: the mean must come through exactly
    first_order = name in ("euler", "ddim")
    # 50 Karras steps: first-order solvers are within ~3 %, the others within ~0.5 % (ending at sigma=0 costs
    # ~0.2 % for the narrowest dimension: the last step returns E[x0 | x], slightly narrower than the data)
    assert torch.allclose(out.std(0), STD, rtol=0.04 if first_order else 0.006)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_lands_on_the_data_mean_and_variance(name):
    spec = SAMPLERS[name]
    # TCD's own LCM grid has at most 50 levels; on the ideal denoiser it is exact in the limit on any levels
    sigmas = build_sigmas(SCHEDULE, 60, spec, "normal" if spec.scheduler == "lcm" else "automatic")
    xi = whitened_normal(20000)
    out = run(name, MU + marginal_std(float(sigmas[0])) * xi, sigmas)
    # 20000 samples: the mean is known to ~0.015 (2 std errors for the widest dimension); ancestral and SDE
    # steps are first order in the variance, within ~9 % at 60 steps (a sampler without its noise is off by >40 %)
    assert torch.allclose(out.mean(0), MU, atol=0.03)
    assert torch.allclose(out.std(0), STD, rtol=0.1)


def measured_order(name: str, options: dict, coarse: int = 32, fine: int = 128) -> float:
    """The slope of log(error) against log(steps) between ``coarse`` and ``fine`` steps on evenly spaced
    log-sigma levels from sigma_max down to sigma_min (no final jump to 0, which every sampler takes as a
    first-order step)."""
    errors = [flow_error(name, exponential_sigmas(SIGMA_MIN, SIGMA_MAX, n + 1), **options)
              for n in (coarse, fine)]
    return math.log(errors[0] / errors[1]) / math.log(fine / coarse)


@pytest.mark.parametrize("name, options, nominal, least", ORDERS,
                         ids=[f"{n}{'-' + str(o) if o else ''}" for n, o, _, _ in ORDERS])
def test_error_shrinks_at_the_expected_order(name, options, nominal, least):
    assert measured_order(name, options) >= least


def test_ancestral_samplers_with_eta_0_are_their_deterministic_solvers():
    sigmas = exponential_sigmas(SIGMA_MIN, SIGMA_MAX, 13)
    x = MU + marginal_std(SIGMA_MAX) * whitened_normal(4)
    for noisy, solver in (("euler_a", "euler"), ("ddim", "euler"), ("dpm2_a", "dpm2"),
                          ("dpmpp_2m_sde", "dpmpp_2m")):
        no_noise = SAMPLERS[noisy].function(ideal_denoiser, x, sigmas, eta=0.0)
        assert torch.allclose(no_noise, run(solver, x, sigmas), rtol=1e-12, atol=1e-12), noisy
