"""DeepCache: off, images are bit-identical; every step in full (interval 1 inside the wrapper), the wrapper gives
the plain U-Net's bits; on, whole runs match the ``DeepCache`` package's DeepCacheSDHelper on diffusers'
StableDiffusionPipeline holding the same weights, branch by branch."""

from __future__ import annotations

import pytest
import torch

from reference import max_rel_error, random_pipeline
from torchsd.models.step_cache import DeepCacheUNet
from torchsd.pipeline.infotext import request_fields

RUN = dict(steps=8, guidance_scale=5.0, width=32, height=32, seed=3, sampler="Euler")


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1", seed=2)


@pytest.fixture(scope="module")
def folder(sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("deepcache") / "model"
    sd.save(path)
    return path


def test_off_is_bit_identical_and_the_unet_comes_back(sd):
    plain = sd.generate("a red circle", **RUN).latents
    assert torch.equal(plain, sd.generate("a red circle", deep_cache_interval=1, **RUN).latents)
    cached = sd.generate("a red circle", deep_cache_interval=3, **RUN).latents
    assert not torch.equal(plain, cached)
    assert sd.denoiser.unet is sd.unet
    assert torch.equal(plain, sd.generate("a red circle", **RUN).latents)


@pytest.mark.parametrize("family, branch", [("sd1", 0), ("sd1", 2), ("sd1", 4), ("sd2", 1)])
def test_full_steps_are_the_plain_unet_bit_for_bit(family, branch):
    sd = random_pipeline(family, seed=2)
    gen = torch.Generator().manual_seed(0)
    z, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(2, 77, sd.unet.config.context_dim, generator=gen)
    wrapper = DeepCacheUNet(sd.unet, interval=1, branch=branch)
    with torch.no_grad():
        for t in (900.0, 500.0):
            assert torch.equal(wrapper(z, torch.tensor([t]), context), sd.unet(z, torch.tensor([t]), context))


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 1), (3, 3), (2, 5)])
def test_run_matches_deepcache_package(sd, folder, interval, branch):
    pytest.importorskip("DeepCache")
    import diffusers
    from DeepCache import DeepCacheSDHelper

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # the tiny VAE scales by 2
    ours = sd.generate("a red circle", "blurry", latents=noise, deep_cache_interval=interval,
                       deep_cache_branch=branch, **RUN).latents
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    theirs = pipe("a red circle", negative_prompt="blurry", num_inference_steps=RUN["steps"], guidance_scale=5.0,
                  width=32, height=32, latents=noise, output_type="latent").images
    plain = sd.generate("a red circle", "blurry", latents=noise, **RUN).latents
    assert max_rel_error(plain, theirs) > 1e-3  # caching changed the run
    assert max_rel_error(ours, theirs) < 1e-3


def test_options_in_infotext_and_errors_teach(sd):
    result = sd.generate("a red circle", deep_cache_interval=3, deep_cache_branch=1, **RUN)
    assert "DeepCache interval: 3, DeepCache branch: 1" in result.infotexts[0]
    fields = request_fields(result.infotexts[0])
    assert (fields["deep_cache_interval"], fields["deep_cache_branch"]) == (3, 1)
    with pytest.raises(ValueError, match="deep_cache_interval must be an integer >= 1"):
        sd.generate("a red circle", deep_cache_interval=0, **RUN)
    with pytest.raises(ValueError, match="deep_cache_branch must be between 0 and"):
        sd.generate("a red circle", deep_cache_interval=2, deep_cache_branch=99, **RUN)


def test_cli_flags_reach_the_request():
    from torchsd.cli import build_parser
    from torchsd.cli.flags import request_from_args

    args = build_parser().parse_args(["generate", "a cat", "--model", "x", "--deep-cache-interval", "3",
                                      "--deep-cache-branch", "2"])
    request = request_from_args(args)
    assert (request.deep_cache_interval, request.deep_cache_branch) == (3, 2)


def test_a_step_is_a_distinct_timestep_and_a_higher_one_starts_a_new_pass(sd):
    """Heun's second evaluation lands on the next step's timestep (DeepCache's index into the scheduler's
    timesteps counts it there too); a hires or img2img pass starts over with a full step."""
    wrapper = DeepCacheUNet(sd.unet, interval=2)
    steps = [wrapper._next_step(torch.tensor([t])) for t in (900.0, 800.0, 800.0, 700.0, 700.0, 999.0, 500.0)]
    assert steps == [0, 1, 1, 2, 2, 0, 1]
