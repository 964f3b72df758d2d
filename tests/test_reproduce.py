"""Infotext round trip: generate, read the PNG's parameters back, generate again -> identical pixels;
``torchsd info`` (tEXt and iTXt) and ``torchsd generate --from IMAGE``."""

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from reference import random_pipeline
from torchsd.cli import main
from torchsd.pipeline import GenerationRequest
from torchsd.pipeline.infotext import read_png_infotext, request_fields, save_png


@pytest.fixture(scope="module")
def sd():
    return random_pipeline("sd1")


@pytest.fixture(scope="module")
def lora_dir(sd, tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("loras")
    gen = torch.Generator().manual_seed(0)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.randn(2, 64, generator=gen),
               f"{key}.lora_up.weight": torch.randn(32, 2, generator=gen)}, str(folder / "ink.safetensors"))
    return folder


def test_generate_read_back_generate_again_gives_identical_pixels(sd, lora_dir, tmp_path):
    sd.loras.dirs[:] = [lora_dir]
    request = GenerationRequest(
        prompt="a (red:1.2) [circle], " + " ".join(["tall"] * 80) + " BREAK at dawn <lora:ink:0.7>",
        negative_prompt="blurry, ((ugly))", steps=3, guidance_scale=6.5, seed=77, width=16, height=24,
        clip_skip=2, subseed=5, subseed_strength=0.35, seed_resize_from=(24, 16), hires=True, hires_scale=1.5,
        hires_steps=2, hires_strength=0.6, hires_upscaler="Latent (bicubic)", eta=0.0)
    first = sd.generate(request)
    save_png(first.images[0], tmp_path / "first.png", first.infotexts[0])

    fields = request_fields(read_png_infotext(tmp_path / "first.png"))
    again = sd.generate(GenerationRequest(**fields))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))
    assert again.infotexts[0] == first.infotexts[0]
    assert fields["clip_skip"] == 2 and fields["hires_upscaler"] == "Latent (bicubic)" and fields["width"] == 16


def test_info_command_reads_text_and_international_text_chunks(tmp_path, capsys):
    for name, prompt in (("ascii", "a red circle"), ("unicode", "ein Kreis über dem Meer, 日本")):
        text = f"{prompt}\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, Seed: 1, Size: 16x16"
        save_png(Image.new("RGB", (8, 8)), tmp_path / f"{name}.png", text)
        assert main(["info", str(tmp_path / f"{name}.png")]) == 0
        assert capsys.readouterr().out.strip() == text
    assert b"tEXtparameters" in (tmp_path / "ascii.png").read_bytes()
    assert b"iTXtparameters" in (tmp_path / "unicode.png").read_bytes()  # not ASCII: international text
    assert main(["info", str(tmp_path / "unicode.png"), "--json"]) == 0
    assert '"Seed": "1"' in capsys.readouterr().out


def test_info_on_a_png_without_parameters_fails_with_a_message(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["info", str(tmp_path / "plain.png")]) == 2
    assert "holds no generation parameters" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.png")]) == 2


def test_generate_from_image_reproduces_it_and_flags_override(sd, lora_dir, tmp_path):
    sd.save(tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--device", "cpu", "--lora-dir", str(lora_dir)]
    assert main(["generate", "a (blue:1.3) square", "--steps", "2", "--size", "16x16", "--seed", "9", "--subseed",
                 "3", "--subseed-strength", "0.5", "--lora", "ink:0.7", "--output", str(tmp_path / "a.png"),
                 *common]) == 0
    assert 'Lora hashes: "ink: ' in read_png_infotext(tmp_path / "a.png")
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png"), *common]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert read_png_infotext(tmp_path / "a.png") == read_png_infotext(tmp_path / "b.png")
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--seed", "10", "--output", str(tmp_path / "c.png"),
                 *common]) == 0
    info = read_png_infotext(tmp_path / "c.png")
    assert "Seed: 10," in info and info.startswith("a (blue:1.3) square <lora:ink:0.7>\n")
    assert "Variation seed: 3" in info


def test_generate_without_prompt_or_from_is_refused(capsys):
    assert main(["generate", "--steps", "2"]) == 2
    assert "give a PROMPT, or --from IMAGE" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("x\nSteps: many, Seed: 1", "infotext Steps: expected a number"),
    ("x\nSteps: 3, Size: big", "infotext Size: expected WIDTHxHEIGHT"),
])
def test_bad_infotext_values_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        request_fields(text)


def test_automatic1111_infotext_is_read(sd):
    text = ("masterpiece, (cat:1.2) <lora:ink:0.5>\nNegative prompt: lowres\nSteps: 20, Sampler: DDIM, "
            "Schedule type: Automatic, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
            "Model: v1-5, Denoising strength: 0.55, Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, "
            "Seed resize from: -1x-1, Lora hashes: \"ink: abcdef123456\", Version: v1.10.1")
    fields = request_fields(text)
    assert fields == {"prompt": "masterpiece, (cat:1.2) <lora:ink:0.5>", "negative_prompt": "lowres",
                      "steps": 20, "sampler": "DDIM", "guidance_scale": 7.0, "seed": 1234, "width": 512,
                      "height": 768, "clip_skip": 2, "hires": True, "hires_scale": 2.0, "hires_upscaler": "Latent",
                      "seed_resize_from": None, "hires_strength": 0.55}
    GenerationRequest(**fields)  # a valid request
