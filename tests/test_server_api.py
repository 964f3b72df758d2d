"""The real server driven by the real, unchanged clients: ``webuiapi.WebUIApi`` and ``openai.OpenAI``."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import openai
import pytest
import torch
import webuiapi
from PIL import Image

from serverutil import KEY, one_thread, save_tiny
from torchsd import GenerationRequest, load_pipeline
from torchsd.runtime import RuntimeOptions, apply_runtime


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=3, username="user",
                             password=KEY)


@pytest.fixture(scope="module")
def local(models_dir):
    """The same weights loaded in this process as the server loads them (the CLI's runtime defaults, in
    float32 as the ``server`` fixture asks): what the server's images must equal."""
    return apply_runtime(load_pipeline(models_dir / "tiny-a", device="cpu", dtype=torch.float32), RuntimeOptions(),
                         "cpu", torch.float32)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_webuiapi_txt2img_matches_the_pipeline(api, local):
    result = api.txt2img(prompt="a red circle", negative_prompt="blurry", width=64, height=64, seed=1234,
                         batch_size=2, cfg_scale=5.0)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [1234, 1235]
    assert result.info["sd_model_name"] == "tiny-a" and result.info["sampler_name"] == "DDIM"
    assert result.info["interrupted"] is False and result.info["steps_completed"] == 3
    assert "Seed: 1234" in result.images[0].info["parameters"]
    assert result.images[1].info["parameters"].startswith("a red circle\nNegative prompt: blurry\nSteps: 3,")
    assert result.parameters["n_iter"] == 1 and result.parameters["sampler_index"] == "DDIM"  # echoed with defaults

    # webuiapi sends eta=1.0 and A1111 passes it to DDIM: the server must have built exactly this request
    with one_thread():
        expected = local.run(GenerationRequest("a red circle", "blurry", width=64, height=64, steps=3,
                                               guidance_scale=5.0, sampler="ddim", eta=1.0, seed=1234, batch_size=2))
    for ours, theirs in zip(result.images, expected.images):
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert result.images[0].info["parameters"] == expected.infotexts[0]


def test_webuiapi_img2img_matches_the_pipeline(api, local):
    init = Image.fromarray((np.indices((48, 80)).sum(0) % 256).astype(np.uint8)).convert("RGB")
    result = api.img2img(images=[init], prompt="a house", width=64, height=64, denoising_strength=0.5, seed=7,
                         steps=4)
    assert result.images[0].size == (64, 64)
    assert result.info["denoising_strength"] == 0.5
    assert result.parameters["init_images"] is None  # include_init_images=False drops them from the echo
    with one_thread():
        expected = local.run(GenerationRequest("a house", width=64, height=64, steps=4, guidance_scale=7.0,
                                               sampler="ddim", eta=1.0, seed=7,
                                               init_image=init.resize((64, 64), Image.LANCZOS), strength=0.5))
    assert np.abs(pixels(result.images[0]) - pixels(expected.images[0])).max() <= 1
    assert "Denoising strength: 0.5" in result.images[0].info["parameters"]


def test_webuiapi_img2img_with_mask(api):
    init = Image.new("RGB", (64, 64), (30, 60, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], mask_image=mask, prompt="a sun", width=64, height=64, seed=3)
    assert result.images[0].size == (64, 64)
    outside = pixels(result.images[0])[:8, :8] - pixels(init)[:8, :8]
    assert np.abs(outside).max() <= 8, "pixels outside the mask must stay as they were"


