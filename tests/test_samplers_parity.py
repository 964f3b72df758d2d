"""Each sampler's final latents against the diffusers scheduler of the same name, on the same tiny U-Net.

The diffusers scheduler is built from the SD 1.5 scheduler config with the class's own defaults and driven by
hand, as ``StableDiffusionPipeline`` does, around diffusers' U-Net holding our weights; ours runs the registry's
function over ``ModelDenoiser``. Both start from the same latents, use the same text context and guidance, and
(for stochastic samplers) a generator with the same seed.

``levels="ours"``: our ``build_sigmas`` must reproduce the scheduler's noise levels, and the run uses them.
``levels="theirs"``: the scheduler's levels are fed to our function, because we follow AUTOMATIC1111's
levels where diffusers differs (its multistep schedulers space n + 1 timesteps and drop the last; DPM2 drops the
next-to-last level in AUTOMATIC1111); the test then checks the step rule alone.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from kdiffusion_ref import BrownianPath
from reference import diffusers_unet, max_rel_error, random_pipeline
from torchsd.diffusion.denoisers import ModelDenoiser, classifier_free_guidance
from torchsd.diffusion.samplers import build_sigmas, initial_noise_scale, resolve_sampler

SD15_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1}
TOL = 1e-3
GUIDANCE = 5.0
VP_SPACE = {"DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
            "UniPCMultistepScheduler", "LCMScheduler"}  # their samples are z = x / sqrt(1 + sigma^2)


@dataclasses.dataclass
class Case:
    sampler: str
    scheduler: str
    reference: str  # diffusers class
    config: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)  # our function's options (eta, order, ...)
    step_options: dict = dataclasses.field(default_factory=dict)  # diffusers' step() options
    levels: str = "ours"
    steps: int = 8
    rounded_timesteps: bool = False  # diffusers rounds the U-Net timestep of Karras levels to an integer
    same_first_sample: bool = True  # False: we start from noise * sigma_max as AUTOMATIC1111 (diffusers: VP)
    v_prediction: bool = True  # also checked on a v-prediction model

    def __str__(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in {**self.config, **self.options}.items())
        return f"{self.sampler}-{self.scheduler}{extra}"


CASES = [
    Case("ddim", "normal", "DDIMScheduler"),
    Case("ddim", "trailing", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    Case("ddim", "normal", "DDIMScheduler", options={"eta": 0.6}, step_options={"eta": 0.6}),
    Case("ddpm", "normal", "DDPMScheduler"),
    # diffusers' PNDM combines v-predictions, not eps, in its multistep formula: only eps models agree
    Case("plms", "normal", "PNDMScheduler", v_prediction=False),
    Case("euler", "normal", "EulerDiscreteScheduler"),
    Case("euler", "karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    Case("euler", "exponential", "EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    Case("euler", "trailing", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    Case("euler_a", "normal", "EulerAncestralDiscreteScheduler"),
    Case("heun", "normal", "HeunDiscreteScheduler"),
    Case("dpm2", "normal", "KDPM2DiscreteScheduler", levels="theirs"),
    Case("dpm2_a", "normal", "KDPM2AncestralDiscreteScheduler", levels="theirs"),
    Case("lms", "normal", "LMSDiscreteScheduler"),
    Case("lms", "karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    Case("dpmpp_2m", "normal", "DPMSolverMultistepScheduler", levels="theirs", same_first_sample=False),
    Case("dpmpp_2m", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True},
         rounded_timesteps=True, same_first_sample=False),
    Case("dpmpp_2m_sde", "normal", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
         levels="theirs", same_first_sample=False),
    Case("dpmpp_2m_sde_heun", "normal", "DPMSolverMultistepScheduler",
         {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, levels="theirs", same_first_sample=False),
    Case("dpmpp_sde", "normal", "DPMSolverSDEScheduler"),
    Case("unipc", "normal", "UniPCMultistepScheduler", levels="theirs"),
    # diffusers' bh1 turns the last step to sigma = 0 into NaN (B(h) = h is infinite there): end at sigma_min
    Case("unipc", "normal", "UniPCMultistepScheduler",
         {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
         options={"variant": "bh1", "order": 3}, levels="theirs"),
    Case("lcm", "automatic", "LCMScheduler", steps=4),
]
PARAMS = [pytest.param(case, prediction, id=f"{case}-{prediction}")
          for prediction in ("epsilon", "v_prediction") for case in CASES
          if prediction == "epsilon" or case.v_prediction]


@pytest.fixture(scope="module")
def models():
    """prediction type -> (our pipeline, diffusers' U-Net with its weights, the [uncond, cond] context), built once."""
    built = {}

    def get(prediction: str):
        if prediction not in built:
            sd = random_pipeline("sd1", prediction)
            context = torch.cat([sd.encode_prompt([""]), sd.encode_prompt(["a red circle at the top left"])])
            built[prediction] = sd, diffusers_unet(sd), context
        return built[prediction]

    return get


def make_scheduler(case: Case, prediction: str):
    import diffusers

    cls = getattr(diffusers, case.reference)
    return cls.from_config({**SD15_SCHEDULER, **case.config, "prediction_type": prediction})


def reference_levels(scheduler) -> torch.Tensor:
    """The distinct noise levels a diffusers scheduler visits, in sigma, ending with its last one."""
    if hasattr(scheduler, "sigmas"):
        return torch.unique_consecutive(scheduler.sigmas.double())
    alpha_bar = scheduler.alphas_cumprod.double()
    timesteps = torch.unique_consecutive(scheduler.timesteps)
    levels = ((1 - alpha_bar[timesteps]) / alpha_bar[timesteps]).sqrt()
    final_alpha = getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0))  # DDIM/PNDM end at alpha_bar_0
    if type(scheduler).__name__ in ("DDPMScheduler", "LCMScheduler"):
        final_alpha = torch.tensor(1.0)
    final = ((1 - final_alpha.double()) / final_alpha.double()).sqrt()
    return torch.cat([levels, final.reshape(1)])


