"""Image-to-image strength with every sampler: 0 returns the image's latents, 1 is text-to-image, and in between
the run is the tail of the text-to-image levels, started from the image noised to the first of them."""

import numpy as np
import pytest
import torch
from PIL import Image

from reference import random_pipeline
from torchsd import GenerationRequest
from torchsd.diffusion.samplers import SAMPLERS, build_sigmas, resolve_sampler
from torchsd.diffusion.schedulers import img2img_start
from torchsd.images import pil_to_tensor
from torchsd.noise import make_generators, randn

STEPS, SIZE, SEED = 6, 32, 21


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def request(image, sampler, strength, **extra):
    return GenerationRequest("a red circle", steps=STEPS, guidance_scale=3.0, sampler=sampler, seed=SEED,
                             init_image=image, strength=strength, width=SIZE, height=SIZE, **extra)


class Recorder:
    """Wraps the model denoiser and records the (x, sigma) of every call."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []

    def __call__(self, x, sigma, context, concat=None):
        self.calls.append((x.clone(), sigma.clone()))
        return self.denoiser(x, sigma, context, concat)


@pytest.mark.parametrize("steps, strength, start", [
    (10, 0.0, 10), (10, 1.0, 0), (10, 0.5, 5), (10, 0.75, 3), (8, 0.3, 6),
    (100, 0.29, 71),  # int(100 * 0.29) = 28: the float product is 28.999999999999996
    (100, 0.57, 43),  # int(100 * 0.57) = 56
    (10, 0.04, 9),  # a strength above 0 runs at least one step
])
def test_strength_runs_the_last_floor_strength_times_steps_steps(steps, strength, start):
    assert img2img_start(steps, strength) == start


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_strength_0_returns_the_image_latents(sd, image, sampler):
    result = sd.run(request(image, sampler, 0.0))
    expected = sd.encode_image(pil_to_tensor(image, SIZE, SIZE), make_generators([SEED]))
    assert torch.equal(result.latents, expected)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_strength_1_is_text_to_image(sd, image, sampler):
    img2img = sd.run(request(image, sampler, 1.0))
    txt2img = sd.run(request(None, sampler, 1.0))
    assert torch.equal(img2img.latents, txt2img.latents)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_strength_half_runs_the_tail_of_the_levels_from_the_noised_image(sd, image, sampler, monkeypatch):
    recorder = Recorder(sd.denoiser)
    monkeypatch.setattr(sd, "denoiser", recorder)
    steps_seen = []
    sd.run(request(image, sampler, 0.5), callback=steps_seen.append)

    spec, scheduler = resolve_sampler(sampler)
    full = build_sigmas(sd.config.schedule, STEPS, spec, scheduler).float()
    start = STEPS // 2
    assert [s.sigma for s in steps_seen] == pytest.approx(full[start:-1].tolist(), rel=1e-6)
    generators = make_generators([SEED])  # the image's latents draw first, then the noise, as in diffusers
    latents = sd.encode_image(pil_to_tensor(image, SIZE, SIZE), generators)
    x_start = latents + randn(latents.shape, generators) * full[start].item()
    x_first, sigma_first = recorder.calls[0]
    assert float(sigma_first[0]) == pytest.approx(float(full[start]), rel=1e-6)
    assert torch.allclose(x_first[:1], x_start, rtol=1e-6, atol=1e-6)  # [uncond, cond]: the same x twice
