"""Image-to-image, inpainting and hires fix on SD 3 and FLUX.1: torchsd's FlowPipeline, loaded from folders
written by diffusers' save_pretrained, gives the final latents of diffusers' StableDiffusion3Img2ImgPipeline /
FluxImg2ImgPipeline and StableDiffusion3InpaintPipeline / FluxInpaintPipeline on the same weights, image, mask,
strength and seed; the hires pass is diffusers' image-to-image of the upscaled first pass; the inpainting
options and the CLI work as for the U-Net models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import flow_reference as ref
import torchsd
from reference import max_rel_error

SIZE = dict(width=32, height=32)
# a box on whole latent cells (the tiny VAE is 2x): diffusers reads the mask at the latent size with nearest,
# torchsd with a bicubic resize, rounded (AUTOMATIC1111's); they agree on such a box
BOX = (8, 4, 24, 20)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("flow_features")
    return {"sd3": ref.saved(ref.sd3_pipeline(work), work / "sd3"),
            "dev": ref.saved(ref.flux_pipeline(work), work / "dev")}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: torchsd.load_pipeline(folder, "cpu", torch.float32) for name, folder in folders.items()}


def picture(width=32, height=32, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def box_mask(width=32, height=32, box=BOX):
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def generators(seed):
    return [torch.Generator().manual_seed(seed)]


# the same guided run on both sides: SD 3 with CFG and a negative prompt, FLUX.1-dev with its embedded guidance
def diffusers_kwargs(name):
    if name == "sd3":
        return dict(prompt="a red chair", negative_prompt="zebra", guidance_scale=3.0)
    return dict(prompt="a red chair", guidance_scale=2.5)


def our_kwargs(name):
    if name == "sd3":
        return dict(prompt="a red chair", negative_prompt="zebra", guidance_scale=3.0)
    return dict(prompt="a red chair", distilled_cfg_scale=2.5)


def unpacked(name, latents, width=32, height=32):
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(latents, height, width, 2) if name == "dev" else latents


def reference(name, folder, kind):
    import diffusers

    classes = {("sd3", "img2img"): "StableDiffusion3Img2ImgPipeline", ("dev", "img2img"): "FluxImg2ImgPipeline",
               ("sd3", "inpaint"): "StableDiffusion3InpaintPipeline", ("dev", "inpaint"): "FluxInpaintPipeline"}
    return getattr(diffusers, classes[name, kind]).from_pretrained(folder)


# --- image-to-image ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd3", "dev"])
def test_image_to_image_equals_diffusers(folders, pipes, name):
    """Strength 0.6 of 4 steps: diffusers' flow pipelines run ceil(0.6 * 4) = 3 steps (its U-Net pipelines, 2);
    FLUX.1's shift is the one of the image's token count."""
    with torch.no_grad():
        latents = reference(name, folders[name], "img2img")(
            image=picture(), strength=0.6, num_inference_steps=4, **SIZE, generator=generators(5),
            output_type="latent", **diffusers_kwargs(name)).images
    result = pipes[name].generate(init_image=picture(), strength=0.6, steps=4, seed=5, **SIZE, **our_kwargs(name))
    assert max_rel_error(result.latents, unpacked(name, latents)) < 1e-4
    assert "Denoising strength: 0.6" in result.infotexts[0]


def test_the_strength_counts_diffusers_flow_steps():
    """torchsd's count is diffusers' SD 3 / FLUX.1 get_timesteps (strength s keeps ceil(s * steps)), except where
    diffusers' float product goes one step over: 25 steps at 0.56 are 14 here, 15 there."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    from torchsd.diffusion.flow import flow_img2img_start

    def diffusers_start(steps, strength):
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(steps)
        _, run = FluxImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
        return steps - run

    pairs = [(4, 0.6), (4, 0.5), (20, 0.75), (30, 0.33), (7, 0.1), (3, 1.0), (50, 0.01), (8, 0.9)]
    assert [flow_img2img_start(*p) for p in pairs] == [diffusers_start(*p) for p in pairs] == [1, 2, 5, 20, 6, 0, 49, 0]
    assert flow_img2img_start(25, 0.56) == 11 and diffusers_start(25, 0.56) == 10
    assert flow_img2img_start(10, 0.0) == 10  # strength 0 keeps the image (diffusers refuses it)


