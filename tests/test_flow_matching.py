"""Flow matching (SD 3.5, FLUX.1) through torchsd's samplers equals diffusers' FlowMatchEulerDiscreteScheduler."""

import pytest
import torch

from torchsd.config import FlowScheduleConfig
from torchsd.diffusion.flow import FlowDenoiser, dynamic_shift_mu, flow_noise, flow_sigmas
from torchsd.diffusion.samplers_dpmpp import sample_dpmpp_2m
from torchsd.diffusion.samplers_karras import sample_euler, sample_heun
from torchsd.diffusion.samplers_unipc import sample_unipc


def diffusers_scheduler(config: FlowScheduleConfig, steps: int, image_seq_len: int | None = None):
    """The scheduler as diffusers' SD 3 pipeline (set_timesteps(steps)) or FLUX.1 pipeline (its own sigmas,
    mu from calculate_shift) sets it up."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=config.shift, use_dynamic_shifting=config.dynamic_shift, base_shift=config.base_shift,
        max_shift=config.max_shift, base_image_seq_len=config.base_image_seq_len,
        max_image_seq_len=config.max_image_seq_len)
    if config.spacing == "uniform":
        mu = None if image_seq_len is None else calculate_shift(
            image_seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
        scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=mu)
    else:
        scheduler.set_timesteps(steps)
    return scheduler


CASES = [(FlowScheduleConfig.sd3(), 28, None), (FlowScheduleConfig(shift=1.0), 10, None),
         (FlowScheduleConfig.flux_dev(), 28, 4096), (FlowScheduleConfig.flux_dev(), 20, 1024),
         (FlowScheduleConfig.flux_schnell(), 4, None)]


@pytest.mark.parametrize("config,steps,seq", CASES)
def test_sigmas_and_timesteps_match_diffusers(config, steps, seq):
    scheduler = diffusers_scheduler(config, steps, seq)
    ours = flow_sigmas(config, steps, seq)
    assert ours.shape == scheduler.sigmas.shape
    torch.testing.assert_close(ours.float(), scheduler.sigmas, atol=1e-6, rtol=0)
    torch.testing.assert_close((ours[:-1] * 1000).float(), scheduler.timesteps, atol=1e-3, rtol=0)


def test_dynamic_shift_mu_is_linear_in_tokens():
    config = FlowScheduleConfig.flux_dev()
    assert dynamic_shift_mu(config, 256) == pytest.approx(0.5)
    assert dynamic_shift_mu(config, 4096) == pytest.approx(1.15)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_sigmas(config, 4)


def test_bad_config_says_how_to_fix_it():
    with pytest.raises(ValueError, match="shift must be positive"):
        FlowScheduleConfig(shift=0.0)
    with pytest.raises(ValueError, match="spacing"):
        FlowScheduleConfig(spacing="karras")


class ToyVelocity(torch.nn.Module):
    """A smooth nonlinear velocity field that depends on the timestep and the conditioning."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(4, 4, generator=gen) * 0.3)
        self.calls = []

    def forward(self, x, timesteps, context, pooled):
        self.calls.append(timesteps.clone())
        h = torch.einsum("oc,bchw->bohw", self.weight, x)
        return torch.tanh(h) * (1 + timesteps[:, None, None, None] / 1000) + context.mean() + pooled.mean()


