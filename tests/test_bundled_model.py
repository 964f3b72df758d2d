"""The bundled model: loads with no arguments, makes the README's picture, reads plain phrasing and two objects,
and runs in diffusers."""

import numpy as np
import pytest
import torch

import torchsd
from reference import max_rel_error
from torchsd.training.data import ShapeSpec
from torchsd.training.evaluate import read_scene_image, read_shape_image

PROMPT = "a red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def sd():
    return torchsd.load_pipeline(dtype=torch.float32)


def test_bundled_model_draws_the_readme_prompt(sd):
    image = sd.generate(PROMPT, steps=30, guidance_scale=5.0, seed=0).images[0]
    assert image.size == (64, 64)
    reading = read_shape_image(image)
    spec = ShapeSpec("circle", "red", "top left", "blue")
    assert reading.matches(spec) == {"background": True, "color": True, "shape": True, "position": True}, reading


@pytest.mark.parametrize("prompt, objects, background", [
    # a held-out phrasing that puts the background first (version 1 swapped such colours or ignored the words)
    ("on a black background, a white square at the top", [("square", "white", "top center")], "black"),
    # two objects, each colour bound to its own shape and cell (the docs' cross-attention figure)
    ("a red circle at the top left and a blue triangle at the bottom right on a yellow background",
     [("circle", "red", "top left"), ("triangle", "blue", "bottom right")], "yellow"),
])
def test_bundled_model_reads_plain_phrasing_and_two_objects(sd, prompt, objects, background):
    image = sd.generate(prompt, steps=30, guidance_scale=5.0, seed=0).images[0]
    reading = read_scene_image(image)
    assert reading.matches([ShapeSpec(shape, color, cell, background) for shape, color, cell in objects]), reading


def test_bundled_model_runs_in_diffusers_with_the_same_result(sd, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd.save(tmp_path / "bundled", format="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "bundled", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = sd.generate(PROMPT, steps=20, guidance_scale=5.0, latents=noise, seed=3)
    theirs = pipe(PROMPT, num_inference_steps=20, guidance_scale=5.0, latents=noise, output_type="np")
    their_latents = pipe(PROMPT, num_inference_steps=20, guidance_scale=5.0, latents=noise,
                         output_type="latent").images
    assert max_rel_error(ours.latents, their_latents) < 1e-4
    diff = np.abs(np.asarray(ours.images[0], dtype=np.float32) - np.round(theirs.images[0] * 255))
    assert diff.max() <= 1.0
