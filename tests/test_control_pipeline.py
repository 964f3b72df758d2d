"""ControlNet in a run: final latents equal diffusers' StableDiffusionControlNetPipeline on a tiny random
model (one and two units, guidance start/end, conditioning scale), and the modes, sizes and samplers work."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import torchsd
from reference import diffusers_unet, max_rel_error, random_pipeline
from test_controlnet import diffusers_controlnet, random_controlnet
from test_pipeline_parity import diffusers_pipeline, initial_latents
from torchsd.pipeline.features.control import ControlUnit, fit_image

PROMPT, NEGATIVE = "a red circle at the top left on a blue background", "blurry"
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD 1 model folder and two ControlNets saved by diffusers (the hint encoder downscales by 2, as
    the tiny VAE does: the hint comes at the image's size)."""
    root = tmp_path_factory.mktemp("control")
    sd = random_pipeline("sd1")
    sd.save(root / "model")
    unet_ref = diffusers_unet(sd)
    paths = []
    for seed in (3, 4):
        net = random_controlnet(sd, seed, hint_widths=(16, 32))  # the tiny VAE's factor 2: one stride-2 conv
        diffusers_controlnet(net, unet_ref).save_pretrained(root / f"cn{seed}")
        paths.append(root / f"cn{seed}")
    return root, paths


def hint_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def reference_latents(root, paths, images, scales, starts, ends, steps=8, guidance=6.0):
    from diffusers import ControlNetModel

    nets = [ControlNetModel.from_pretrained(p) for p in paths]
    pipe = diffusers_pipeline(root / "model", "StableDiffusionControlNetPipeline",
                              controlnet=nets[0] if len(nets) == 1 else nets)
    one = len(nets) == 1
    return pipe(PROMPT, negative_prompt=NEGATIVE, image=images[0] if one else images, num_inference_steps=steps,
                guidance_scale=guidance, width=32, height=32, latents=initial_latents(),
                controlnet_conditioning_scale=scales[0] if one else scales,
                control_guidance_start=starts[0] if one else starts, control_guidance_end=ends[0] if one else ends,
                output_type="latent").images


@pytest.mark.parametrize("case", [
    dict(scales=[1.0], starts=[0.0], ends=[1.0]),
    dict(scales=[0.7], starts=[0.25], ends=[0.75]),
    dict(scales=[0.8, 0.5], starts=[0.0, 0.5], ends=[0.6, 1.0]),
], ids=["one", "one-window", "two"])
def test_final_latents_match_diffusers(setup, case):
    root, paths = setup
    n = len(case["scales"])
    images = [hint_image(i) for i in range(n)]
    sd = torchsd.load_pipeline(root / "model", dtype=torch.float32)
    units = [ControlUnit(image=images[i], model=paths[i], weight=case["scales"][i], guidance_start=case["starts"][i],
                         guidance_end=case["ends"][i]) for i in range(n)]
    ours = sd.generate(PROMPT, NEGATIVE, steps=8, guidance_scale=6.0, sampler="ddim", eta=0.0, width=32, height=32,
                       latents=initial_latents(), seed=0, control=units)
    theirs = reference_latents(root, paths[:n], images, **case)
    plain = sd.generate(PROMPT, NEGATIVE, steps=8, guidance_scale=6.0, sampler="ddim", eta=0.0, width=32, height=32,
                        latents=initial_latents(), seed=0)
    assert max_rel_error(ours.latents, theirs) < TOL
    assert max_rel_error(plain.latents, theirs) > 1e-2  # the control changed the result


def test_modes_samplers_img2img_inpaint_and_hires_run(setup):
    root, paths = setup
    sd = torchsd.load_pipeline(root / "model", dtype=torch.float32)
    unit = ControlUnit(image=hint_image(0, 48), model=paths[0], module="canny", threshold_a=50, threshold_b=120)
    base = dict(steps=4, width=32, height=32, seed=1)
    results = {}
    for mode in ("balanced", "prompt", "control"):
        results[mode] = sd.generate(PROMPT, NEGATIVE, control=[dataclasses.replace(unit, control_mode=mode)],
                                    **base).latents
    assert max_rel_error(results["prompt"], results["balanced"]) > 1e-3
    assert max_rel_error(results["control"], results["prompt"]) > 1e-3
    edited = sd.generate("a [cat:dog:0.5]", NEGATIVE, control=[dataclasses.replace(unit, control_mode="control")],
                         **base)  # prompt editing's own guidance calls the controlled model
    plain_edit = sd.generate("a [cat:dog:0.5]", NEGATIVE, **base)
    assert max_rel_error(edited.latents, plain_edit.latents) > 1e-3
    for sampler in ("euler_a", "heun", "dpm2", "dpmpp_2m"):
        out = sd.generate(PROMPT, NEGATIVE, sampler=sampler, control=[unit], **base)
        assert torch.isfinite(out.latents).all()
    init = hint_image(5)
    out = sd.generate(PROMPT, init_image=init, strength=0.6, control=[unit], **base)
    assert torch.isfinite(out.latents).all()
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = sd.generate(PROMPT, init_image=init, mask=mask, strength=0.8, control=[unit], **base)
    assert out.images[0].size == (32, 32)
    out = sd.generate(PROMPT, hires=True, hires_scale=1.5, hires_steps=2, control=[unit], **base)
    assert out.images[0].size == (48, 48)
    assert 'ControlNet 0: "Module: canny, Model: cn3, Weight: 1' in out.infotexts[0]
    hires = {}
    for option in ("Both", "low", "high"):
        hires[option] = sd.generate(PROMPT, hires=True, hires_scale=1.5, hires_steps=2,
                                    control=[dataclasses.replace(unit, hires_option=option)], **base)
    plain = sd.generate(PROMPT, hires=True, hires_scale=1.5, hires_steps=2, **base)
    assert torch.equal(hires["Both"].latents, out.latents)
    assert len({tuple(r.latents.flatten()[:8].tolist()) for r in (*hires.values(), plain)}) == 4
    assert "Hr Option: Low res only" in hires["low"].infotexts[0]
    from torchsd.pipeline.features.control import CONTROL
    from torchsd.pipeline.infotext import parse_infotext

    (back,) = CONTROL.from_infotext(parse_infotext(hires["high"].infotexts[0]))["control"]
    assert back.normalised().hires_option == "High res only"


