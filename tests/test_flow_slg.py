"""SD 3.5's skip-layer guidance: the final latents of diffusers' StableDiffusion3Pipeline with skip_guidance_layers
on the same tiny random weights; the option through the request, the CLI (and --from), the infotext and the
A1111 API; refused where it cannot act."""

import numpy as np
import pytest
import torch
from PIL import Image

import flow_reference as ref
import torchsd
from reference import max_rel_error
from torchsd.pipeline.infotext import parse_infotext, request_fields

RUN = dict(width=32, height=32, steps=6, seed=2, guidance_scale=4.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    work = tmp_path_factory.mktemp("slg")
    return ref.saved(ref.sd3_pipeline(work), work / "sd3")


@pytest.fixture(scope="module")
def pipe(folder):
    return torchsd.load_pipeline(folder, "cpu", torch.float32)


@pytest.mark.parametrize("layers,scale,start,stop", [((1,), 2.8, 0.01, 0.7), ((0,), 3.5, 0.2, 0.9)])
def test_final_latents_equal_stable_diffusion3_pipeline_with_skip_guidance_layers(folder, pipe, layers, scale,
                                                                                  start, stop):
    """6 steps: diffusers' window start * 6 < i < stop * 6 holds steps 1-4 (first case), 2-5 (second)."""
    from diffusers import StableDiffusion3Pipeline

    reference = StableDiffusion3Pipeline.from_pretrained(folder)
    with torch.no_grad():
        theirs = reference(prompt="a cat", negative_prompt="zebra", height=32, width=32, num_inference_steps=6,
                           guidance_scale=4.0, skip_guidance_layers=list(layers), skip_layer_guidance_scale=scale,
                           skip_layer_guidance_start=start, skip_layer_guidance_stop=stop,
                           generator=[torch.Generator().manual_seed(2)], output_type="latent").images
    mine = pipe.generate("a cat", "zebra", skip_guidance_layers=list(layers), skip_layer_guidance_scale=scale,
                         skip_layer_guidance_start=start, skip_layer_guidance_stop=stop, **RUN)
    plain = pipe.generate("a cat", "zebra", **RUN)
    assert max_rel_error(plain.latents, theirs) > 1e-3  # skipping the block changed the image
    assert max_rel_error(mine.latents, theirs) < 1e-4
    text = mine.infotexts[0]
    assert f'SLG layers: {layers[0]}, SLG scale: {scale:g}' in text and f"SLG stop: {stop:g}" in text


def test_a_window_without_steps_changes_nothing(pipe):
    """4 steps, stop 0.2: no step i with 0.04 < i < 0.8, as in diffusers (its defaults need more steps)."""
    run = {**RUN, "steps": 4}
    slg = pipe.generate("a cat", "zebra", skip_guidance_layers=[1], **run)
    assert torch.equal(slg.latents, pipe.generate("a cat", "zebra", **run).latents)


def test_infotext_cli_and_a1111_carry_the_options(folder, pipe, tmp_path):
    from torchsd.cli import main
    from torchsd.pipeline.features import A1111Fields, owner_of

    result = pipe.generate("a cat", "zebra", skip_guidance_layers=(0, 1), skip_layer_guidance_stop=0.5, **RUN)
    params = parse_infotext(result.infotexts[0])
    assert params["SLG layers"] == "0, 1" and params["SLG scale"] == "2.8" and params["SLG start"] == "0.01"
    fields = request_fields(result.infotexts[0])
    assert fields["skip_guidance_layers"] == (0, 1) and fields["skip_layer_guidance_stop"] == 0.5
    again = pipe.generate(**{**fields, "width": 32, "height": 32})
    assert torch.equal(again.latents, result.latents)

    model = ["--model", str(folder), "--dtype", "fp32", "--device", "cpu"]
    assert main(["generate", "a cat", "-n", "zebra", "--steps", "6", "--size", "32x32", "--seed", "2", "--cfg", "4",
                 "--slg-layers", "0,1", "--slg-stop", "0.5", "-o", str(tmp_path / "a.png"), *model]) == 0
    assert main(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), *model]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "ab")
    assert np.array_equal(a, b) and np.array_equal(a, np.asarray(result.images[0]))

    feature = owner_of("skip_guidance_layers")
    body = {"skip_guidance_layers": [7.0, 8, 9], "skip_layer_guidance_scale": 3, "skip_layer_guidance_start": None}
    assert feature.from_a1111(A1111Fields(body, img2img=False, width=None, height=None, decode_image=None)) == {
        "distilled_cfg_scale": None, "flow_shift": None, "skip_guidance_layers": [7, 8, 9],
        "skip_layer_guidance_scale": 3.0}


@pytest.mark.parametrize("options,message", [
    ({"skip_guidance_layers": [2]}, "joint blocks 0 to 1"),
    ({"skip_guidance_layers": [1], "guidance_scale": 1.0}, "guidance scale above 1"),
    ({"skip_guidance_layers": ["x"]}, "list of block numbers"),
    ({"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.5, "skip_layer_guidance_stop": 0.2},
     "0 <= start < stop <= 1"),
])
def test_bad_options_say_what_works(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("a cat", "zebra", **{**RUN, **options})


def test_flux_and_unet_models_refuse_it(tmp_path):
    flux = torchsd.load_pipeline(ref.saved(ref.flux_pipeline(tmp_path), tmp_path / "dev"), "cpu", torch.float32)
    with pytest.raises(ValueError, match="skip-layer guidance .* is SD 3.5's"):
        flux.generate("a cat", "zebra", skip_guidance_layers=[0], **RUN)
    with pytest.raises(ValueError, match="flow-matching models"):
        torchsd.load_pipeline(None, "cpu", torch.float32).generate("a cat", skip_guidance_layers=[0], steps=1,
                                                                     width=16, height=16)
