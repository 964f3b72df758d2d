"""The real server serving SD 3 and FLUX.1 models beside an SD 1 model, driven by the real clients (webuiapi,
openai): the model list tells the families, sd_model_checkpoint switches between them, txt2img/img2img and
the OpenAI images endpoint give the in-process pipeline's images, and a sampler flow models do not run is
refused with the ones that do; inpainting, hires fix and LoRA tags reach flow models as the A1111 fields say;
Forge's distilled_cfg_scale, which its clients send with every request, is ignored where a model has no
embedded guidance."""

import base64
import io
import json

import numpy as np
import openai
import pytest
import torch
import webuiapi
from PIL import Image

import torchsd
from serverutil import KEY, Server, build_flow_models_dir, one_thread


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_flow_models_dir(tmp_path_factory.mktemp("flow_server"), fill=True)


@pytest.fixture(scope="module")
def server(models):
    instance = Server(models, "--model", str(models / "tiny-sd"), "--dtype", "fp32")
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2, username="user",
                             password=KEY)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def local(models, name):
    return torchsd.load_pipeline(models / name, "cpu", torch.float32)


def test_the_model_list_tells_the_families(server):
    with server.client() as client:
        listed = {m["title"]: m["family"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert listed == {"flux-dev": "flux", "flux-fill": "flux", "sd35": "sd3", "tiny-sd": "sd1"}


def test_switch_to_flux_and_txt2img_equals_the_pipeline(api, models):
    api.util_set_model("flux-dev")
    assert api.get_options()["sd_model_checkpoint"] == "flux-dev"
    result = api.txt2img(prompt="an astronaut", width=32, height=32, seed=21, cfg_scale=7.0)
    text = result.images[0].info["parameters"]
    assert result.images[0].size == (32, 32) and "Distilled CFG Scale: 3.5" in text and "CFG scale: 1.0" in text
    with one_thread():
        expected = local(models, "flux-dev").generate("an astronaut", width=32, height=32, steps=2, seed=21,
                                                      guidance_scale=7.0)
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    assert text == expected.infotexts[0]


def test_sd3_img2img_through_webuiapi(api, models):
    api.util_set_model("sd35")
    init = Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")
    result = api.img2img(images=[init], prompt="a house", width=32, height=32, denoising_strength=0.5, seed=7,
                         steps=4, cfg_scale=4.0)
    with one_thread():
        expected = local(models, "sd35").generate("a house", width=32, height=32, steps=4, seed=7, guidance_scale=4.0,
                                                  init_image=init, strength=0.5)
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    assert "Denoising strength: 0.5" in result.images[0].info["parameters"]


def test_openai_images_from_a_flow_model(server, models):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    result = client.images.generate(prompt="a red chair", model="flux-dev", size="32x32", response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 4, "distilled_cfg_scale": 2.0})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (32, 32) and "Distilled CFG Scale: 2" in image.text["parameters"]


def test_flow_model_refuses_a_noise_adding_sampler_with_the_ones_that_work(server):
    with server.client() as client:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "flux-dev"})
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 32, "height": 32, "steps": 2,
                                                          "sampler_name": "Euler a"})
        assert response.status_code == 422
        assert "Euler, Heun, DPM++ 2M, UniPC" in response.json()["detail"]
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd"})  # and back to SD 1
        back = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                                      "sampler_name": "Euler a"})
        assert back.status_code == 200


def box_mask():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 4, 24, 20))
    return mask


def test_flux_inpainting_through_webuiapi(api, models):
    """img2img with a mask, inverted, unblurred, masked content "fill" (A1111's 0, webuiapi's default): the
    in-process inpainting run."""
    api.util_set_model("flux-dev")
    init = Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")
    result = api.img2img(images=[init], mask_image=box_mask(), inpainting_mask_invert=1, mask_blur=0, inpainting_fill=0,
                         prompt="a house", width=32, height=32, denoising_strength=0.8, seed=7, steps=3)
    with one_thread():
        expected = local(models, "flux-dev").generate("a house", width=32, height=32, steps=3, seed=7,
                                                      init_image=init, mask=box_mask(), mask_invert=True, mask_blur=0,
                                                      inpainting_fill="fill", strength=0.8)
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    inside = np.asarray(box_mask()) > 0  # inverted: the box is kept
    assert np.array_equal(pixels(result.images[0])[inside], pixels(init)[inside])
    assert "Mask blur: 0" in result.images[0].info["parameters"]


def test_flux_fill_inpainting_through_webuiapi(api, models):
    """A FLUX.1 Fill model: img2img with a mask at denoising strength 1 gives the Python run's image, at Fill's
    default distilled CFG of 30; txt2img is refused with a 4xx that says what Fill needs."""
    api.util_set_model("flux-fill")
    init = Image.fromarray((np.indices((32, 32)).sum(0) * 4 % 256).astype(np.uint8)).convert("RGB")
    result = api.img2img(images=[init], mask_image=box_mask(), mask_blur=0, inpainting_fill=1, prompt="a house",
                         width=32, height=32, denoising_strength=1.0, seed=7, steps=3)
    with one_thread():
        expected = local(models, "flux-fill").generate("a house", width=32, height=32, steps=3, seed=7,
                                                       init_image=init, mask=box_mask(), mask_blur=0, strength=1.0)
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    assert "Distilled CFG Scale: 30" in result.images[0].info["parameters"]
    with pytest.raises(RuntimeError, match="give init_image and mask") as refused:
        api.txt2img(prompt="a house", width=32, height=32, seed=7)
    assert 400 <= refused.value.args[0] < 500