def test_infotext_reads_back():
    from torchsd.pipeline.features.control import CONTROL
    from torchsd.pipeline.infotext import parse_infotext

    text = ('a cat\nSteps: 4, Sampler: DDIM, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], '
            'Weight: 0.8, Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 100, '
            'Threshold B: 200, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, Control Mode: '
            'ControlNet is more important", Version: x')
    (unit,) = CONTROL.from_infotext(parse_infotext(text))["control"]
    assert unit.model == "control_v11p_sd15_canny [d14c016b]" and unit.weight == 0.8
    assert (unit.guidance_start, unit.guidance_end, unit.threshold_a) == (0.1, 0.9, 100.0)
    assert unit.control_mode == "ControlNet is more important" and unit.module == "canny"


def test_resize_modes_and_bad_units():
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    assert fit_image(image, 32, 32, "Just Resize").getpixel((0, 0)) == (255, 255, 255)
    assert fit_image(image, 32, 32, "Crop and Resize").getpixel((0, 0)) == (255, 255, 255)
    assert fit_image(image, 32, 32, "Resize and Fill").getpixel((0, 0)) == (0, 0, 0)  # padded
    with pytest.raises(ValueError, match="control mode"):
        ControlUnit(image=image, model="x", control_mode="loud").normalised()
    with pytest.raises(ValueError, match="0 <= start <= end <= 1"):
        ControlUnit(image=image, model="x", guidance_start=0.8, guidance_end=0.2).normalised()
    with pytest.raises(ValueError, match="needs a model"):
        ControlUnit(image=image).normalised()
    with pytest.raises(ValueError, match="unknown ControlNet preprocessor"):
        ControlUnit(image=image, model="x", module="openpose").normalised()


def test_canny_finds_the_edges_of_a_square():
    from torchsd.pipeline.features.control_detect import canny

    image = Image.new("L", (32, 32), 0)
    image.paste(255, (8, 8, 24, 24))
    edges = canny(image, 100, 200)
    assert edges[16, 7:10].sum() >= 1 and edges[16, 12:20].sum() == 0 and edges[0:4].sum() == 0


def test_controlnet_is_more_important_leaves_the_unconditional_rows_alone():
    """Guess mode: with the context's first row unconditional, that row's prediction is the plain model's."""
    from test_controlnet import random_controlnet
    from torchsd.diffusion.control import ControlInput, ControlledDenoiser

    sd = random_pipeline("sd1")
    net = random_controlnet(sd, 3, hint_widths=(16, 32))
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 4, 8, 8, generator=gen), torch.rand(1, 3, 16, 16, generator=gen)
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    sigmas = torch.tensor([10.0, 0.0])
    scales = [1.0] * (len(net.controlnet_down_blocks) + 1)
    with torch.no_grad():
        plain = sd.denoiser(x, 10.0, context)
        guess = ControlledDenoiser(sd.denoiser, [ControlInput(net, hint, scales, cond_only=True)], sigmas)
        balanced = ControlledDenoiser(sd.denoiser, [ControlInput(net, hint, scales)], sigmas)
        out, both = guess(x, 10.0, context, uncond_rows=1), balanced(x, 10.0, context, uncond_rows=1)
    assert torch.allclose(out[0], plain[0], atol=1e-6) and not torch.allclose(out[1], plain[1], atol=1e-3)
    assert torch.allclose(out[1], both[1], atol=1e-6) and not torch.allclose(both[0], plain[0], atol=1e-3)


def test_calls_are_counted_in_the_step_whose_interval_holds_their_sigma():
    from torchsd.diffusion.control import ControlledDenoiser

    d = ControlledDenoiser(random_pipeline("sd1").denoiser, [], torch.tensor([10.0, 5.0, 2.0, 0.0]))
    assert [d.step_of(s) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.03)] == [0, 0, 1, 1, 2, 2, 2]


def test_combinations_that_cannot_work_are_refused():
    sd = random_pipeline("sd1")
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="set deep_cache_interval to 1"):
        sd.generate("a", steps=2, control=[ControlUnit(image=image, model="x")], deep_cache_interval=2)
    with pytest.raises(ValueError, match="set tome_ratio to 0"):
        sd.generate("a", steps=2, ip_adapter_image=image, ip_adapter_model="x", tome_ratio=0.5)
