"""The one sampler registry: names, AUTOMATIC1111 labels and aliases, schedule types, errors, and the contract
every registered function keeps (one signature, one callback per step, noise only from the generator)."""

import inspect

import pytest
import torch

from gaussian_data import MU, ideal_denoiser, marginal_std
from reference import random_pipeline
from torchsd import GenerationRequest
from torchsd.cli import main
from torchsd.config import ScheduleConfig, TimestepSpacing
from torchsd.diffusion.samplers import SAMPLERS, build_sigmas, get_sampler, resolve_sampler
from torchsd.diffusion.schedulers import SCHEDULERS, get_scheduler, lcm_timesteps
from torchsd.diffusion.schedules import inference_timesteps

SD15 = ScheduleConfig()


@pytest.mark.parametrize("name, sampler, scheduler", [
    ("Euler a", "euler_a", "normal"), ("k_euler_a", "euler_a", "normal"), ("k_euler_ancestral", "euler_a", "normal"),
    ("euler", "euler", "normal"), ("LMS", "lms", "normal"), ("Heun", "heun", "normal"), ("PLMS", "plms", "normal"),
    ("DPM2", "dpm2", "karras"), ("DPM2 a", "dpm2_a", "karras"), ("k_dpm_2_a", "dpm2_a", "karras"),
    ("DPM++ 2M", "dpmpp_2m", "karras"), ("dpm++ 2m", "dpmpp_2m", "karras"), ("DPM++ 2S a", "dpmpp_2s_a", "karras"),
    ("DPM++ SDE", "dpmpp_sde", "karras"), ("DPM++ 2M SDE", "dpmpp_2m_sde", "exponential"),
    ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", "exponential"), ("UniPC", "unipc", "sgm_uniform"),
    ("LCM", "lcm", "lcm"), ("DDIM", "ddim", "normal"), ("DDPM", "ddpm", "normal"),
    # AUTOMATIC1111's combined names from before it had a separate schedule type
    ("DPM++ 2M Karras", "dpmpp_2m", "karras"), ("Euler Karras", "euler", "karras"),
    ("DPM++ 2M SDE Exponential", "dpmpp_2m_sde", "exponential"),
    ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun", "karras"),
    ("DPM++ SDE Karras", "dpmpp_sde", "karras"), ("k_dpmpp_2m_ka", "dpmpp_2m", "karras"), ("k_lms_ka", "lms", "karras"),
    ("DDIM Trailing", "ddim", "trailing"), ("Euler SGM Uniform", "euler", "sgm_uniform"),
])
def test_names_resolve_to_the_sampler_and_automatic1111_default_schedule(name, sampler, scheduler):
    spec, chosen = resolve_sampler(name)
    assert (spec.name, chosen.name) == (sampler, scheduler)
    assert get_sampler(name) is spec


def test_every_label_and_alias_names_one_sampler():
    seen = {}
    for spec in SAMPLERS.values():
        for name in (spec.name, spec.label, *spec.aliases):
            assert get_sampler(name) is spec
            assert seen.setdefault(name.lower(), spec.name) == spec.name


def test_explicit_scheduler_overrides_automatic_and_must_agree_with_a_combined_name():
    assert resolve_sampler("dpmpp_2m", "normal")[1].name == "normal"
    assert resolve_sampler("DPM++ 2M", "Karras")[1].name == "karras"
    assert resolve_sampler("DPM++ 2M Karras", "karras")[1].name == "karras"
    with pytest.raises(ValueError, match="already names the Karras schedule but scheduler is 'exponential'; give "
                                         "the sampler as 'DPM\\+\\+ 2M'"):
        resolve_sampler("DPM++ 2M Karras", "exponential")


@pytest.mark.parametrize("name, nearest", [("eulr", "euler"), ("Euler A2", "euler_a"), ("dpmpp2m", "dpmpp_2m"),
                                           ("k_lsm", "lms"), ("DPM++ 2M Karas", "DPM++ 2M Karras")])
def test_unknown_sampler_lists_the_valid_names_and_the_nearest(name, nearest):
    with pytest.raises(ValueError) as err:
        resolve_sampler(name)
    message = str(err.value)
    assert f"unknown sampler {name!r}. Did you mean {nearest!r}?" in message
    assert "Valid samplers: " + ", ".join(sorted(SAMPLERS)) in message


def test_unknown_scheduler_lists_the_valid_names_and_the_nearest():
    with pytest.raises(ValueError, match="unknown scheduler 'karas'. Did you mean 'karras'[?] Valid schedulers: "
                                         "automatic, normal, karras, exponential, sgm_uniform"):
        GenerationRequest(prompt="x", sampler="euler", scheduler="karas")
    assert get_scheduler("SGM Uniform").name == get_scheduler("sgmuniform").name == "sgm_uniform"


def test_lcm_schedule_refuses_more_steps_than_its_grid():
    with pytest.raises(ValueError, match="the LCM schedule has at most 50 steps; got 51"):
        build_sigmas(SD15, 51, get_sampler("lcm"))


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6, 8, 13, 50])
def test_lcm_timesteps_match_diffusers(steps):
    from diffusers import LCMScheduler

    reference = LCMScheduler.from_config({"beta_schedule": "scaled_linear"})
    reference.set_timesteps(steps)
    assert lcm_timesteps(SD15, steps).long().tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 10, 25, 999])