# --- inpainting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,strength", [("sd3", 0.6), ("dev", 1.0)])
def test_inpainting_equals_diffusers(folders, pipes, name, strength):
    """The base model; the kept part re-noised at each step ((1 - t) x0 + t eps): diffusers blends the latents
    after each step, torchsd pins x0 (the same for Euler). Strength 1 starts from noise alone."""
    with torch.no_grad():
        latents = reference(name, folders[name], "inpaint")(
            image=picture(), mask_image=box_mask(), strength=strength, num_inference_steps=4, **SIZE,
            generator=generators(5), output_type="latent", **diffusers_kwargs(name)).images
    result = pipes[name].generate(init_image=picture(), mask=box_mask(), mask_blur=0, strength=strength, steps=4,
                                  seed=5, **SIZE, **our_kwargs(name))
    assert max_rel_error(result.latents, unpacked(name, latents)) < 1e-4
    out, original, inside = np.asarray(result.images[0]), np.asarray(picture()), np.asarray(box_mask()) > 0
    assert np.array_equal(out[~inside], original[~inside])  # the composite: untouched pixels come back as they were
    assert np.abs(out[inside].astype(int) - original[inside]).mean() > 10
    assert "Mask blur: 0" in result.infotexts[0] and f"Denoising strength: {strength}" in result.infotexts[0]


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m"])
def test_every_sampler_keeps_the_renoised_image_outside_the_mask(pipes, sampler):
    """At every step the latents outside the mask are the image's latents x0 with the run's own noise eps at the
    step's level: (1 - t) x0 + t eps in the flow variable (Heun); x0 + sigma eps, sigma = t / (1 - t), in the VE
    variable DPM++ 2M steps in."""
    pipe = pipes["sd3"]
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = []
    result = pipe.generate(init_image=picture(), mask=box_mask(), mask_blur=0, strength=0.8, steps=5, seed=2,
                           latents=noise, sampler=sampler, callback=steps.append, **SIZE, **our_kwargs("sd3"))
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[2:10, 4:12] = False  # the box at the latent size
    x0 = result.latents[..., keep]
    assert len(steps) == 4  # ceil(0.8 * 5)

    def fit(x, x0, eps):  # the one level that fits x = x0 + level * base, by least squares, and the misfit
        base = eps - x0 if sampler == "heun" else eps
        level = ((x - x0) * base).sum() / (base * base).sum()
        return level, (x - (x0 + level * base)).abs().max()

    for step in steps[:-1]:
        level, misfit = fit(step.x[..., keep], x0, noise[..., keep])
        assert 0 < level < step.sigma and misfit < 1e-4
    _, misfit = fit(steps[0].x[..., ~keep], result.latents[..., ~keep], noise[..., ~keep])
    assert misfit > 0.1  # inside the mask the transformer's prediction, not the image, moves the latents


def test_inpainting_options_invert_fill_and_odd_sizes(pipes):
    pipe, common = pipes["dev"], dict(mask_blur=0, strength=0.9, steps=3, seed=4, **our_kwargs("dev"))
    inverted = pipe.generate(init_image=picture(), mask=box_mask(), mask_invert=True, **SIZE, **common)
    explicit = pipe.generate(init_image=picture(), mask=ImageOps.invert(box_mask()), **SIZE, **common)
    assert torch.equal(inverted.latents, explicit.latents)
    nothing = pipe.generate(init_image=picture(), mask=box_mask(), inpainting_fill="latent nothing", **SIZE, **common)
    plain = pipe.generate(init_image=picture(), mask=box_mask(), **SIZE, **common)
    inside = np.asarray(box_mask()) > 0
    assert not torch.equal(nothing.latents, plain.latents)
    assert np.array_equal(np.asarray(nothing.images[0])[~inside], np.asarray(plain.images[0])[~inside])
    # no size given, sides not multiples of 4 (the tiny model's 2x VAE times 2x2 patches): padded, cropped back
    odd, odd_mask = picture(30, 26, seed=3), box_mask(30, 26, (10, 6, 20, 16))
    result = pipe.generate(init_image=odd, mask=odd_mask, **common)
    out, inside = np.asarray(result.images[0]), np.asarray(odd_mask) > 0
    assert result.images[0].size == (30, 26) and result.latents.shape[-2:] == (14, 16)
    assert np.array_equal(out[~inside], np.asarray(odd)[~inside])


# --- hires fix ---------------------------------------------------------------------------------------------------

def test_hires_is_flux_image_to_image_of_the_latent_upscale(folders, pipes):
    """First pass at 32 px, "Latent" (bilinear) to 64 px, then FluxImg2ImgPipeline's pass from those latents at
    the hires strength, with fresh noise from the same seed and FLUX.1's shift for 64 px (256 tokens, not 64)."""
    from diffusers import FluxImg2ImgPipeline

    pipe = pipes["dev"]
    first = pipe.generate(steps=4, seed=5, **SIZE, **our_kwargs("dev"))
    result = pipe.generate(steps=4, seed=5, hires=True, hires_scale=2, hires_strength=0.6, **SIZE,
                           **our_kwargs("dev"))
    upscaled = F.interpolate(first.latents, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        packed = FluxImg2ImgPipeline.from_pretrained(folders["dev"])(
            image=upscaled, strength=0.6, num_inference_steps=4, width=64, height=64, generator=generators(5),
            output_type="latent", **diffusers_kwargs("dev")).images
    assert result.images[0].size == (64, 64)
    assert max_rel_error(result.latents, unpacked("dev", packed, 64, 64)) < 1e-4
    text = result.infotexts[0]
    assert "Size: 32x32" in text and "Hires upscale: 2" in text and "Hires upscaler: Latent" in text


def test_hires_with_an_image_upscaler_encodes_with_the_vae_shift(folders, pipes):
    """Lanczos on the decoded first pass, encoded by the VAE's posterior mean as (z - shift) * scaling, then
    StableDiffusion3Img2ImgPipeline from those latents (3 of 5 steps at strength 0.5, the hires steps)."""
    from diffusers import StableDiffusion3Img2ImgPipeline
    from diffusers.image_processor import VaeImageProcessor

    pipe = pipes["sd3"]
    first = pipe.generate(steps=3, seed=6, **SIZE, **our_kwargs("sd3"))
    result = pipe.generate(steps=3, seed=6, hires=True, hires_size=(48, 64), hires_upscaler="Lanczos",
                           hires_steps=5, hires_strength=0.5, **SIZE, **our_kwargs("sd3"))
    reference_pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(folders["sd3"])
    vae = reference_pipe.vae
    pixels = VaeImageProcessor().preprocess(first.images[0].resize((48, 64), Image.LANCZOS))
    with torch.no_grad():
        x0 = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        latents = reference_pipe(image=x0, strength=0.5, num_inference_steps=5, width=48, height=64,
                                 generator=generators(6), output_type="latent", **diffusers_kwargs("sd3")).images
    assert result.images[0].size == (48, 64)
    assert max_rel_error(result.latents, latents) < 1e-4
    assert "Hires resize: 48x64" in result.infotexts[0] and "Hires steps: 5" in result.infotexts[0]


# --- the command line ------------------------------------------------------------------------------------------------

def test_cli_inpaint_and_hires_from_the_infotext(folders, pipes, tmp_path):
    from torchsd.cli import main

    model = ["--model", str(folders["dev"]), "--dtype", "fp32", "--device", "cpu"]
    picture().save(tmp_path / "in.png")
    box_mask().save(tmp_path / "mask.png")
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "a red chair", "--steps", "3",
                 "--seed", "2", "--mask-blur", "0", "--invert-mask", "--distilled-cfg", "2.5",
                 "-o", str(tmp_path / "inpainted.png"), *model]) == 0
    expected = pipes["dev"].generate("a red chair", init_image=picture(), mask=box_mask(), mask_blur=0,
                                     mask_invert=True, steps=3, seed=2, distilled_cfg_scale=2.5)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "inpainted.png")), np.asarray(expected.images[0]))
    assert main(["outpaint", str(tmp_path / "in.png"), "a red chair", "--steps", "2", "--seed", "1", "--pad", "0",
                 "--left", "8", "--mask-blur", "0", "-o", str(tmp_path / "wide.png"), *model]) == 0
    wide = np.asarray(Image.open(tmp_path / "wide.png"))
    assert wide.shape == (32, 40, 3) and np.array_equal(wide[:, 8:], np.asarray(picture()))
    assert main(["generate", "a horse", "--steps", "2", "--size", "32x32", "--seed", "5", "--hires",
                 "--hires-scale", "1.5", "--hires-strength", "0.5", "-o", str(tmp_path / "a.png"), *model]) == 0
    assert main(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), *model]) == 0
    a, b = (Image.open(tmp_path / f"{n}.png") for n in "ab")
    assert a.size == (48, 48) and np.array_equal(np.asarray(a), np.asarray(b))
    assert "Hires upscale: 1.5" in b.text["parameters"]
