"""Variation seeds (subseed, subseed_strength) and seed_resize_from, against AUTOMATIC1111's procedure."""

import pytest
import torch

from reference import random_pipeline
from torchsd.diffusion.variation import variation_noise
from torchsd.noise import make_generators, randn
from torchsd.pipeline import GenerationRequest


def a1111_noise(shape, seeds, subseeds, strength, resize_h=0, resize_w=0):
    """AUTOMATIC1111's create_random_tensors with the CPU random source, written out from its description:
    global-RNG draws after manual_seed, slerp along dim 1 of each (C, H, W) tensor, centred paste."""

    def draw(seed, s):
        torch.manual_seed(seed)
        return torch.randn(s)

    def slerp(val, low, high):
        low_norm = low / torch.norm(low, dim=1, keepdim=True)
        high_norm = high / torch.norm(high, dim=1, keepdim=True)
        dot = (low_norm * high_norm).sum(1)
        if dot.mean() > 0.9995:
            return low * val + high * (1 - val)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + \
            (torch.sin(val * omega) / so).unsqueeze(1) * high

    xs = []
    for i, seed in enumerate(seeds):
        noise_shape = shape if resize_h <= 0 or resize_w <= 0 else (shape[0], resize_h // 8, resize_w // 8)
        subnoise = draw(subseeds[i], noise_shape) if strength else None
        noise = draw(seed, noise_shape)
        if subnoise is not None:
            noise = slerp(strength, noise, subnoise)
        if noise_shape != shape:
            x = draw(seed, shape)
            dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
            w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
            h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
            tx, ty = max(dx, 0), max(dy, 0)
            dx, dy = max(-dx, 0), max(-dy, 0)
            x[:, ty:ty + h, tx:tx + w] = noise[:, dy:dy + h, dx:dx + w]
            noise = x
        xs.append(noise)
    return torch.stack(xs)


SHAPE = (2, 4, 8, 12)  # two images of 96x64 pixels at a downscale factor of 8


def ours(seeds, **options):
    return variation_noise(SHAPE, seeds, make_generators(seeds), **options)


@pytest.mark.parametrize("strength", [0.1, 0.5, 1.0])
def test_subseed_noise_matches_automatic1111(strength):
    got = ours([10, 11], subseeds=[20, 21], subseed_strength=strength)
    assert torch.equal(got, a1111_noise(SHAPE[1:], [10, 11], [20, 21], strength))


@pytest.mark.parametrize("resize", [(64, 32), (128, 96), (96, 64)])
def test_seed_resize_matches_automatic1111(resize):
    got = ours([3, 4], subseeds=[7, 8], subseed_strength=0.3, seed_resize_from=resize)
    assert torch.equal(got, a1111_noise(SHAPE[1:], [3, 4], [7, 8], 0.3, resize[1], resize[0]))


def test_without_variation_the_noise_is_the_plain_seed_noise():
    plain = randn(SHAPE, make_generators([5, 6]))
    assert torch.equal(ours([5, 6]), plain)
    assert torch.equal(ours([5, 6], subseeds=[1, 2], subseed_strength=0.0), plain)
    assert torch.equal(ours([5, 6], seed_resize_from=(96, 64)), plain)  # resizing from the same size


def test_near_parallel_noises_fall_back_to_automatic1111s_linear_blend():
    got = ours([5, 6], subseeds=[5, 6], subseed_strength=0.25)  # same seed: dot = 1
    plain = randn(SHAPE, make_generators([5, 6]))
    assert torch.allclose(got, plain * 0.25 + plain * 0.75)


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


def test_pipeline_uses_and_reports_variation_seeds(sd):
    options = dict(steps=2, width=16, height=16, seed=40, batch_size=2)
    plain = sd.generate("a cat", **options)
    varied = sd.generate("a cat", subseed=90, subseed_strength=0.4, **options)
    assert not torch.equal(plain.latents, varied.latents)
    assert "Variation seed: 90, Variation seed strength: 0.4" in varied.infotexts[0]
    assert "Variation seed: 91, Variation seed strength: 0.4" in varied.infotexts[1]  # +1 per image, like seeds
    noise = a1111_noise((4, 8, 8), [40, 41], [90, 91], 0.4)
    assert torch.equal(varied.latents, sd.generate("a cat", latents=noise, **options).latents)
    resized = sd.generate("a cat", seed_resize_from=(24, 24), **options)
    assert "Seed resize from: 24x24" in resized.infotexts[0]


def test_random_subseed_is_reported(sd):
    result = sd.generate("a cat", steps=1, width=16, height=16, seed=1, subseed_strength=0.2)
    assert "Variation seed: " in result.infotexts[0]


@pytest.mark.parametrize("options, message", [
    (dict(subseed_strength=1.5), "subseed_strength must be between 0"),
    (dict(subseed=-1), "subseed must be a non-negative integer"),
    (dict(seed_resize_from=(0, 64)), r"seed_resize_from must be \(width, height\)"),
    (dict(seed_resize_from=(64,)), r"seed_resize_from must be \(width, height\)"),
])
def test_bad_variation_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(prompt="x", **options)


def test_img2img_draws_the_posterior_sample_before_the_noise_as_the_foundation_does(sd):
    from PIL import Image

    from torchsd.images import pil_to_tensor

    image = Image.effect_noise((16, 16), 40).convert("RGB")
    generators = make_generators([3])
    sd.encode_image(pil_to_tensor(image), generators)  # the posterior sample comes first
    noise = randn((1, 4, 8, 8), generators)
    options = dict(init_image=image, steps=3, strength=0.6, seed=3)
    assert torch.equal(sd.generate("a cat", **options).latents, sd.generate("a cat", latents=noise, **options).latents)