def test_models_list_switch_and_refresh(api, server, models_dir):
    titles = api.util_get_model_names()
    assert titles == ["sub/tiny-b", "tiny-a"]
    assert api.util_get_current_model() == "tiny-a"
    before = api.txt2img(prompt="x", width=64, height=64, seed=5).images[0]

    api.util_set_model("sub/tiny-b")  # webuiapi looks the title up and POSTs /options
    assert api.util_get_current_model() == "sub/tiny-b"
    after = api.txt2img(prompt="x", width=64, height=64, seed=5)
    assert after.info["sd_model_name"] == "sub_tiny-b"
    assert np.abs(pixels(after.images[0]) - pixels(before)).max() > 10  # other weights, other image

    # a model for one request only: override_settings, restored afterwards
    once = api.txt2img(prompt="x", width=64, height=64, seed=5, override_settings={"sd_model_checkpoint": "tiny-a"})
    assert once.info["sd_model_name"] == "tiny-a"
    assert np.abs(pixels(once.images[0]) - pixels(before)).max() <= 1
    assert api.util_get_current_model() == "sub/tiny-b"
    api.util_set_model("tiny-a", find_closest=False)
    assert api.util_get_current_model() == "tiny-a"

    save_tiny(models_dir / "tiny-c", seed=5)
    try:
        assert "tiny-c" not in api.util_get_model_names()
        api.refresh_checkpoints()
        assert "tiny-c" in api.util_get_model_names()
    finally:
        import shutil

        shutil.rmtree(models_dir / "tiny-c")
        api.refresh_checkpoints()


def test_progress_preview_and_interrupt(api):
    results = {}

    def long_run():
        results["r"] = api.txt2img(prompt="a long one", width=64, height=64, steps=150, seed=11)

    thread = threading.Thread(target=long_run)
    thread.start()
    deadline = time.monotonic() + 60
    progress = api.get_progress()
    while (progress["state"]["sampling_step"] < 2 or progress["current_image"] is None) and time.monotonic() < deadline:
        time.sleep(0.05)  # a preview is decoded between steps once /progress has asked for one
        progress = api.get_progress()
    assert progress["state"]["job"] == "txt2img" and progress["state"]["sampling_steps"] == 150
    assert 0 < progress["progress"] < 1 and progress["state"]["job_count"] == 1
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (64, 64)  # the decoded prediction of the clean image at the current step
    assert api.interrupt() == {}
    thread.join(30)
    assert not thread.is_alive()
    result = results["r"]
    assert result.info["interrupted"] is True
    assert 2 <= result.info["steps_completed"] < 150
    assert result.images[0].size == (64, 64)  # the partly finished image, as A1111 returns it
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert api.skip() == {}  # nothing running: still answers JSON


def test_png_info_round_trip(api):
    image = api.txt2img(prompt="a (blue:1.2) square, sky", negative_prompt="text", width=64, height=64,
                        seed=99).images[0]
    result = api.png_info(image)
    assert result.info == image.info["parameters"]
    params = result.parameters
    assert params["Prompt"] == "a (blue:1.2) square, sky" and params["Negative prompt"] == "text"
    assert params["Seed"] == "99" and params["Size-1"] == "64" and params["Size-2"] == "64"
    assert api.png_info(Image.new("RGB", (8, 8))).info == ""


