"""SDXL everywhere: the CLI (generate, --from, convert) and the live server, driven by the real webuiapi client,
switching between an SD 1.5 model and an SDXL single file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

import torchsd
from sdxl_reference import original_sdxl_file, random_sdxl
from serverutil import KEY, Server, one_thread, save_tiny
from torchsd.cli import main
from torchsd.pipeline.infotext import parse_infotext, read_png_infotext


@pytest.fixture(scope="module")
def xl_models(tmp_path_factory):
    """models/sd15/ (a diffusers folder), models/xl.safetensors (Stability's SDXL layout, no metadata),
    models/sub/refiner/ (an SDXL refiner's diffusers folder) and models/ControlNet/xl-adapter/ (an SDXL
    T2I-Adapter, diffusers' save_pretrained)."""
    from safetensors.torch import save_file

    from test_t2i_adapter import diffusers_adapter, random_adapter

    models = tmp_path_factory.mktemp("xl-server") / "models"
    save_tiny(models / "sd15", seed=0)
    with one_thread():
        xl = random_sdxl("sdxl", seed=2)
        save_file(original_sdxl_file(xl), str(models / "xl.safetensors"))
        random_sdxl("sdxl_refiner", seed=6).save(models / "sub" / "refiner")
        diffusers_adapter(random_adapter(xl)).save_pretrained(models / "ControlNet" / "xl-adapter")
    return models


def hint() -> Image.Image:
    image = Image.new("RGB", (32, 32))
    image.paste((255, 255, 255), (16, 16, 30, 30))
    return image


def test_cli_generate_from_and_convert(xl_models, tmp_path):
    out = tmp_path / "xl.png"
    code = main(["generate", "a cat", "-n", "dog", "--model", str(xl_models / "xl.safetensors"), "--steps", "3",
                 "--seed", "5", "--size", "32x32", "--original-size", "48x96", "--dtype", "fp32",
                 "--output", str(out)])
    assert code == 0 and Image.open(out).size == (32, 32)
    info = parse_infotext(read_png_infotext(out))
    assert info["Original size"] == "48x96" and info["Model"] == "xl"
    again = tmp_path / "again.png"  # the infotext round trip: the same image again
    assert main(["generate", "--from", str(out), "--model", str(xl_models / "xl.safetensors"), "--dtype", "fp32",
                 "--output", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert main(["convert", str(xl_models / "xl.safetensors"), str(tmp_path / "xl-folder")]) == 0
    folder = torchsd.load_pipeline(tmp_path / "xl-folder", dtype=torch.float32)
    assert folder.config.family == "sdxl" and folder.text_encoder_2 is not None


def test_cli_t2i_adapter_infotext_and_from(xl_models, tmp_path):
    """An SDXL T2I-Adapter by name in --control-dir, its unit in the infotext, and --from reading it back."""
    hint().save(tmp_path / "hint.png")
    common = ["--model", str(xl_models / "xl.safetensors"), "--dtype", "fp32", "--control-dir",
              str(xl_models / "ControlNet"), "--control", str(tmp_path / "hint.png")]
    assert main(["generate", "a cat", "--steps", "3", "--seed", "5", "--size", "32x32", "--control-model",
                 "xl-adapter", "--control-weight", "0.8", "--control-mode", "control", "--control-end", "0.7",
                 "--output", str(tmp_path / "a.png"), *common]) == 0
    info = read_png_infotext(tmp_path / "a.png")
    assert ('ControlNet 0: "Module: none, Model: xl-adapter, Weight: 0.8, Resize Mode: Crop and Resize, '
            'Guidance Start: 0, Guidance End: 0.7, Control Mode: ControlNet is more important"') in info
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png"), *common]) == 0
    assert read_png_infotext(tmp_path / "b.png") == info
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert main(["generate", "a cat", "--steps", "3", "--seed", "5", "--size", "32x32", "--output",
                 str(tmp_path / "c.png"), *common[:4]]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))


@pytest.fixture(scope="module")
def xl_server(xl_models):
    instance = Server(xl_models, "--model", str(xl_models / "sd15"), "--dtype", "fp32")
    yield instance
    instance.stop()


def test_webuiapi_switches_between_sd15_and_sdxl(xl_server, xl_models):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=xl_server.port, sampler="DDIM", steps=3, username="user",
                            password=KEY)
    titles = [m["title"] for m in api.get_sd_models()]
    assert any(t.startswith("xl") for t in titles) and any(t.startswith("sd15") for t in titles)
    first = api.txt2img(prompt="a cat", seed=3, width=32, height=32, cfg_scale=5)
    assert first.info["sd_model_name"] == "sd15"
    api.util_set_model("xl")
    assert api.util_get_current_model().startswith("xl")
    result = api.txt2img(prompt="a cat", negative_prompt="dog", seed=3, width=32, height=32, cfg_scale=5)
    assert result.image.size == (32, 32) and result.info["sd_model_name"] == "xl"
    local = torchsd.load_pipeline(xl_models / "xl.safetensors", dtype=torch.float32)
    with one_thread():
        expected = local.generate("a cat", "dog", steps=3, sampler="DDIM", seed=3, width=32, height=32,
                                  guidance_scale=5, eta=1.0)
    assert np.abs(np.asarray(result.image, dtype=np.int16) - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    api.util_set_model("sd15")
    back = api.txt2img(prompt="a cat", seed=3, width=32, height=32, cfg_scale=5)
    assert np.array_equal(np.asarray(back.image), np.asarray(first.image))


def test_webuiapi_txt2img_with_a_refiner(xl_server, xl_models):
    """A1111's refiner_checkpoint (a title from /sd-models, never a path) and refiner_switch_at through the
    webuiapi client's session (its txt2img has no refiner arguments: custom_post sends the body as it is),
    against the same run from Python."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=xl_server.port, username="user", password=KEY)
    title = next(m["title"] for m in api.get_sd_models() if m["model_name"] == "sub_refiner")
    body = {"prompt": "a cat", "negative_prompt": "dog", "seed": 3, "width": 32, "height": 32, "steps": 4,
            "cfg_scale": 5, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "xl"},
            "refiner_checkpoint": title, "refiner_switch_at": 0.5}
    result = api.custom_post("txt2img", baseurl=True, payload=body)
    assert result.image.size == (32, 32) and result.info["sd_model_name"] == "xl"
    assert "Refiner: refiner" in result.info["infotexts"][0] and "Refiner switch at: 0.5" in result.info["infotexts"][0]
    local = torchsd.load_pipeline(xl_models / "xl.safetensors", dtype=torch.float32)
    with one_thread():
        expected = local.generate("a cat", "dog", steps=4, sampler="Euler", seed=3, width=32, height=32,
                                  guidance_scale=5, refiner_checkpoint=str(xl_models / "sub" / "refiner"),
                                  refiner_switch_at=0.5)
        plain = local.generate("a cat", "dog", steps=4, sampler="Euler", seed=3, width=32, height=32, guidance_scale=5)
    ours = np.asarray(result.image, dtype=np.int16)
    assert np.abs(ours - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    assert np.abs(ours - np.asarray(plain.images[0], dtype=np.int16)).max() > 1  # the refiner did take over
    # the refiner loaded through the runtime: the first model's dtype and CPU speed-ups (accel's blocks)
    refiner = local.refiners[str(xl_models / "sub" / "refiner")]
    assert refiner.dtype == torch.float32 and refiner.config.family == "sdxl_refiner"
    assert any(type(m).__module__.startswith("torchsd.accel") for m in refiner.unet.modules())

    for name, status, words in [("/etc/passwd", 422, "absolute"), ("../models/xl.safetensors", 422, "'..'"),
                                ("no-such-refiner", 404, "not found")]:
        response = api.session.post(f"http://127.0.0.1:{xl_server.port}/sdapi/v1/txt2img",
                                    json={**body, "refiner_checkpoint": name})
        assert response.status_code == status and words in response.text, (name, response.text)
    response = api.session.post(f"http://127.0.0.1:{xl_server.port}/sdapi/v1/txt2img",
                                json={**body, "refiner_switch_at": 1.5})
    assert response.status_code == 422 and "refiner_switch_at must be between 0 and 1" in response.text
    # A1111's page sends "None" for no refiner
    none = api.custom_post("txt2img", baseurl=True, payload={**body, "refiner_checkpoint": "None"})
    assert np.abs(np.asarray(none.image, dtype=np.int16) - np.asarray(plain.images[0], dtype=np.int16)).max() <= 1


def test_webuiapi_t2i_adapter_unit(xl_server, xl_models):
    """An SDXL T2I-Adapter as a ControlNet unit of the real webuiapi client gives the image of the same request
    made from Python."""
    from torchsd.pipeline.features.control import ControlUnit, control_models

    api = webuiapi.WebUIApi(host="127.0.0.1", port=xl_server.port, sampler="DDIM", steps=3, username="user",
                            password=KEY)
    assert "xl-adapter" in api.controlnet_model_list()
    api.util_set_model("xl")
    try:
        unit = webuiapi.ControlNetUnit(image=hint(), model="xl-adapter", weight=0.8, guidance_end=0.7,
                                       resize_mode="Just Resize")
        result = api.txt2img(prompt="a cat", seed=4, width=32, height=32, cfg_scale=5, controlnet_units=[unit],
                             alwayson_scripts={})
    finally:
        api.util_set_model("sd15")
    local = torchsd.load_pipeline(xl_models / "xl.safetensors", dtype=torch.float32)
    control_models(local).add_dir(xl_models / "ControlNet")
    with one_thread():
        run = dict(steps=3, sampler="DDIM", seed=4, width=32, height=32, guidance_scale=5.0, eta=1.0)
        expected = local.generate("a cat", **run, control=[ControlUnit(
            image=hint(), model="xl-adapter", weight=0.8, guidance_end=0.7, resize_mode="Just Resize")])
        plain = local.generate("a cat", **run)
    ours = np.asarray(result.image, dtype=np.int16)
    assert np.abs(ours - np.asarray(expected.images[0], dtype=np.int16)).max() <= 1
    assert np.abs(ours - np.asarray(plain.images[0], dtype=np.int16)).max() > 1  # the adapter acted
    assert result.info["infotexts"][0] == expected.infotexts[0]
    assert 'ControlNet 0: "Module: none, Model: xl-adapter, Weight: 0.8' in expected.infotexts[0]
