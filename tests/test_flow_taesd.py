"""TAESD3 / TAEF1 previews for SD 3 and FLUX.1: the 16-channel tiny autoencoder read from madebyollin's files and
diffusers folders gives diffusers' AutoencoderTiny(latent_channels=16) outputs; with --fast-decode the images are
those of diffusers' StableDiffusion3Pipeline / FluxPipeline with that AutoencoderTiny as their VAE; a folder of
several families' files (A1111's models/VAE-taesd) gives each model its own; and the server's /progress shows a
live preview of a FLUX.1 run."""

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

import flow_reference as ref
import torchsd
from reference import max_rel_error
from serverutil import KEY, Server, one_thread
from test_taesd import madebyollin_files
from torchsd.checkpoints.taesd import load_taesd

# two levels, as the tiny flow models' VAE (2x); 16 latent channels, as taesd3 / taef1
TINY16 = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 2),
              num_decoder_blocks=(2, 1), latent_channels=16)


def tiny_autoencoder(seed: int, **config):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    model = AutoencoderTiny(**{**TINY16, **config}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model


def named_files(model, folder, name: str):
    """madebyollin's files of ``model`` as <name>_encoder.pth / <name>_decoder.pth in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    made = madebyollin_files(model, folder / f"_{name}")
    for half in ("encoder", "decoder"):
        (made / f"taesd_{half}.pth").rename(folder / f"{name}_{half}.pth")
    made.rmdir()
    return folder


@pytest.fixture(scope="module")
def tiny():
    return {"taesd3": tiny_autoencoder(1), "taef1": tiny_autoencoder(2),
            "taesd": tiny_autoencoder(3, latent_channels=4)}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny):
    """models/ with an SD 3 and a FLUX.1-dev folder and a VAE-taesd folder holding three families' TAESDs."""
    work = tmp_path_factory.mktemp("flow_taesd")
    models = work / "models"
    with one_thread():
        ref.saved(ref.sd3_pipeline(work), models / "sd35")
        ref.saved(ref.flux_pipeline(work), models / "flux-dev")
    for name, model in tiny.items():
        named_files(model, models / "VAE-taesd", name)
    return models


def test_16_channel_taesd_matches_autoencoder_tiny(tiny, tmp_path):
    reference = tiny["taef1"]
    reference.save_pretrained(tmp_path / "diffusers")
    for path in (tmp_path / "diffusers", named_files(reference, tmp_path / "files", "taef1"),
                 tmp_path / "files" / "taef1_decoder.pth"):
        ours = load_taesd(path)
        assert ours.config.latent_channels == 16
        gen = torch.Generator().manual_seed(1)
        latents = torch.randn(2, 16, 8, 12, generator=gen) * 2
        with torch.no_grad():
            assert max_rel_error(ours.decode(latents), reference.decode(latents).sample) < 1e-5
    both = load_taesd(tmp_path / "files")  # the encoder too
    images = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert max_rel_error(both.encode(images), reference.encode(images).latents) < 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fast_decode_equals_the_diffusers_pipeline_with_autoencoder_tiny(models, tiny, family):
    """diffusers decodes (latents / scaling + shift) with the VAE it is given; AutoencoderTiny's own scaling and
    shift (1, 0: madebyollin's configs) leave the transformer's latents as they are, which is what TAESD3 and TAEF1
    read. Our preview decode is that image."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    name, folder = ("taesd3", "sd35") if family == "sd3" else ("taef1", "flux-dev")
    pipeline_class = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    reference = pipeline_class.from_pretrained(models / folder, vae=tiny[name])
    kw = dict(prompt="a red chair", height=32, width=32, num_inference_steps=2, output_type="pt",
              generator=[torch.Generator().manual_seed(5)])
    kw.update(dict(negative_prompt="zebra", guidance_scale=4.0) if family == "sd3" else dict(guidance_scale=3.5))
    with torch.no_grad():
        theirs = reference(**kw).images
    pipe = torchsd.load_pipeline(models / folder, "cpu", torch.float32, taesd=models / "VAE-taesd", fast_decode=True)
    assert pipe.taesd.config.latent_channels == 16 and pipe.fast_decode
    result = pipe.generate("a red chair", "zebra" if family == "sd3" else "", width=32, height=32, steps=2, seed=5,
                           guidance_scale=4.0 if family == "sd3" else 1.0)
    assert max_rel_error((pipe.decode_preview(result.latents) + 1) / 2, theirs) < 1e-4
    png = torch.from_numpy(np.array(result.images[0])).permute(2, 0, 1).float() / 255
    assert (png - theirs[0]).abs().max() < 1.5 / 255  # the final image is TAESD's with --fast-decode
    full = pipe.vae  # and without it, the model's own VAE
    pipe.fast_decode = False
    assert max_rel_error(pipe.decode_latents(result.latents), pipe.decode_preview(result.latents)) > 1e-2
    assert full is pipe.vae


def test_a_folder_of_several_families_gives_each_model_its_own(models, tiny, tmp_path):
    for folder, name in (("sd35", "taesd3"), ("flux-dev", "taef1")):
        pipe = torchsd.load_pipeline(models / folder, "cpu", torch.float32, taesd=models / "VAE-taesd")
        expected = tiny[name].state_dict()
        mine = pipe.taesd.state_dict()
        assert all(torch.equal(mine[k], expected[k]) for k in expected)
    only_sd = named_files(tiny["taesd"], tmp_path / "VAE-taesd", "taesd")
    with pytest.raises(ValueError, match="4 latent channels.* into 16: .*taef1 for FLUX.1"):
        torchsd.load_pipeline(models / "flux-dev", "cpu", torch.float32, taesd=only_sd)


def test_server_shows_a_live_taef1_preview_of_a_flux_run(models):
    from torchsd.server.registry import ModelRegistry

    registry = ModelRegistry(models, models / "flux-dev")
    assert registry.pipeline().taesd.config.latent_channels == 16  # <models-dir>/VAE-taesd, taef1's files
    server = Server(models, "--model", str(models / "flux-dev"), "--dtype", "fp32")
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=2, username="user",
                                password=KEY)
        results = {}
        thread = threading.Thread(target=lambda: results.update(r=api.txt2img(
            prompt="a long one", width=64, height=64, steps=150, seed=11)))
        thread.start()
        deadline = time.monotonic() + 60
        progress = api.get_progress()
        while (progress["state"]["sampling_step"] < 2 or progress["current_image"] is None) \
                and time.monotonic() < deadline:
            time.sleep(0.05)  # a preview is decoded between steps once /progress has asked for one
            progress = api.get_progress()
        preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
        assert preview.size == (64, 64) and 0 < progress["progress"] < 1
        api.interrupt()
        thread.join(60)
        assert results["r"].info["interrupted"] is True
    finally:
        server.stop()
