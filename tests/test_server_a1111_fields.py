"""Every AUTOMATIC1111 field the pipeline honours, sent by the real ``webuiapi`` client to the real server,
gives the image of the same request made from Python (the fields are mapped by the feature modules)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from serverutil import KEY, one_thread
from torchsd import GenerationRequest, load_pipeline


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=3, username="user",
                             password=KEY)


@pytest.fixture(scope="module")
def local(models_dir):
    """The server's model as the server loads it (float32, as the ``server`` fixture asks)."""
    return load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same_as_python(result, local, **request) -> None:
    """The response's images and infotexts equal ``local.run`` of the request (webuiapi sends eta=1)."""
    with one_thread():
        expected = local.run(GenerationRequest(**{"width": 64, "height": 64, "steps": 3, "sampler": "ddim",
                                                  "eta": 1.0, "guidance_scale": 7.0, **request}))
    assert [im.size for im in result.images] == [im.size for im in expected.images]
    for ours, theirs in zip(result.images, expected.images):
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert [im.info["parameters"] for im in result.images] == expected.infotexts


def test_hires_fix_by_scale(api, local):
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=11, enable_hr=True, hr_scale=1.5,
                         hr_upscaler=webuiapi.HiResUpscaler.LatentNearest, hr_second_pass_steps=2,
                         denoising_strength=0.6)
    assert result.images[0].size == (96, 96)
    same_as_python(result, local, prompt="a cat", seed=11, hires=True, hires_scale=1.5,
                   hires_upscaler="Latent (nearest)", hires_steps=2, hires_strength=0.6)
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (nearest)" in result.info["infotexts"][0]


def test_hires_fix_to_a_size(api, local):
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=12, enable_hr=True, hr_resize_x=80,
                         hr_resize_y=96, denoising_strength=0.5)
    assert result.images[0].size == (80, 96)
    same_as_python(result, local, prompt="a cat", seed=12, hires=True, hires_size=(80, 96), hires_strength=0.5)


def test_hires_fix_one_side_keeps_the_aspect_ratio(api):
    result = api.txt2img(prompt="a cat", width=64, height=32, seed=12, enable_hr=True, hr_resize_x=128)
    assert result.images[0].size == (128, 64)


def test_variation_seeds_and_seed_resize(api, local):
    result = api.txt2img(prompt="a dog", width=64, height=64, seed=21, subseed=99, subseed_strength=0.3,
                         seed_resize_from_w=48, seed_resize_from_h=80, batch_size=2)
    assert result.info["all_subseeds"] == [99, 100] and result.info["subseed_strength"] == 0.3
    assert (result.info["seed_resize_from_w"], result.info["seed_resize_from_h"]) == (48, 80)
    same_as_python(result, local, prompt="a dog", seed=21, batch_size=2, subseed=99, subseed_strength=0.3,
                   seed_resize_from=(48, 80))
    plain = api.txt2img(prompt="a dog", width=64, height=64, seed=21, batch_size=2)
    assert np.abs(pixels(plain.images[0]) - pixels(result.images[0])).max() > 10


def test_inpainting_mask_invert_blur_and_fill(api, local):
    init = Image.fromarray((np.indices((64, 64)).sum(0) * 2 % 256).astype(np.uint8)).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], mask_image=mask, prompt="a sun", width=64, height=64, seed=31,
                         mask_blur=2, inpainting_fill=2, inpainting_mask_invert=1, denoising_strength=0.8)
    same_as_python(result, local, prompt="a sun", seed=31, init_image=init, mask=mask, mask_blur=2,
                   inpainting_fill="latent noise", mask_invert=True, strength=0.8)
    # inverted: the square in the middle is kept as it was, the border is repainted
    middle = pixels(result.images[0])[24:40, 24:40] - pixels(init)[24:40, 24:40]
    assert np.abs(middle).max() <= 2
    border = pixels(result.images[0])[:8] - pixels(init)[:8]
    assert np.abs(border).max() > 10


def test_openai_client_sets_feature_options_by_name(server, local):
    """The OpenAI API takes torchsd's extras by their Python names through ``extra_body``: the same request."""
    import base64
    import io

    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    extras = {"steps": 3, "seed": 41, "sampler": "DDIM", "hires": True, "hires_scale": 1.5, "hires_steps": 2,
              "subseed": 5, "subseed_strength": 0.25}
    result = client.images.generate(prompt="a boat", size="64x64", extra_body=extras)
    assert result.size == "96x96"
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    with one_thread():
        expected = local.run(GenerationRequest("a boat", width=64, height=64, steps=3, sampler="ddim", seed=41,
                                               guidance_scale=7.0, hires=True, hires_scale=1.5, hires_steps=2,
                                               subseed=5, subseed_strength=0.25))
    assert np.abs(pixels(image) - pixels(expected.images[0])).max() <= 1
    assert image.info["parameters"] == expected.infotexts[0]
    with pytest.raises(openai.UnprocessableEntityError, match="subseed_strength must be between 0"):
        client.images.generate(prompt="x", size="64x64", extra_body={"subseed_strength": 2})
