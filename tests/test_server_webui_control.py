"""The web page's ControlNet unit in real headless Chromium: a control image, the model and preprocessor
pickers filled from /controlnet/model_list and /controlnet/module_list, a weight; the unit goes out as the
A1111 extension's ``alwayson_scripts.controlnet.args`` and gives the image of the same request made from Python.

Skipped, with the reason, where Playwright or Debian's chromium is missing (``make setup`` installs both).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reference import random_pipeline
from serverutil import KEY, Server, build_models_dir, one_thread
from test_controlnet import random_controlnet
from test_server_webui import CHROMIUM, CHROMIUM_ARGS, screenshot, sync_api
from torchsd import GenerationRequest, load_pipeline
from torchsd.checkpoints.diffusers import to_diffusers_keys
from torchsd.pipeline.features.control import ControlUnit, control_models


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    models = build_models_dir(tmp_path_factory.mktemp("webui-control"))
    (models / "ControlNet").mkdir()
    with one_thread():
        net = random_controlnet(random_pipeline(seed=0), seed=5, hint_widths=(16, 32))  # for tiny-a's U-Net
    save_file({k: v.contiguous() for k, v in to_diffusers_keys(net.state_dict(), "unet").items()},
              str(models / "ControlNet" / "tiny-cn.safetensors"))
    return models


@pytest.fixture(scope="module")
def server(models_dir):
    instance = Server(models_dir, "--model", str(models_dir / "tiny-a"), "--dtype", "fp32")
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(http_credentials={"username": "user", "password": KEY},
                                      viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server.url)
        yield page
        assert errors == [], f"JavaScript errors on the page: {errors}"
        browser.close()


def hint() -> Image.Image:
    image = Image.new("RGB", (80, 64), (0, 0, 0))
    image.paste((255, 255, 255), (44, 30, 76, 60))
    return image


def test_a_control_unit_from_the_page(page, models_dir, tmp_path):
    page.wait_for_function("document.querySelector('#control-model').options.length > 0")
    assert page.locator("#control-model option").all_inner_texts() == ["tiny-cn"]
    assert {"none", "canny"} <= set(page.locator("#control-module option").all_inner_texts())
    assert page.locator("#control-box").is_hidden() and page.locator("#no-control").is_hidden()
    page.check("#control")
    hint().save(tmp_path / "hint.png")
    page.set_input_files("#control-file", str(tmp_path / "hint.png"))
    page.wait_for_selector("#control-image:not([hidden])")
    page.select_option("#control-model", "tiny-cn")
    page.select_option("#control-module", "canny")
    page.fill("#control-weight", "0.8")
    page.click("#control-preview")  # the preprocessor's map, from /controlnet/detect
    page.wait_for_selector("#control-map:not([hidden])")
    edges = page.locator("#control-map").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert edges == [80, 64]

    page.select_option("#sampler", "Euler")
    page.fill("#prompt", "a red circle at the top left")
    page.fill("#steps", "3")
    page.fill("#seed", "21")
    count = page.locator("#gallery figure").count()
    with page.expect_request("**/sdapi/v1/txt2img") as request_info:
        page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('#gallery figure').length > {count}", timeout=300_000)
    assert page.locator("#error").inner_text() == ""
    body = json.loads(request_info.value.post_data)
    unit = body["alwayson_scripts"]["controlnet"]["args"][0]
    assert {k: unit[k] for k in ("enabled", "module", "model", "weight", "guidance_start", "guidance_end",
                                 "control_mode")} == {"enabled": True, "module": "canny", "model": "tiny-cn",
                                                      "weight": 0.8, "guidance_start": 0, "guidance_end": 1,
                                                      "control_mode": 0}
    caption = page.locator("#gallery figcaption").first.inner_text()
    assert 'ControlNet 0: "Module: canny, Model: tiny-cn, Weight: 0.8' in caption, caption
    screenshot(page, tmp_path, "webui-controlnet.png")

    # the same request from Python gives the same picture, and without the unit another one
    local = load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)
    control_models(local).add_dir(models_dir / "ControlNet")
    request = dict(width=64, height=64, steps=3, sampler="euler", guidance_scale=7.0, seed=21)
    with one_thread():
        expected = local.run(GenerationRequest("a red circle at the top left", **request, control=(
            ControlUnit(image=hint(), model="tiny-cn", weight=0.8, module="canny"),)))
        plain = local.run(GenerationRequest("a red circle at the top left", **request))
    src = page.locator("#gallery img").first.get_attribute("src")
    import base64
    import io

    shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
    ours = np.asarray(shown, dtype=np.int16)
    assert np.abs(ours - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    assert np.abs(ours - np.asarray(plain.images[0], dtype=np.int16)).max() > 1

    # unticked: no unit is sent
    page.uncheck("#control")
    with page.expect_request("**/sdapi/v1/txt2img") as request_info:
        page.click("#generate")
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=300_000)
    assert "alwayson_scripts" not in json.loads(request_info.value.post_data)


def test_ticked_without_an_image_says_so(page):
    page.check("#control")
    page.evaluate("() => { document.querySelector('#control-file').value = ''; }")
    page.reload()  # a fresh page: no control image chosen yet
    page.wait_for_function("document.querySelector('#control-model').options.length > 0")
    page.check("#control")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0")
    assert "choose a control image" in page.locator("#error").inner_text()