def run_diffusers(scheduler, unet, context, latents, case: Case, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if case.reference == "DPMSolverSDEScheduler":  # a Brownian path from our generator instead of its tree
        scheduler.noise_sampler = BrownianPath(latents, generator)
    accepts = inspect.signature(scheduler.step).parameters
    step_options = dict(case.step_options, **({"generator": generator} if "generator" in accepts else {}))
    with torch.no_grad():
        for t in scheduler.timesteps:
            z = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            uncond, cond = unet(z, t, encoder_hidden_states=context).sample.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents, **step_options).prev_sample
    return latents


class RoundedTimesteps(ModelDenoiser):
    """Our denoiser with the U-Net timestep rounded, as diffusers' DPM-Solver does for Karras levels."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return super().timestep(sigma).round()


@pytest.mark.parametrize("case, prediction", PARAMS)
def test_final_latents_match_diffusers(models, case, prediction):
    sd, unet, context = models(prediction)
    spec, scheduler_type = resolve_sampler(case.sampler, case.scheduler)
    reference = make_scheduler(case, prediction)
    reference.set_timesteps(case.steps)
    theirs_levels = reference_levels(reference)
    ours_levels = build_sigmas(sd.config.schedule, case.steps, spec, scheduler_type)
    if case.levels == "ours":
        assert len(ours_levels) == len(theirs_levels) == case.steps + 1
        assert torch.allclose(ours_levels, theirs_levels, rtol=2e-5, atol=1e-7)  # diffusers rounds to float32
    levels = ours_levels if case.levels == "ours" else theirs_levels

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vp = case.reference in VP_SPACE
    start = noise * reference.init_noise_sigma  # diffusers' first sample: z (VP) or x
    x_start = start * (1 + float(levels[0]) ** 2) ** 0.5 if vp else start
    if case.same_first_sample:
        assert abs(initial_noise_scale(levels, spec) - float(x_start.norm() / noise.norm())) < 1e-4
    else:  # AUTOMATIC1111's noise * sigma_max
        assert initial_noise_scale(levels, spec) == pytest.approx(float(levels[0]))

    denoiser = RoundedTimesteps(sd.unet, sd.config.schedule) if case.rounded_timesteps else sd.denoiser
    uncond, cond = context.chunk(2)
    denoise = classifier_free_guidance(denoiser, cond, uncond, GUIDANCE)
    seed = 1234
    with torch.no_grad():
        x = spec.function(denoise, x_start, levels.float(), generator=[torch.Generator().manual_seed(seed)],
                          **dict(spec.options, **case.options))
    ours = x / (1 + float(levels[-1]) ** 2) ** 0.5
    theirs = run_diffusers(reference, unet, context, start, case, seed)
    assert torch.isfinite(ours).all()
    assert max_rel_error(ours, theirs) < TOL


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("samplers") / "model"
    random_pipeline("sd1").save(path)
    return path


@pytest.mark.parametrize("sampler, scheduler, reference, config", [
    ("Euler a", "automatic", "EulerAncestralDiscreteScheduler", {}),
    ("Heun", "karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
])
def test_whole_pipeline_matches_diffusers_pipeline(folder, sampler, scheduler, reference, config):
    """End to end, first sample, schedule, noise stream and final latents included."""
    import diffusers

    import torchsd

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # the tiny VAE scales by 2
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    ours = sd.generate("a red circle", "blurry", steps=6, guidance_scale=5.0, sampler=sampler, scheduler=scheduler,
                       width=32, height=32, latents=noise, seed=7)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    # the saved config names the model's "leading" spacing (for DDIM); the SD 1.5 config on the Hub names none,
    # which gives these classes their own default, linspace: the levels of k-diffusion and of our "normal"
    config = {**config, "timestep_spacing": "linspace"}
    pipe.scheduler = getattr(diffusers, reference).from_config(pipe.scheduler.config, **config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red circle", negative_prompt="blurry", num_inference_steps=6, guidance_scale=5.0, width=32,
                  height=32, latents=noise, generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL
