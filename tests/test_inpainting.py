"""Inpainting: unmasked pixels come back bit-identical, the masked region changes; 9-channel models;
mask blur, fill modes, outpainting, the ``torchsd inpaint`` command."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reference import random_pipeline
from torchsd.config import ModelConfig
from torchsd.images import pil_to_tensor
from torchsd.noise import make_generators
from torchsd.pipeline import GenerationRequest, StableDiffusion
from torchsd.pipeline.features.inpaint import binary_mask, gaussian_blur_mask, outpaint_canvas, prepare_inpainting

OPTIONS = dict(steps=3, seed=7, strength=0.9, guidance_scale=5.0)


def picture(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(width, height, box):
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


@pytest.fixture(scope="module")
def sd_inpainting():
    config = ModelConfig.tiny()
    config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, in_channels=9))
    assert config.is_inpainting
    return StableDiffusion.from_config(config, seed=3)


def far_from(mask: Image.Image, distance: int) -> np.ndarray:
    """Pixels more than ``distance`` from every white pixel of ``mask`` (a box), as a boolean array."""
    white = np.asarray(mask) > 0
    ys, xs = np.nonzero(white)
    yy, xx = np.mgrid[:white.shape[0], :white.shape[1]]
    return (yy < ys.min() - distance) | (yy > ys.max() + distance) | (xx < xs.min() - distance) | \
        (xx > xs.max() + distance)


@pytest.mark.parametrize("blur", [0, 4])
def test_unmasked_pixels_are_bit_identical_and_the_masked_region_changes(sd, blur):
    image, mask = picture(40, 32), box_mask(40, 32, (12, 8, 28, 24))
    result = sd.generate("a red circle", init_image=image, mask=mask, mask_blur=blur, **OPTIONS)
    out, original = np.asarray(result.images[0]), np.asarray(image)
    assert out.shape == original.shape
    outside = far_from(mask, 0 if blur == 0 else 10)  # 10 = the blur kernel's radius at sigma 4
    assert outside.sum() > 100
    assert np.array_equal(out[outside], original[outside])
    inside = np.asarray(mask) > 0
    assert np.abs(out[inside].astype(int) - original[inside]).mean() > 10


def test_latents_outside_the_mask_are_the_original_latents(sd):
    image, mask = picture(32, 32, seed=1), box_mask(32, 32, (0, 0, 16, 32))  # left half
    result = sd.generate("a cat", init_image=image, mask=mask, mask_blur=0, **OPTIONS)
    init_latents = sd.encode_image(pil_to_tensor(image), make_generators([OPTIONS["seed"]]))
    right = result.latents[..., 9:]  # latent columns 0-7 are masked; 8 may be blended by the resize
    assert torch.equal(right, init_latents[..., 9:])
    assert not torch.equal(result.latents[..., :8], init_latents[..., :8])


def test_sizes_not_multiple_of_8_are_kept(sd):
    image, mask = picture(37, 29, seed=2), box_mask(37, 29, (5, 5, 15, 15))
    result = sd.generate("a cat", init_image=image, mask=mask, mask_blur=0, **OPTIONS)
    out = np.asarray(result.images[0])
    assert result.images[0].size == (37, 29)
    outside = ~(np.asarray(mask) > 0)
    assert np.array_equal(out[outside], np.asarray(image)[outside])
    assert "Size: 37x29" in result.infotexts[0] and "Mask blur: 0" in result.infotexts[0]


@pytest.mark.parametrize("fill", ["fill", "latent noise", "latent nothing"])
def test_fill_modes_change_the_start_but_never_the_outside(sd, fill):
    image, mask = picture(32, 32, seed=3), box_mask(32, 32, (8, 8, 24, 24))
    original = sd.generate("a cat", init_image=image, mask=mask, mask_blur=0, **OPTIONS)
    filled = sd.generate("a cat", init_image=image, mask=mask, mask_blur=0, inpainting_fill=fill, **OPTIONS)
    assert not torch.equal(original.latents, filled.latents)
    outside = ~(np.asarray(mask) > 0)
    assert np.array_equal(np.asarray(filled.images[0])[outside], np.asarray(image)[outside])


def test_inverted_mask_repaints_the_black_part(sd):
    image, mask = picture(32, 32, seed=4), box_mask(32, 32, (8, 8, 24, 24))
    result = sd.generate("a cat", init_image=image, mask=mask, mask_blur=0, mask_invert=True, **OPTIONS)
    inside = np.asarray(mask) > 0
    assert np.array_equal(np.asarray(result.images[0])[inside], np.asarray(image)[inside])


def test_nine_channel_model_sees_mask_and_masked_image_latents(sd_inpainting, monkeypatch):
    sd = sd_inpainting
    image, mask = picture(32, 32, seed=5), box_mask(32, 32, (0, 0, 32, 16))  # top half
    seen = []
    forward = sd.unet.forward
    monkeypatch.setattr(sd.unet, "forward", lambda x, t, c: seen.append(x.clone()) or forward(x, t, c))
    result = sd.generate("a cat", init_image=image, mask=mask, mask_blur=0, **OPTIONS)
    assert all(x.shape[1] == 9 for x in seen)
    pixels, pixel_mask = pil_to_tensor(image), torch.zeros(1, 1, 32, 32)
    pixel_mask[..., :16, :] = 1
    expected_mask = F.interpolate(pixel_mask, size=(16, 16))
    expected_latents = sd.vae.encode(pixels * (1 - pixel_mask)).mean * sd.config.vae.scaling_factor
    for x in seen:
        assert torch.equal(x[:, 4:5], expected_mask.expand(x.shape[0], -1, -1, -1))
        assert torch.allclose(x[:, 5:], expected_latents.expand(x.shape[0], -1, -1, -1), atol=1e-5)
    out = np.asarray(result.images[0])
    assert np.array_equal(out[16:], np.asarray(image)[16:])
    assert np.abs(out[:16].astype(int) - np.asarray(image)[:16]).mean() > 10


def test_nine_channel_model_generates_from_text_with_a_full_mask(sd_inpainting, monkeypatch):
    seen = []
    forward = sd_inpainting.unet.forward
    monkeypatch.setattr(sd_inpainting.unet, "forward", lambda x, t, c: seen.append(x.clone()) or forward(x, t, c))
    result = sd_inpainting.generate("a cat", steps=2, width=16, height=16, seed=1)
    assert result.images[0].size == (16, 16)
    assert all(torch.equal(x[:, 4], torch.ones_like(x[:, 4])) for x in seen)


def test_mask_blur_matches_a_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    mask = box_mask(48, 40, (10, 12, 30, 26))
    for sigma in (1.0, 4.0):
        ours = np.asarray(gaussian_blur_mask(mask, sigma)).astype(int)
        # OpenCV's kernel radius int(2.5 sigma + 0.5) and reflect-101 border = scipy's truncate=2.5, "mirror"
        theirs = gaussian_filter(np.asarray(mask, dtype=np.float64), sigma, truncate=2.5, mode="mirror")
        assert np.abs(ours - np.round(theirs)).max() <= 1


def test_mask_reading_binarises_and_uses_transparency():
    grey = Image.new("L", (4, 1))
    grey.putdata([0, 128, 129, 255])
    assert list(np.asarray(binary_mask(grey)).ravel()) == [0, 0, 255, 255]
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))  # black but opaque: the alpha is the mask
    assert list(np.asarray(binary_mask(rgba)).ravel()) == [0, 255]


def test_outpainting_extends_the_canvas_and_keeps_the_original(sd):
    image = picture(24, 24, seed=6)
    canvas, mask = outpaint_canvas(image, left=8, right=8, top=0, bottom=8)
    assert canvas.size == (40, 32) and mask.size == (40, 32)
    m = np.asarray(mask)
    assert (m[:24, 8:32] == 0).all() and (m[:, :8] == 255).all() and (m[24:] == 255).all()
    assert np.array_equal(np.asarray(canvas)[:24, 8:32], np.asarray(image))
    assert np.array_equal(np.asarray(canvas)[:24, 0], np.asarray(image)[:, 0])  # edge pixels carried out
    result = sd.generate("a landscape", init_image=canvas, mask=mask, mask_blur=0, inpainting_fill="fill",
                         **{**OPTIONS, "strength": 1.0})
    assert np.array_equal(np.asarray(result.images[0])[:24, 8:32], np.asarray(image))


def test_prepared_mask_overlay_is_the_doubled_blurred_mask():
    image, mask = picture(32, 32), box_mask(32, 32, (8, 8, 24, 24))
    prepared = prepare_inpainting(image, mask, 32, 32, explicit_size=False, mask_blur=2, invert=False,
                                  fill="original")
    blurred = np.asarray(prepared.mask, dtype=np.float32)
    assert np.array_equal(np.asarray(prepared.overlay_mask), np.clip(blurred * 2, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("options, message", [
    (dict(mask=Image.new("L", (8, 8))), "a mask needs init_image"),
    (dict(init_image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8)), inpainting_fill="blur"),
     "inpainting_fill must be one of"),
    (dict(init_image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8)), mask_blur=-1), "mask_blur must be"),
    (dict(init_image=Image.new("RGB", (8, 8)), mask="/no/such/mask.png"), "mask '/no/such/mask.png' does not"),
])
def test_bad_inpainting_requests_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        GenerationRequest(prompt="x", **options)


def test_a1111_fill_numbers_are_accepted():
    request = GenerationRequest(prompt="x", init_image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8)),
                                inpainting_fill=2)
    assert request.inpainting_fill == "latent noise"


def test_outpaint_margins_are_checked():
    with pytest.raises(ValueError, match="margins must be >= 0"):
        outpaint_canvas(Image.new("RGB", (8, 8)), left=-8)
    with pytest.raises(ValueError, match="at least one > 0"):
        outpaint_canvas(Image.new("RGB", (8, 8)))


def test_inpaint_command_writes_the_picture(sd, tmp_path):
    from torchsd.cli import main
    from torchsd.pipeline.infotext import read_png_infotext

    sd.save(tmp_path / "model")
    image, mask = picture(32, 24, seed=8), box_mask(32, 24, (0, 0, 16, 24))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    code = main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "a cat", "--steps", "2",
                 "--seed", "1", "--mask-blur", "0", "--model", str(tmp_path / "model"), "--device", "cpu",
                 "--output", str(out)])
    assert code == 0
    result = np.asarray(Image.open(out))
    assert np.array_equal(result[:, 16:], np.asarray(image)[:, 16:])
    assert "Mask blur: 0" in read_png_infotext(out)
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "nothing.png"), "a cat"]) == 2
    code = main(["outpaint", str(tmp_path / "in.png"), "a cat", "--steps", "2", "--seed", "1", "--pad", "0",
                 "--left", "8", "--bottom", "16", "--mask-blur", "0", "--model", str(tmp_path / "model"),
                 "--device", "cpu", "--output", str(tmp_path / "wide.png")])
    assert code == 0
    wide = np.asarray(Image.open(tmp_path / "wide.png"))
    assert wide.shape == (40, 40, 3) and np.array_equal(wide[:24, 8:], np.asarray(image))