def test_sd3_hires_fix_through_webuiapi(api, models):
    api.util_set_model("sd35")
    result = api.txt2img(prompt="a tower", width=32, height=32, seed=3, steps=3, cfg_scale=4.0, enable_hr=True,
                         hr_scale=2, hr_upscaler="Latent", denoising_strength=0.6)
    with one_thread():
        expected = local(models, "sd35").generate("a tower", width=32, height=32, steps=3, seed=3, guidance_scale=4.0,
                                                  hires=True, hires_scale=2, hires_strength=0.6)
    assert result.images[0].size == (64, 64)
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    assert "Hires upscale: 2" in result.images[0].info["parameters"]


def test_lora_tag_on_flux_through_webuiapi(api, models):
    api.util_set_model("flux-dev")
    prompt = "an astronaut <lora:flux_style:0.8>"
    result = api.txt2img(prompt=prompt, width=32, height=32, seed=5, steps=2)
    with one_thread():
        pipe = local(models, "flux-dev")
        plain = pipe.generate("an astronaut ", width=32, height=32, steps=2, seed=5)
        pipe.loras.add_dir(models / "Lora")
        expected = pipe.generate(prompt, width=32, height=32, steps=2, seed=5)
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 10
    assert "Lora hashes: \"flux_style: " in result.images[0].info["parameters"]


def test_distilled_cfg_scale_is_ignored_where_the_model_has_no_embedded_guidance(server):
    """Forge's clients send distilled_cfg_scale with every request (webuiapi does not; a raw request here)."""
    body = {"prompt": "x", "steps": 1, "seed": 2, "sampler_name": "Euler", "distilled_cfg_scale": 2.0}
    with server.client() as client:
        infotexts = {}
        for model, size in (("tiny-sd", 64), ("sd35", 32), ("flux-dev", 32)):
            response = client.post("/sdapi/v1/txt2img", json={**body, "width": size, "height": size,
                                                              "override_settings": {"sd_model_checkpoint": model}})
            assert response.status_code == 200, response.text
            infotexts[model] = json.loads(response.json()["info"])["infotexts"][0]
    assert "Distilled CFG" not in infotexts["tiny-sd"] and "Distilled CFG" not in infotexts["sd35"]
    assert "Distilled CFG Scale: 2," in infotexts["flux-dev"]


def test_info_tells_the_page_what_the_loaded_model_runs(server):
    """/info (the web page's): the family, FLUX.1-dev's embedded guidance and its default (FLUX.1 Fill's is 30),
    and a flow model's samplers (each one runs) and features; None for a U-Net model, which runs them all."""
    seen = {}
    with server.client() as client:
        for model in ("flux-dev", "sd35", "tiny-sd", "flux-fill"):
            client.post("/sdapi/v1/options", json={"sd_model_checkpoint": model})
            seen[model] = client.get("/info").json()
        for name in seen["flux-dev"]["samplers"]:
            response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1,
                                                              "sampler_name": name, "override_settings":
                                                              {"sd_model_checkpoint": "flux-dev"}})
            assert response.status_code == 200, (name, response.text)
    assert [(i["family"], i["guidance_embedded"], i["distilled_cfg"]) for i in seen.values()] == [
        ("flux", True, 3.5), ("sd3", False, None), ("sd1", False, None), ("flux", True, 30.0)]  # Fill: 30
    assert set(seen["flux-dev"]["samplers"]) == {"Euler", "Heun", "DPM++ 2M", "UniPC", "DDIM"}
    assert "tiling" not in seen["sd35"]["features"] and {"img2img", "inpaint", "hires"} <= set(seen["sd35"]["features"])
    assert seen["tiny-sd"]["samplers"] is None and seen["tiny-sd"]["features"] is None


def test_sd3_skip_layer_guidance_through_the_a1111_api(server, models):
    body = {"prompt": "a cat", "negative_prompt": "zebra", "width": 32, "height": 32, "steps": 6, "seed": 2,
            "cfg_scale": 4.0, "sampler_name": "Euler", "skip_guidance_layers": [1], "skip_layer_guidance_stop": 0.7,
            "override_settings": {"sd_model_checkpoint": "sd35"}}
    with server.client() as client:
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        bad = client.post("/sdapi/v1/txt2img", json={**body, "skip_guidance_layers": [5]})
        assert bad.status_code == 422 and "joint blocks 0 to 1" in bad.json()["detail"]
    with one_thread():
        expected = local(models, "sd35").generate("a cat", "zebra", width=32, height=32, steps=6, seed=2,
                                                  guidance_scale=4.0, skip_guidance_layers=[1],
                                                  skip_layer_guidance_stop=0.7)
    assert np.abs(pixels(image) - pixels(expected.images[0])).max() <= 1
    assert 'SLG layers: 1, SLG scale: 2.8' in image.text["parameters"]