def test_samplers_schedulers_loras_embeddings_scripts(api):
    samplers = api.get_samplers()
    assert "DDIM" in [s["name"] for s in samplers] and all({"name", "aliases", "options"} <= s.keys() for s in samplers)
    assert "automatic" in api.util_get_scheduler_names()
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    loras = api.get_loras()
    assert [lora["name"] for lora in loras] == ["style"] and loras[0]["metadata"] == {"ss_network_dim": "4"}
    embeddings = api.get_embeddings()
    assert embeddings["loaded"] == {"tok": {"step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                            "shape": 64, "vectors": 2}}
    assert embeddings["skipped"]["sd15only"]["shape"] == 768  # another text encoder's width
    assert api.get_sd_vae() == []
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest", "R-ESRGAN 4x+"]


def test_a1111_tolerates_what_clients_send(server):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "sampler_name": None, "sampler_index": "DDIM",
            "firstphase_width": 0, "seed": None, "negative_prompt": None,
            "alwayson_scripts": {"ControlNet": {"args": []}},
            "some_future_field": {"a": 1}, "override_settings": None, "scheduler": "Automatic", "send_images": True}
    with server.client() as client:
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        assert len(response.json()["images"]) == 1
        assert client.post("/sdapi/v1/txt2img", json={**body, "send_images": False}).json()["images"] == []


@pytest.mark.parametrize("change, status, message", [
    ({"width": 500}, 422, "width must be a multiple of 8; got 500 — try 496 or 504"),
    ({"width": 1024}, 422, "width 1024 is above this server's limit of 512"),
    ({"steps": 151}, 422, "steps 151 is above this server's limit of 150"),
    ({"batch_size": 9, "n_iter": 2}, 422, "18 images were asked for; this server makes at most 16"),
    ({"sampler_name": "Nonexistent"}, 422, "unknown sampler 'Nonexistent'"),
    ({"tiling": "yes"}, 422, "tiling must be true or false"),
    ({"enable_hr": True, "hr_upscaler": "4x-UltraSharp"}, 422, "unknown hires upscaler '4x-UltraSharp'"),
    ({"subseed_strength": 1.5}, 422, "subseed_strength must be between 0"),
    ({"seed": "abc"}, 422, "seed must be an integer; got 'abc'"),
    ({"cfg_scale": "high"}, 422, "cfg_scale must be a finite number"),
    ({"scheduler": "Karass"}, 422, "Karass"),
    ({"script_name": "x/y/z plot"}, 422, "script 'x/y/z plot' not found"),
    ({"alwayson_scripts": {"ADetailer": {"args": [{"enabled": True}]}}}, 422, "always-on script 'ADetailer' not found"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True}]}}}, 422, "ControlNet unit 0: no model"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, 404,
     "model 'nope' not found; available: 'sub/tiny-b', 'tiny-a'"),
])
def test_a1111_errors_say_what_to_change(server, change, status, message):
    with server.client() as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2,
                                                          "sampler_name": "DDIM", **change})
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert response.json()["error"]  # A1111's error shape: error, detail, body, errors


def test_bad_json_and_bad_images(server):
    with server.client() as client:
        response = client.post("/sdapi/v1/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "not valid JSON" in response.json()["detail"]
        response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["bm90IGFuIGltYWdl"]})
        assert response.status_code == 422 and "not a readable PNG, JPEG or WebP image" in response.json()["detail"]
        response = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["http://example.com/a.png"]})
        assert response.status_code == 422 and "image URLs are not fetched" in response.json()["detail"]
        response = client.post("/sdapi/v1/img2img", json={"prompt": "x"})
        assert response.status_code == 422 and "img2img needs init_images" in response.json()["detail"]


def test_openai_images_generate(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY)
    result = client.images.generate(prompt="a green triangle", n=2, size="64x64", response_format="b64_json",
                                    extra_body={"steps": 3, "seed": 7, "sampler": "DDIM"})
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert "Seed: 7," in images[0].info["parameters"] and "Seed: 8," in images[1].info["parameters"]
    assert images[0].info["parameters"].startswith("a green triangle\nSteps: 3, Sampler: DDIM")

    default = client.images.generate(prompt="a square", model="dall-e-3", extra_body={"steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(default.data[0].b64_json))).size == (64, 64)  # "auto": native size
    by_name = client.images.generate(prompt="a square", model="sub/tiny-b", size="64x64", extra_body={"steps": 2})
    assert "Model: sub_tiny-b" in Image.open(io.BytesIO(base64.b64decode(by_name.data[0].b64_json))).info["parameters"]
    assert [m.id for m in client.models.list()] == ["sub/tiny-b", "tiny-a"]
    as_url = client.images.generate(prompt="a square", size="64x64", response_format="url", extra_body={"steps": 1})
    assert as_url.data[0].url.startswith("data:image/png;base64,iVBOR")

    with pytest.raises(openai.UnprocessableEntityError, match="width must be a multiple of 8"):
        client.images.generate(prompt="x", size="500x500")
    with pytest.raises(openai.UnprocessableEntityError, match="size must look like '512x512'"):
        client.images.generate(prompt="x", size="big")
    with pytest.raises(openai.NotFoundError, match="model 'sdxl' not found"):
        client.images.generate(prompt="x", model="sdxl")
    with pytest.raises(openai.AuthenticationError, match="needs its API key"):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
