"""The web page with SD 3 and FLUX.1 models in headless Chromium: picking FLUX.1-dev shows its Distilled CFG and
the flow Shift (FLUX.1-schnell: the Shift only; SD 3: the Shift and skip-layer guidance; SD 1: none), sends them
as the A1111 fields distilled_cfg_scale / flow_shift / skip_guidance_layers only while shown, and gives the image
of the same request made from Python;
the samplers, tiling, refiner and ControlNet that flow models refuse are disabled while one is loaded.
See test_server_webui.py for how Chromium is found (skipped, with the reason, without it)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import test_server_webui
import torchsd
from serverutil import Server, build_flow_models_dir, one_thread
from test_server_webui import screenshot

page = test_server_webui.page  # the fixture (Chromium with the key; no JavaScript errors), on this module's server

# what flow models run (flow_run.py's docstring: no sampler that adds fresh noise; DDIM runs as Euler)
FLOW_SAMPLERS = ["DDIM", "Euler", "Heun", "DPM++ 2M", "UniPC"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_flow_models_dir(tmp_path_factory.mktemp("webui-flow"), schnell=True, fill=True)


@pytest.fixture(scope="module")
def server(models):
    instance = Server(models, "--model", str(models / "tiny-sd"), "--dtype", "fp32")
    yield instance
    instance.stop()


def pick_model(page, title: str) -> None:
    page.select_option("#model", title)
    page.wait_for_function(f"document.querySelector('#model').value === {title!r} && "
                           "!document.querySelector('#generate').disabled", timeout=300_000)
    assert page.locator("#model-status").inner_text() == ""


def shown(page) -> dict:
    fields = {"distilled": "#distilled-cfg", "shift": "#shift", "slg": "#slg-layers", "slg_scale": "#slg-scale"}
    return {name: page.locator(selector).is_visible() for name, selector in fields.items()}


def generate(page) -> tuple[dict, Image.Image, str]:
    """Click Generate: the request body the page sent, and the image and infotext it shows."""
    count = page.locator("#gallery figure").count()
    with page.expect_request(lambda r: "/sdapi/v1/txt2img" in r.url) as request:
        page.click("#generate")
    # the button comes back when the request ends, with an image or with the server's error shown
    page.wait_for_function("!document.querySelector('#generate').disabled", timeout=300_000)
    assert page.locator("#error").inner_text() == ""
    assert page.locator("#gallery figure").count() == count + 1
    src = page.locator("#gallery img").first.get_attribute("src")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return request.value.post_data_json, image, page.locator("#gallery figcaption").first.inner_text()


def in_python(models, name: str, prompt: str, **options):
    with one_thread():
        pipe = torchsd.load_pipeline(models / name, "cpu", torch.float32)
        return pipe.generate(prompt, **options)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_flux_dev_shows_distilled_cfg_and_shift_and_generates_as_python(page, models, tmp_path):
    page.wait_for_function("document.querySelector('#sampler').options.length > 0")
    assert page.locator("#model").input_value() == "tiny-sd"
    assert shown(page) == {"distilled": False, "shift": False, "slg": False, "slg_scale": False}
    page.select_option("#sampler", "Euler a")  # a sampler flow models refuse: the page moves off it

    pick_model(page, "flux-dev")
    assert shown(page) == {"distilled": True, "shift": True, "slg": False, "slg_scale": False}
    assert page.locator("#distilled-cfg").input_value() == "3.5" and page.locator("#shift").input_value() == ""
    enabled = page.locator("#sampler option:not([disabled])").all_inner_texts()
    assert enabled == FLOW_SAMPLERS and page.locator("#sampler").input_value() == "Euler"
    assert page.locator("#tiling").is_disabled() and page.locator("#refiner").is_disabled()
    assert page.locator("#control").is_disabled()
    note = page.locator("#model-note").inner_text()
    assert note.startswith("FLUX.1 models: samplers ") and "no tiling, refiner or ControlNet" in note, note

    page.fill("#prompt", "an astronaut")
    for field, value in (("#width", "32"), ("#height", "32"), ("#steps", "2"), ("#seed", "21"),
                         ("#distilled-cfg", "2")):
        page.fill(field, value)
    body, image, caption = generate(page)
    assert body["distilled_cfg_scale"] == 2 and "flow_shift" not in body  # an empty shift: the model's own
    assert body["sampler_name"] == "Euler" and body["tiling"] is False
    expected = in_python(models, "flux-dev", "an astronaut", width=32, height=32, steps=2, seed=21,
                         guidance_scale=7.0, distilled_cfg_scale=2.0)
    assert image.size == (32, 32)
    assert np.abs(pixels(image) - pixels(expected.images[0])).max() <= 1
    assert caption == expected.infotexts[0] and "Distilled CFG Scale: 2," in caption
    screenshot(page, tmp_path, "webui-flux-dev.png")


def test_the_page_disables_exactly_the_samplers_a_flow_model_refuses(page, server):
    """Behaviour, not the list: each sampler the page leaves enabled runs on FLUX.1-dev, each disabled one is
    refused by the server (422)."""
    options = page.locator("#sampler option").evaluate_all("os => os.map(o => [o.value, o.disabled])")
    assert len(options) > len(FLOW_SAMPLERS)
    with server.client() as client:
        for name, disabled in options:
            response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 32, "height": 32, "steps": 1,
                                                              "sampler_name": name})
            assert response.status_code == (422 if disabled else 200), (name, response.text)


def test_schnell_and_sd3_show_the_shift_only_and_send_it(page, models):
    pick_model(page, "flux-schnell")  # no guidance embedding: no distilled CFG
    assert shown(page) == {"distilled": False, "shift": True, "slg": False, "slg_scale": False}
    pick_model(page, "sd35")
    assert shown(page) == {"distilled": False, "shift": True, "slg": True, "slg_scale": True}
    assert page.locator("#sampler option:not([disabled])").all_inner_texts() == FLOW_SAMPLERS
    assert page.locator("#model-note").inner_text().startswith("SD 3 models: samplers ")
    for field, value in (("#width", "32"), ("#height", "32"), ("#steps", "3"), ("#seed", "7"), ("#cfg", "4")):
        page.fill(field, value)
    page.fill("#prompt", "a house")
    assert page.locator("#shift").evaluate("e => { e.value = '1.15'; return e.checkValidity(); }")  # any shift
    page.fill("#shift", "2")
    body, image, caption = generate(page)
    assert body["flow_shift"] == 2 and "distilled_cfg_scale" not in body and "skip_guidance_layers" not in body
    expected = in_python(models, "sd35", "a house", width=32, height=32, steps=3, seed=7, guidance_scale=4.0,
                         flow_shift=2.0)
    assert np.abs(pixels(image) - pixels(expected.images[0])).max() <= 1
    assert caption == expected.infotexts[0] and "Shift: 2" in caption


def test_sd3_skip_layer_guidance_is_sent_and_gives_the_python_image(page, models, tmp_path):
    """Typed layers "1" (and a scale) become skip_guidance_layers [1]; at 20 steps the default window (1% to 20%
    of the steps) covers steps 1-3, so the image differs from the one without it and equals Python's with it."""
    page.fill("#shift", "")
    page.fill("#steps", "20")
    page.fill("#slg-layers", "1")
    page.fill("#slg-scale", "10")
    body, image, caption = generate(page)
    assert body["skip_guidance_layers"] == [1] and body["skip_layer_guidance_scale"] == 10
    run = dict(width=32, height=32, steps=20, seed=7, guidance_scale=4.0)
    expected = in_python(models, "sd35", "a house", skip_guidance_layers=[1], skip_layer_guidance_scale=10.0, **run)
    plain = in_python(models, "sd35", "a house", **run)
    assert np.abs(pixels(image) - pixels(expected.images[0])).max() <= 1
    assert np.abs(pixels(image) - pixels(plain.images[0])).max() >= 6  # it changed the picture (11 when written)
    assert caption == expected.infotexts[0] and "SLG layers: 1, SLG scale: 10" in caption
    screenshot(page, tmp_path, "webui-sd35-slg.png")
    page.fill("#slg-layers", "7;8")
    page.click("#generate")
    assert "SLG layers: block numbers" in page.locator("#error").inner_text()
    page.fill("#slg-layers", "")


