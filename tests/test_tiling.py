"""Seamless tiling (A1111's ``tiling``): the image wraps around — its left edge continues its right edge — from
Python, the CLI and the real webuiapi client; "Tiling: True" is written and read back; the convolutions'
padding modes are restored after the run."""

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image
from torch import nn

from reference import random_pipeline
from serverutil import KEY, one_thread
from torchsd import GenerationRequest, load_pipeline
from torchsd.cli import main
from torchsd.pipeline.infotext import parse_infotext, read_png_infotext, request_fields

OPTIONS = dict(steps=3, sampler="ddim", guidance_scale=5.0)


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1", seed=5)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def seam_gap(image: Image.Image) -> float:
    """How much the step across the wrap-around seam (last column -> first column, last row -> first row)
    differs from the steps between neighbouring pixels inside the image: near 0 for a seamless image. (A random
    model draws noise-like pictures, whose borders under zero padding are flatter than their inside: the gap of
    an untiled one comes from both sides.)"""
    a = pixels(image)
    seam = np.abs(a[:, 0] - a[:, -1]).mean() + np.abs(a[0] - a[-1]).mean()
    inside = np.abs(np.diff(a, axis=1)).mean() + np.abs(np.diff(a, axis=0)).mean()
    return abs(seam / inside - 1)


def test_tiled_images_wrap_around_and_untiled_ones_do_not(sd):
    plain = sd.generate("a brick wall", seed=3, width=64, height=64, **OPTIONS)
    tiled = sd.generate("a brick wall", seed=3, width=64, height=64, tiling=True, **OPTIONS)
    assert seam_gap(tiled.images[0]) * 2 < seam_gap(plain.images[0])


def test_tiled_generation_is_equivariant_to_shifts_on_the_torus(sd):
    """The strongest form of "wraps around": shifting the starting noise around the torus shifts the image
    the same way, so no column is an edge (on a plane, a shift would change what the borders see)."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    shift = 4  # a multiple of the U-Net's downsampling, so that the strided convolutions see the same grid
    f = sd.config.vae.downscale_factor
    options = dict(width=8 * f, height=8 * f, **OPTIONS)
    base = sd.generate("a brick wall", latents=latents, tiling=True, **options).latents
    shifted = sd.generate("a brick wall", latents=latents.roll(shift, dims=3), tiling=True, **options).latents
    torch.testing.assert_close(shifted, base.roll(shift, dims=3), atol=1e-4, rtol=1e-4)
    plain = sd.generate("a brick wall", latents=latents, **options).latents
    plain_shifted = sd.generate("a brick wall", latents=latents.roll(shift, dims=3), **options).latents
    assert (plain_shifted - plain.roll(shift, dims=3)).abs().max() > 1e-2  # zero padding is not a torus


def test_padding_modes_are_restored_and_the_infotext_says_tiling(sd):
    result = sd.generate("a cat", seed=1, width=32, height=32, tiling=True, **OPTIONS)
    assert all(m.padding_mode == "zeros" for model in (sd.unet, sd.vae) for m in model.modules()
               if isinstance(m, nn.Conv2d))
    assert "Tiling: True" in result.infotexts[0]
    assert request_fields(result.infotexts[0])["tiling"] is True
    assert "Tiling" not in sd.generate("a cat", seed=1, width=32, height=32, **OPTIONS).infotexts[0]
    # and the same request again without tiling is the untiled image
    again = sd.generate("a cat", seed=1, width=32, height=32, **OPTIONS)
    assert not torch.equal(again.latents, result.latents)


def test_bad_values_are_refused(sd):
    with pytest.raises(ValueError, match="tiling must be True or False"):
        sd.generate("a cat", tiling="yes", **OPTIONS)
    with pytest.raises(ValueError, match="infotext Tiling: expected True or False"):
        request_fields("a cat\nSteps: 3, Tiling: maybe")


def test_cli_tiling_flag(sd, tmp_path):
    sd.save(tmp_path / "model")
    for name, extra in (("tiled", ["--tiling"]), ("plain", [])):
        code = main(["generate", "a brick wall", "--model", str(tmp_path / "model"), "--steps", "3", "--seed", "3",
                     "--size", "64x64", "--sampler", "ddim", "--cfg", "5", "--output", str(tmp_path / f"{name}.png"),
                     "--dtype", "fp32", *extra])
        assert code == 0
    assert parse_infotext(read_png_infotext(tmp_path / "tiled.png"))["Tiling"] == "True"
    assert seam_gap(Image.open(tmp_path / "tiled.png")) * 2 < seam_gap(Image.open(tmp_path / "plain.png"))
    # the CLI's image is Python's tiled image (whose wrap-around the shift test proves)
    expected = sd.generate("a brick wall", seed=3, width=64, height=64, tiling=True, **OPTIONS).images[0]
    # (up to the rounding of the CLI's own fast paths), and far from the untiled one
    assert np.abs(pixels(Image.open(tmp_path / "tiled.png")) - pixels(expected)).mean() < 0.5
    assert np.abs(pixels(Image.open(tmp_path / "plain.png")) - pixels(expected)).mean() > 5


def test_webuiapi_txt2img_tiling(server, models_dir):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=3, username="user",
                            password=KEY)
    tiled = api.txt2img(prompt="a brick wall", width=64, height=64, seed=3, cfg_scale=5, tiling=True)
    plain = api.txt2img(prompt="a brick wall", width=64, height=64, seed=3, cfg_scale=5)
    assert "Tiling: True" in tiled.info["infotexts"][0]
    assert seam_gap(tiled.image) < seam_gap(plain.image)
    local = load_pipeline(models_dir / "tiny-a", "cpu", torch.float32)
    with one_thread():  # the server's image is the one Python makes
        expected = local.run(GenerationRequest(prompt="a brick wall", width=64, height=64, steps=3, sampler="ddim",
                                               eta=1.0, guidance_scale=5.0, seed=3, tiling=True))
    assert np.abs(pixels(tiled.image) - pixels(expected.images[0])).max() <= 1


def test_a_tiled_run_decodes_whole_images_even_with_vae_tiling_on(sd):
    from torchsd.models.tiling import VAETiling

    whole = sd.generate("a cat", seed=2, width=64, height=64, tiling=True, **OPTIONS).images[0]
    sd.vae_tiling = VAETiling(tile_size=32, overlap=16)
    try:
        tiled_vae = sd.generate("a cat", seed=2, width=64, height=64, tiling=True, **OPTIONS).images[0]
        assert sd.vae_tiling == VAETiling(tile_size=32, overlap=16)  # given back after the run
    finally:
        sd.vae_tiling = None
    assert np.array_equal(pixels(whole), pixels(tiled_vae))
