"""ControlNet through the AUTOMATIC1111 API: the real webuiapi client's ControlNetUnit against a live server
gives the image of the same request made from Python; the extension's /controlnet routes answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image
from safetensors.torch import save_file

from reference import diffusers_unet, random_pipeline
from serverutil import KEY, Server, build_models_dir, one_thread
from test_controlnet import random_controlnet
from test_ip_adapter import original_state, random_ip_adapter, tiny_encoder_folder
from torchsd import GenerationRequest, load_pipeline
from torchsd.checkpoints.diffusers import to_diffusers_keys
from torchsd.pipeline.features.control import ControlUnit, control_models


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    models = build_models_dir(tmp_path_factory.mktemp("control-server"))
    (models / "ControlNet").mkdir()
    with one_thread():
        net = random_controlnet(random_pipeline(seed=0), seed=5, hint_widths=(16, 32))  # tiny-a's U-Net
    save_file({k: v.contiguous() for k, v in to_diffusers_keys(net.state_dict(), "unet").items()},
              str(models / "ControlNet" / "tiny-cn.safetensors"))
    with one_thread():  # an IP-Adapter for tiny-a, and its image encoder, where the extension keeps them
        sd = random_pipeline(seed=0)
        torch.save(original_state(random_ip_adapter(sd, plus=False), sd, diffusers_unet(sd)),
                   models / "ControlNet" / "ip-adapter_tiny.bin")
        tiny_encoder_folder(models / "ControlNet" / "image_encoder")
    return models


@pytest.fixture(scope="module")
def server(models_dir):
    instance = Server(models_dir, "--model", str(models_dir / "tiny-a"), "--dtype", "fp32")
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=3, username="user",
                             password=KEY)


def hint() -> Image.Image:
    image = Image.new("RGB", (80, 64), (0, 0, 0))
    image.paste((255, 255, 255), (20, 16, 60, 48))
    return image


def test_controlnet_unit_gives_the_python_image(api, models_dir):
    unit = webuiapi.ControlNetUnit(image=hint(), module="canny", model="tiny-cn", weight=0.8, threshold_a=50,
                                   threshold_b=150, guidance_start=0.1, guidance_end=0.9, control_mode=1,
                                   resize_mode="Just Resize")
    # a fresh alwayson_scripts: webuiapi writes the units into its mutable default dict otherwise, and every
    # later txt2img in this process (other test files' clients too) would send them again
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=21, controlnet_units=[unit], alwayson_scripts={})
    local = load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)
    control_models(local).add_dir(models_dir / "ControlNet")
    with one_thread():
        expected = local.run(GenerationRequest(
            "a cat", width=64, height=64, steps=3, sampler="ddim", eta=1.0, guidance_scale=7.0, seed=21,
            control=(ControlUnit(image=hint(), model="tiny-cn", weight=0.8, guidance_start=0.1, guidance_end=0.9,
                                 control_mode="My prompt is more important", resize_mode="Just Resize",
                                 module="canny", threshold_a=50, threshold_b=150),)))
        plain = local.run(GenerationRequest("a cat", width=64, height=64, steps=3, sampler="ddim", eta=1.0,
                                            guidance_scale=7.0, seed=21))
    ours, theirs = (np.asarray(im, dtype=np.int16) for im in (result.images[0], expected.images[0]))
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - np.asarray(plain.images[0], dtype=np.int16)).max() > 1  # control changed the image
    assert result.images[0].info["parameters"] == expected.infotexts[0]
    assert 'ControlNet 0: "Module: canny, Model: tiny-cn, Weight: 0.8' in expected.infotexts[0]


def test_extension_routes(api):
    assert api.controlnet_model_list() == ["ip-adapter_tiny", "tiny-cn"]
    assert {"none", "canny", "scribble"} <= set(api.controlnet_module_list())
    detected = api.controlnet_detect([hint()], module="canny", threshold_a=100, threshold_b=200)
    assert detected.info == "Success" and len(detected.images) == 1
    from torchsd.pipeline.features.control_detect import detect

    expected = np.asarray(detect(hint(), "canny", 100, 200))
    assert np.array_equal(np.asarray(detected.images[0].convert("RGB")), expected) and expected.any()


def test_bad_units_are_refused(server):
    import httpx

    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2,
            "alwayson_scripts": {"ControlNet": {"args": [{"image": "", "model": "tiny-cn"}]}}}
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("user", KEY), timeout=60)
    assert response.status_code == 422 and "no image" in response.text
    body["alwayson_scripts"]["ControlNet"]["args"][0]["model"] = "None"
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("user", KEY), timeout=60)
    assert response.status_code == 422 and "model_list" in response.text


def test_ip_adapter_unit_gives_the_python_image(api, models_dir):
    unit = webuiapi.ControlNetUnit(image=hint(), module="ip-adapter_clip_sd15", model="ip-adapter_tiny [0123abcd]",
                                   weight=0.7)
    result = api.txt2img(prompt="a cat", width=64, height=64, seed=22, controlnet_units=[unit], alwayson_scripts={})
    local = load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)
    with one_thread():
        expected = local.run(GenerationRequest(
            "a cat", width=64, height=64, steps=3, sampler="ddim", eta=1.0, guidance_scale=7.0, seed=22,
            ip_adapter_image=hint(), ip_adapter_model=models_dir / "ControlNet" / "ip-adapter_tiny.bin",
            ip_adapter_scale=0.7))
    ours, theirs = (np.asarray(im, dtype=np.int16) for im in (result.images[0], expected.images[0]))
    assert np.abs(ours - theirs).max() <= 1
    assert result.images[0].info["parameters"] == expected.infotexts[0]


def test_the_bundled_controlnet_is_listed_with_the_bundled_model(models_dir):
    """``bundled`` is in /controlnet/model_list while the bundled model is the current one (its ControlNet fits no
    other U-Net), and a unit naming it gives the Python image."""
    from test_bundled_control import mask

    instance = Server(models_dir, "--dtype", "fp32")  # no --model: the bundled model
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=instance.port, sampler="DDIM", steps=3, username="user",
                                password=KEY)
        assert api.controlnet_model_list() == ["bundled", "ip-adapter_tiny", "tiny-cn"]
        unit = webuiapi.ControlNetUnit(image=mask(), model="bundled", resize_mode="Just Resize")
        prompt = "a red square at the top left on a blue background"
        result = api.txt2img(prompt=prompt, width=64, height=64, seed=3, cfg_scale=7.0, controlnet_units=[unit],
                             alwayson_scripts={})
        api.util_set_model("tiny-a")
        assert api.controlnet_model_list() == ["ip-adapter_tiny", "tiny-cn"]
    finally:
        instance.stop()
    local = load_pipeline(None, "cpu", torch.float32)
    with one_thread():
        expected = local.run(GenerationRequest(
            prompt, width=64, height=64, steps=3, sampler="ddim", eta=1.0, guidance_scale=7.0, seed=3,
            control=(ControlUnit(image=mask(), model="bundled", resize_mode="Just Resize"),)))
    ours, theirs = (np.asarray(im, dtype=np.int16) for im in (result.images[0], expected.images[0]))
    assert np.abs(ours - theirs).max() <= 1
    assert 'ControlNet 0: "Module: none, Model: bundled, Weight: 1' in result.info["infotexts"][0]
