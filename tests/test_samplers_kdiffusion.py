"""Our samplers against k-diffusion's functions (what AUTOMATIC1111 runs) on the same tiny U-Net.

k-diffusion's side is all k-diffusion: its discrete-schedule eps denoiser around our U-Net, its schedules and its
``sample_*``; ours is ``ModelDenoiser`` and our registry. Stochastic samplers get, instead of k-diffusion's
torchsde Brownian tree, a Brownian path drawn from a generator seeded like ours, so the noise is the same.
"""

import inspect

import pytest
import torch

from kdiffusion_ref import BrownianPath, load_external, load_sampling
from reference import max_rel_error, random_pipeline
from torchsd.diffusion.denoisers import classifier_free_guidance
from torchsd.diffusion.samplers import build_sigmas, get_sampler, resolve_sampler
from torchsd.diffusion.schedules import alphas_cumprod

TOL = 1e-4
GUIDANCE = 5.0
STEPS = 8


@pytest.fixture(scope="module")
def setup():
    sd = random_pipeline("sd1")
    cond, uncond = sd.encode_prompt(["a red circle"]), sd.encode_prompt([""])
    external = load_external()

    class KDenoiser(external.DiscreteEpsDDPMDenoiser):  # AUTOMATIC1111's CompVisDenoiser, minus the LDM model
        def get_eps(self, x, t, context):
            return sd.unet(x, t, context)

    k_denoiser = KDenoiser(sd.unet, alphas_cumprod(sd.config.schedule).float(), quantize=False)

    def k_model(x, sigma):  # classifier-free guidance, as AUTOMATIC1111's CFGDenoiser does on x0
        out = k_denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=torch.cat([uncond, cond]))
        x0_uncond, x0_cond = out.chunk(2)
        return x0_uncond + GUIDANCE * (x0_cond - x0_uncond)

    ours = classifier_free_guidance(sd.denoiser, cond, uncond, GUIDANCE)
    return sd, k_model, k_denoiser, ours


def k_sigmas(k_denoiser, scheduler: str, n: int) -> torch.Tensor:
    """AUTOMATIC1111's schedules (modules/sd_schedulers.py) from k-diffusion's pieces."""
    sampling = load_sampling()
    sigma_min, sigma_max = float(k_denoiser.sigma_min), float(k_denoiser.sigma_max)
    if scheduler == "normal":  # "Uniform"/"Automatic": the model's get_sigmas
        return k_denoiser.get_sigmas(n)
    if scheduler == "karras":
        return sampling.get_sigmas_karras(n, sigma_min, sigma_max)
    if scheduler == "exponential":
        return sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    assert scheduler == "sgm_uniform"
    start, end = k_denoiser.sigma_to_t(torch.tensor(sigma_max)), k_denoiser.sigma_to_t(torch.tensor(sigma_min))
    return torch.cat([k_denoiser.t_to_sigma(torch.linspace(start, end, n + 1)[:-1]), torch.zeros(1)])


@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "sgm_uniform"])
def test_schedules_match_automatic1111(setup, scheduler):
    sd, _, k_denoiser, _ = setup
    ours = build_sigmas(sd.config.schedule, STEPS, get_sampler("euler"), scheduler)
    # k-diffusion interpolates in float32: agreement to its rounding
    assert torch.allclose(ours.float(), k_sigmas(k_denoiser, scheduler, STEPS), rtol=5e-5, atol=0)


def test_dpm2_drops_the_next_to_last_level_as_automatic1111():
    sd = random_pipeline("sd1")
    spec, scheduler = resolve_sampler("DPM2")
    assert scheduler.name == "karras"  # AUTOMATIC1111's "Automatic" for DPM2
    full = build_sigmas(sd.config.schedule, STEPS + 1, get_sampler("euler"), "karras")
    assert torch.equal(build_sigmas(sd.config.schedule, STEPS, spec), torch.cat([full[:-2], full[-1:]]))