def test_back_to_sd1_hides_them_and_sends_neither(page):
    page.fill("#shift", "2")  # typed for SD 3: kept, but not sent to an SD 1 model
    pick_model(page, "tiny-sd")
    assert shown(page) == {"distilled": False, "shift": False, "slg": False, "slg_scale": False}
    assert page.locator("#model-note").is_hidden()
    assert page.locator("#sampler option[disabled]").count() == 0
    assert page.locator("#tiling").is_enabled() and page.locator("#refiner").is_enabled()
    page.select_option("#sampler", "Euler a")
    page.fill("#steps", "1")
    body, image, caption = generate(page)
    assert "flow_shift" not in body and "distilled_cfg_scale" not in body and "skip_guidance_layers" not in body
    assert image.size == (64, 64) and "Sampler: Euler a" in caption and "Shift" not in caption


def test_each_guidance_distilled_model_brings_its_own_default(page):
    """/info's distilled_cfg fills the field on a switch: FLUX.1 Fill's 30, FLUX.1-dev's 3.5."""
    pick_model(page, "flux-fill")
    assert shown(page)["distilled"] and page.locator("#distilled-cfg").input_value() == "30"
    pick_model(page, "flux-dev")
    assert page.locator("#distilled-cfg").input_value() == "3.5"

