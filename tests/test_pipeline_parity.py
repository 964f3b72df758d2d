"""End to end: a tiny random pipeline saved as a diffusers folder gives the same final latents in
torchsd and in ``diffusers.StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline``."""

import numpy as np
import pytest
import torch
from PIL import Image

import torchsd
from reference import max_rel_error, random_pipeline

PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry"
TOL = 1e-4


@pytest.fixture(scope="module", params=[("sd1", "epsilon"), ("sd2", "v_prediction")], ids=["sd1-eps", "sd2-v"])
def folder(request, tmp_path_factory):
    family, prediction = request.param
    path = tmp_path_factory.mktemp(family) / "model"
    random_pipeline(family, prediction).save(path)
    return path


def diffusers_pipeline(folder, cls_name="StableDiffusionPipeline", scheduler="DDIMScheduler", **options):
    """``options``: more ``from_pretrained`` arguments (variant, dtype)."""
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                        **options)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_loaded_folder_keeps_the_weights_and_config(folder):
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    again = random_pipeline(sd.config.family, sd.config.schedule.prediction_type.value)
    assert sd.config == again.config
    for ours, original in ((sd.unet, again.unet), (sd.vae, again.vae), (sd.text_encoder, again.text_encoder)):
        a, b = ours.state_dict(), original.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_files_load_in_transformers(folder):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    ids = ref([PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd.tokenizer([PROMPT, ""]), ids)


@pytest.mark.parametrize("eta", [0.0])
def test_ddim_text_to_image_matches_diffusers(folder, eta):
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    ours = sd.generate(PROMPT, NEGATIVE, steps=12, guidance_scale=6.0, sampler="ddim", eta=eta,
                       width=32, height=32, latents=initial_latents(), seed=0)
    pipe = diffusers_pipeline(folder)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=12, guidance_scale=6.0, eta=eta,
                  width=32, height=32, latents=initial_latents(), output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL


def test_ddim_with_eta_matches_diffusers_noise_stream(folder):
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    ours = sd.generate(PROMPT, NEGATIVE, steps=8, guidance_scale=5.0, sampler="ddim", eta=0.7,
                       width=32, height=32, latents=initial_latents(), seed=123)
    pipe = diffusers_pipeline(folder)
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=5.0, eta=0.7,
                  width=32, height=32, latents=initial_latents(), generator=torch.Generator().manual_seed(123),
                  output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL


def test_ddpm_matches_diffusers(folder):
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    ours = sd.generate(PROMPT, NEGATIVE, steps=10, guidance_scale=4.0, sampler="ddpm",
                       width=32, height=32, latents=initial_latents(), seed=7)
    pipe = diffusers_pipeline(folder, scheduler="DDPMScheduler")
    theirs = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=4.0, width=32, height=32,
                  latents=initial_latents(), generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert max_rel_error(ours.latents, theirs) < TOL


def test_decoded_image_matches_diffusers(folder):
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    ours = sd.generate(PROMPT, steps=4, guidance_scale=3.0, width=32, height=32, latents=initial_latents(), seed=0)
    pipe = diffusers_pipeline(folder)
    theirs = pipe(PROMPT, num_inference_steps=4, guidance_scale=3.0, width=32, height=32, latents=initial_latents(),
                  output_type="np").images[0]
    diff = np.abs(np.asarray(ours.images[0], dtype=np.float32) - np.round(theirs * 255))
    assert diff.max() <= 1.0  # rounding of the last 8-bit step only


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_image_to_image_matches_diffusers(folder, strength):
    gen = np.random.default_rng(0)
    init = Image.fromarray(gen.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    ours = sd.generate(PROMPT, NEGATIVE, steps=10, guidance_scale=5.0, init_image=init, strength=strength, seed=5)
    options = dict(negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(5), output_type="latent")
    if strength < 1:
        theirs = diffusers_pipeline(folder, "StableDiffusionImg2ImgPipeline")(PROMPT, image=init, strength=strength,
                                                                             **options).images
    else:  # strength 1 ignores the image (diffusers' img2img would still mix in sqrt(alpha_bar) of it)
        theirs = diffusers_pipeline(folder)(PROMPT, width=32, height=32, **options).images
    assert max_rel_error(ours.latents, theirs) < TOL


def test_batch_image_equals_the_same_seed_alone(folder):
    sd = torchsd.load_pipeline(folder, dtype=torch.float32)
    batch = sd.generate(PROMPT, steps=3, seed=40, width=32, height=32, batch_size=3, sampler="ddpm")
    alone = sd.generate(PROMPT, steps=3, seed=41, width=32, height=32, sampler="ddpm")
    assert batch.seeds == [40, 41, 42]
    assert max_rel_error(batch.latents[1:2], alone.latents) < TOL
