"""Bad input gets a ValueError that says how to fix it; the CLI exits 2 and writes nothing."""

import math
import subprocess
import sys

import pytest
from PIL import Image

from reference import random_pipeline
from torchsd import GenerationRequest
from torchsd.cli import main
from torchsd.pipeline.infotext import parse_infotext, read_png_infotext


@pytest.mark.parametrize("fields, message", [
    ({"width": 500}, "multiple of 8; got 500 — try 496 or 504"),
    ({"height": 0}, "height must be between 8"),
    ({"steps": 0}, "steps must be between 1"),
    ({"strength": 1.5}, "strength must be between 0 and 1"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number"),
    ({"guidance_scale": math.inf}, "guidance_scale must be a finite number"),
    ({"sampler": "eulr"}, "unknown sampler 'eulr'"),
    ({"init_image": "/nonexistent/picture.png"}, "does not exist"),
    ({"batch_size": 0}, "batch_size must be between"),
    ({"seed": -3}, "seed must be a non-negative integer"),
])
def test_bad_requests_are_refused_with_a_fix(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GenerationRequest(prompt="x", **fields)


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        GenerationRequest(prompt="x", sampler="ddmi")
    assert "Valid samplers:" in str(err.value) and "ddim" in str(err.value)


def test_unreadable_init_image(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="not a readable image"):
        GenerationRequest(prompt="x", init_image=bad)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    random_pipeline("sd1").save(path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--size", "500x512"], "multiple of 8"),
    (["--steps", "0"], "steps must be between"),
    (["--sampler", "nope"], "unknown sampler"),
    (["--cfg", "nan"], "finite"),
])
def test_cli_refuses_bad_input_with_exit_2_and_no_file(model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "image.png"
    code = main(["generate", "a cat", "--model", str(model_dir), "--output", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_img2img_missing_image_exit_2(model_dir, tmp_path, capsys):
    code = main(["img2img", str(tmp_path / "missing.png"), "a cat", "--model", str(model_dir),
                 "--output", str(tmp_path / "o.png")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_generates_png_with_infotext(model_dir, tmp_path):
    out = tmp_path / "cat.png"
    code = main(["generate", "a cat, sitting", "-n", "dog", "--model", str(model_dir), "--steps", "3",
                 "--seed", "11", "--size", "32x32", "--output", str(out)])
    assert code == 0
    image = Image.open(out)
    assert image.size == (32, 32)
    info = parse_infotext(read_png_infotext(out))
    assert info["prompt"] == "a cat, sitting" and info["negative_prompt"] == "dog"
    assert info["Seed"] == "11" and info["Steps"] == "3" and info["Size"] == "32x32" and info["Sampler"] == "DDIM"


def test_cli_img2img_batch_writes_numbered_files(model_dir, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    code = main(["img2img", str(init), "a cat", "--model", str(model_dir), "--steps", "4", "--strength", "0.5",
                 "--batch", "2", "--seed", "3", "--output", str(tmp_path / "out.png")])
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("out-*.png")) == ["out-1.png", "out-2.png"]
    assert parse_infotext(read_png_infotext(tmp_path / "out-2.png"))["Seed"] == "4"


def test_console_script_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "torchsd", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "generate" in proc.stdout and "img2img" in proc.stdout


def test_same_seed_same_image_and_random_seed_reported():
    sd = random_pipeline("sd1")
    a = sd.generate("a cat", steps=2, seed=9, width=32, height=32)
    b = sd.generate("a cat", steps=2, seed=9, width=32, height=32)
    assert a.images[0].tobytes() == b.images[0].tobytes()
    c = sd.generate("a cat", steps=2, width=32, height=32)
    assert isinstance(c.seeds[0], int) and f"Seed: {c.seeds[0]}" in c.infotexts[0]


def test_infotext_roundtrip_quotes_awkward_values():
    from torchsd.pipeline.infotext import format_infotext

    text = format_infotext("a, b: c", "neg\nmulti", {"Steps": 20, "Model": "my, model: v2", "Seed": 5})
    parsed = parse_infotext(text)
    assert parsed["prompt"] == "a, b: c" and parsed["negative_prompt"] == "neg\nmulti"
    assert parsed["Model"] == "my, model: v2" and parsed["Steps"] == "20" and parsed["Seed"] == "5"
