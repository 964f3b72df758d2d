"""Hires fix: first pass, upscale (latent or image), second image-to-image pass with its own steps/strength."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import random_pipeline
from torchsd.diffusion.variation import variation_noise
from torchsd.noise import make_generators
from torchsd.pipeline import GenerationRequest
from torchsd.pipeline import run as steps
from torchsd.pipeline.features.hires import upscaler_label

OPTIONS = dict(steps=3, width=16, height=16, seed=12)


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


@pytest.fixture(scope="module")
def first_pass(sd):
    return sd.generate("a cat", **OPTIONS)


def test_strength_zero_returns_the_latent_upscale_of_the_first_pass(sd, first_pass):
    result = sd.generate("a cat", hires=True, hires_strength=0.0, **OPTIONS)
    expected = F.interpolate(first_pass.latents, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.equal(result.latents, expected)
    assert result.images[0].size == (32, 32)


def test_second_pass_is_image_to_image_from_the_upscaled_latents(sd, first_pass):
    result = sd.generate("a cat", hires=True, hires_scale=1.5, hires_steps=4, hires_strength=0.5,
                         hires_upscaler="latent (nearest)", **OPTIONS)
    assert result.images[0].size == (24, 24)
    upscaled = F.interpolate(first_pass.latents, size=(12, 12), mode="nearest")
    # 4 steps at strength 0.5 run the last 2 levels, from fresh noise of the same seed
    noise = variation_noise((1, 4, 12, 12), [12], make_generators([12]))
    from torchsd.diffusion.samplers import build_sigmas, get_sampler

    sigmas = build_sigmas(sd.config.schedule, 4, get_sampler("ddim"))[2:]
    cond, uncond = sd.encode_prompt(["a cat"]), sd.encode_prompt([""])
    request = GenerationRequest(prompt="a cat")
    run = steps.plan(sd, request, seeds=[12])  # the generators of seed 12, fresh
    run.cond, run.uncond = cond, uncond
    expected = steps.sample(sd, request, run, upscaled + noise * sigmas[0].item(), sigmas)
    assert torch.equal(result.latents, expected)
    info = result.infotexts[0]
    for part in ("Size: 16x16", "Denoising strength: 0.5", "Hires upscale: 1.5", "Hires steps: 4",
                 "Hires upscaler: Latent (nearest)"):
        assert part in info


def test_image_upscaler_and_explicit_size(sd):
    result = sd.generate("a cat", hires=True, hires_size=(24, 32), hires_upscaler="Lanczos", hires_steps=2,
                         **OPTIONS)
    assert result.images[0].size == (24, 32)
    assert "Hires resize: 24x32" in result.infotexts[0] and "Hires upscale:" not in result.infotexts[0]
    assert np.asarray(result.images[0]).std() > 0


def test_upscaler_names_are_read_like_automatic1111s():
    assert upscaler_label("latent-bicubic") == "Latent (bicubic)"
    assert upscaler_label("LATENT (nearest-exact)") == "Latent (nearest-exact)"
    with pytest.raises(ValueError, match="unknown hires upscaler 'R-ESRGAN 4x'; choose one of Latent, "):
        upscaler_label("R-ESRGAN 4x")


@pytest.mark.parametrize("options, message", [
    (dict(hires_scale=0.5), "hires_scale must be between 1 and 8"),
    (dict(hires_steps=0), "hires_steps must be between 1"),
    (dict(hires_strength=2.0), "hires_strength must be between 0 and 1"),
    (dict(hires_size=(30, 32)), "hires_size must be multiples of 8"),
    (dict(hires_upscaler=" "), "hires_upscaler must be an upscaler's name"),  # names: checked by the run
    (dict(init_image="/no/such.png"), "does not exist"),
])
def test_bad_hires_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(prompt="x", hires=True, **options)


def test_hires_with_an_init_image_is_refused():
    from PIL import Image

    with pytest.raises(ValueError, match="hires fix is for text-to-image"):
        GenerationRequest(prompt="x", hires=True, init_image=Image.new("RGB", (8, 8)))