@pytest.mark.parametrize("config,steps,seq", CASES)
def test_euler_equals_flow_match_euler_step_for_step(config, steps, seq):
    model = ToyVelocity()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    context, pooled = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    model.double()

    scheduler = diffusers_scheduler(config, steps, seq)
    theirs, trajectory = noise.clone(), []
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(theirs, t.expand(2).double(), context, pooled)
            theirs = scheduler.step(v, t, theirs).prev_sample
            trajectory.append(theirs)

    denoiser = FlowDenoiser(model, config)
    sigmas = flow_sigmas(config, steps, seq)
    x, ours = noise * sigmas[0].item(), []
    for i in range(steps):  # one sampler call per step: the whole trajectory, step for step
        x = sample_euler(lambda x, s: denoiser(x, s, context, pooled), x, sigmas[i:i + 2])
        ours.append(x)
    # the scheduler keeps float32 sigmas: agreement to float32 rounding of t
    for mine, reference in zip(ours, trajectory, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_flow_noise_is_diffusers_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    t = scheduler.timesteps[3:4]
    expected = scheduler.scale_noise(x0, t, noise)
    torch.testing.assert_close(flow_noise(x0, noise, float(scheduler.sigmas[3])), expected)


@pytest.mark.parametrize("sampler,tolerance", [(sample_euler, 0.03), (sample_heun, 3e-4), (sample_dpmpp_2m, 8e-3),
                                               (sample_unipc, 5e-3)])
def test_samplers_solve_the_flow_ode(sampler, tolerance):
    """Data ~ N(0, s^2): x0(x_t) = E[x0 | x_t] is known in closed form, and the flow ODE carries noise eps at
    t = 1 to s * eps at t = 0 (the map keeps x_t / std(x_t)). Every sampler must converge to it."""
    s = 0.5

    def denoise(x, t):
        t = float(t)
        return (1 - t) * s ** 2 / ((1 - t) ** 2 * s ** 2 + t ** 2) * x

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigmas = flow_sigmas(FlowScheduleConfig.sd3(), 160)
    result = sampler(denoise, noise * sigmas[0].item(), sigmas)
    # Euler converges at first order, the others at second; DPM++ 2M and UniPC, whose exponential integrators
    # assume x = x0 + sigma * eps, are poor at few steps on flow times (see diffusion/flow.py)
    torch.testing.assert_close(result, s * noise, atol=tolerance, rtol=0)


def test_heun_equals_flow_match_heun():
    """Heun on flow times is diffusers' FlowMatchHeunDiscreteScheduler (2 model calls a step, Euler last)."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    config, steps = FlowScheduleConfig.sd3(), 8
    model = ToyVelocity().double()
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    context, pooled = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    scheduler = FlowMatchHeunDiscreteScheduler(shift=config.shift)
    scheduler.set_timesteps(steps)
    theirs = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            theirs = scheduler.step(model(theirs, t.expand(1).double(), context, pooled), t, theirs).prev_sample
    denoiser = FlowDenoiser(model, config)
    sigmas = flow_sigmas(config, steps)
    ours = sample_heun(lambda x, s: denoiser(x, s, context, pooled), noise * sigmas[0].item(), sigmas)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_exponential_integrators_in_the_ve_variable_equal_diffusers_flow_schedulers(solver):
    """DPM++ 2M and UniPC, unchanged, on y = x_t / (1 - t) with sigma = t / (1 - t) are diffusers'
    DPMSolverMultistepScheduler / UniPCMultistepScheduler with use_flow_sigmas and flow_prediction."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    from torchsd.diffusion.flow import flow_as_ve, ve_sigmas_of_flow

    steps = 8
    kind = DPMSolverMultistepScheduler if solver == "dpmpp_2m" else UniPCMultistepScheduler
    scheduler = kind(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    model = ToyVelocity().double()
    gen = torch.Generator().manual_seed(6)
    noise = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    context, pooled = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    theirs = noise.clone()
    with torch.no_grad():
        # these schedulers round the model's timesteps to integers; the model is given the exact t * 1000 here,
        # as torchsd gives it, so that the comparison is of the solvers
        for t, sigma in zip(scheduler.timesteps, scheduler.sigmas):
            v = model(theirs, (sigma * 1000).expand(1).double(), context, pooled)
            theirs = scheduler.step(v, t, theirs).prev_sample

    denoiser = FlowDenoiser(model)
    flow_levels = scheduler.sigmas.double()
    sigmas = ve_sigmas_of_flow(flow_levels)
    sampler = sample_dpmpp_2m if solver == "dpmpp_2m" else sample_unipc
    ours = sampler(flow_as_ve(lambda x, t: denoiser(x, t, context, pooled)), noise / (1 - flow_levels[0].item()),
                   sigmas)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