def test_timestep_spacings_match_diffusers(spacing, steps):
    from diffusers import EulerDiscreteScheduler

    reference = EulerDiscreteScheduler.from_config({"steps_offset": 1, "timestep_spacing": spacing})
    reference.set_timesteps(steps)
    ours = inference_timesteps(SD15, steps, TimestepSpacing(spacing))
    assert torch.allclose(ours, reference.timesteps.double(), atol=1e-3)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_has_the_one_signature_and_reports_every_step(name):
    spec = SAMPLERS[name]
    parameters = inspect.signature(spec.function).parameters
    assert list(parameters)[:3] == ["denoise", "x", "sigmas"]
    assert {"generator", "callback"} <= {p for p, v in parameters.items() if v.kind is v.KEYWORD_ONLY}
    assert set(spec.options) <= set(parameters)
    assert spec.function.__doc__ and spec.function.__doc__.strip()

    sigmas = build_sigmas(SD15, 5, spec)
    seen = []
    x = MU + marginal_std(float(sigmas[0])) * torch.ones(2, 3, dtype=torch.float64)
    spec.function(ideal_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                  callback=seen.append, **spec.options)
    assert [s.index for s in seen] == list(range(5)) and {s.total for s in seen} == {5}
    assert [s.sigma for s in seen] == sigmas[:-1].tolist()


@pytest.mark.parametrize("scheduler", sorted(set(SCHEDULERS) - {"automatic"}))
def test_every_schedule_starts_high_decreases_and_ends_at_its_last_level(scheduler):
    for name in ("euler", "ddim"):
        sigmas = build_sigmas(SD15, 12, get_sampler(name), scheduler)
        assert len(sigmas) == 13 and sigmas.dtype == torch.float64
        assert (sigmas[1:] < sigmas[:-1]).all()
        # DDIM ends at the level of timestep 0, unless its levels got there already: then at 0
        reaches_t0 = scheduler in ("linspace", "karras", "exponential")
        ends_at_alpha_bar_0 = name == "ddim" and not reaches_t0
        assert float(sigmas[-1]) == (pytest.approx(0.0292, abs=1e-4) if ends_at_alpha_bar_0 else 0.0)
        assert float(sigmas[-2]) > 0.0292 - 1e-4


def test_infotext_names_the_schedule_type_and_the_cli_takes_it(tmp_path):
    sd = random_pipeline("sd1")
    request = GenerationRequest(prompt="a cat", sampler="DPM++ 2M", steps=2, width=32, height=32, seed=1)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in sd.infotext(request, 1, 32, 32)
    request = request.replace(sampler="DPM++ 2M SDE Exponential")
    assert "Sampler: DPM++ 2M SDE, Schedule type: Exponential" in sd.infotext(request, 1, 32, 32)

    folder = tmp_path / "model"
    sd.save(folder)
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "--model", str(folder), "--steps", "2", "--size", "32x32", "--seed", "3",
                 "--sampler", "euler", "--scheduler", "karras", "--output", str(out)]) == 0
    from torchsd.pipeline.infotext import parse_infotext, read_png_infotext

    info = parse_infotext(read_png_infotext(out))
    assert info["Sampler"] == "Euler" and info["Schedule type"] == "Karras"


def test_cli_refuses_an_unknown_scheduler_with_exit_2(tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert main(["generate", "a cat", "--scheduler", "karas", "--output", str(out)]) == 2
    assert "unknown scheduler 'karas'. Did you mean 'karras'?" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_unipc_visits_diffusers_unipc_timesteps_then_ends_at_timestep_0(steps):
    """AUTOMATIC1111's UniPC levels: n + 1 timesteps evenly from 999 to 0. diffusers' UniPC visits the first n
    of them (rounded to integers) and then jumps to sigma 0; ours end at timestep 0's level instead."""
    from diffusers import UniPCMultistepScheduler

    from torchsd.diffusion.schedules import timestep_of_sigma, training_sigmas

    reference = UniPCMultistepScheduler.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                     "beta_end": 0.012})
    reference.set_timesteps(steps)
    sigmas = build_sigmas(SD15, steps, get_sampler("unipc"))
    timesteps = timestep_of_sigma(training_sigmas(SD15).log(), sigmas[:-1])
    assert timesteps.round().long().tolist() == reference.timesteps.tolist()
    assert float(sigmas[-1]) == pytest.approx(float(training_sigmas(SD15)[0]))


@pytest.mark.parametrize("name, options, message", [
    ("lms", {"order": 7}, "LMS order must be between 1 and 6; got 7"),
    ("unipc", {"order": 4}, "UniPC order must be 1, 2 or 3; got 4"),
    ("unipc", {"variant": "bh3"}, "UniPC variant must be 'bh1' or 'bh2'; got 'bh3'"),
    ("dpmpp_2m_sde", {"solver_type": "euler"}, "solver_type must be 'midpoint' or 'heun'; got 'euler'"),
])
def test_bad_sampler_options_are_refused_with_the_valid_values(name, options, message):
    sigmas = build_sigmas(SD15, 3, get_sampler(name))
    with pytest.raises(ValueError, match=message):
        get_sampler(name).function(ideal_denoiser, torch.zeros(1, 3, dtype=torch.float64), sigmas, **options)