CASES = [  # (our name, k-diffusion function, k-diffusion options, our options), on AUTOMATIC1111's default levels
    ("euler", "sample_euler", {}, {}),
    ("euler_a", "sample_euler_ancestral", {}, {}),
    ("euler_a", "sample_euler_ancestral", {"eta": 0.5}, {"eta": 0.5}),
    ("heun", "sample_heun", {}, {}),
    ("dpm2", "sample_dpm_2", {}, {}),
    ("dpm2_a", "sample_dpm_2_ancestral", {}, {}),
    ("lms", "sample_lms", {}, {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, {}),
    ("dpmpp_2s_a", "sample_dpmpp_2s_ancestral", {}, {}),
    ("dpmpp_2s_a", "sample_dpmpp_2s_ancestral", {"eta": 0.0}, {"eta": 0.0}),
    ("dpmpp_sde", "sample_dpmpp_sde", {}, {}),
    ("dpmpp_sde", "sample_dpmpp_sde", {"eta": 0.4}, {"eta": 0.4}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}, {"eta": 0.0}),
    ("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}, {}),
]


SCHEDULES = [("dpmpp_2m", "sample_dpmpp_2m", "normal"), ("dpmpp_2m", "sample_dpmpp_2m", "exponential"),
             ("dpmpp_2m", "sample_dpmpp_2m", "sgm_uniform"), ("lms", "sample_lms", "karras"),
             ("dpm2", "sample_dpm_2", "normal"), ("dpmpp_sde", "sample_dpmpp_sde", "normal")]
PARAMS = [pytest.param(name, k_function, k_options, options, "automatic",
                       id=f"{name}{'-' + str(options) if options else ''}")
          for name, k_function, k_options, options in CASES]
PARAMS += [pytest.param(name, k_function, {}, {}, scheduler, id=f"{name}-{scheduler}")
           for name, k_function, scheduler in SCHEDULES]


@pytest.mark.parametrize("name, k_function, k_options, options, scheduler", PARAMS)
def test_sampler_matches_kdiffusion(setup, name, k_function, k_options, options, scheduler):
    sd, k_model, k_denoiser, ours = setup
    spec, chosen = resolve_sampler(name, scheduler)
    sigmas = build_sigmas(sd.config.schedule, STEPS, spec, chosen).float()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise * sigmas[0]  # AUTOMATIC1111's first sample, and ours for these samplers
    seed = 99

    function = getattr(load_sampling(), k_function)
    k_kwargs = dict(k_options, disable=True)
    if "noise_sampler" in inspect.signature(function).parameters:
        k_kwargs["noise_sampler"] = BrownianPath(x, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = function(k_model, x.clone(), sigmas, **k_kwargs)
    mine = spec.function(ours, x.clone(), sigmas, generator=[torch.Generator().manual_seed(seed)],
                         **dict(spec.options, **options))
    assert torch.isfinite(mine).all()
    assert max_rel_error(mine, theirs) < TOL


@pytest.mark.parametrize("name", ["euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "ddpm", "lcm"])
def test_image_k_of_a_batch_equals_its_seed_alone(setup, name):
    sd, _, _, ours = setup
    spec = get_sampler(name)
    sigmas = build_sigmas(sd.config.schedule, 4, spec).float()
    cond, uncond = sd.encode_prompt(["a red circle"] * 2), sd.encode_prompt([""] * 2)
    batch_denoise = classifier_free_guidance(sd.denoiser, cond, uncond, GUIDANCE)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    seeds = [5, 6]
    batch = spec.function(batch_denoise, noise * sigmas[0], sigmas,
                          generator=[torch.Generator().manual_seed(s) for s in seeds])
    alone = spec.function(ours, noise[1:] * sigmas[0], sigmas, generator=[torch.Generator().manual_seed(seeds[1])])
    again = spec.function(ours, noise[1:] * sigmas[0], sigmas, generator=[torch.Generator().manual_seed(seeds[1])])
    other = spec.function(ours, noise[1:] * sigmas[0], sigmas, generator=[torch.Generator().manual_seed(7)])
    assert torch.equal(alone, again)
    assert max_rel_error(batch[1:], alone) < TOL
    assert max_rel_error(other, alone) > 1e-3  # the noise does come from the generator
