"""The bundled ControlNet: it ships beside the bundled model, loads by the name ``bundled`` through
checkpoints/controlnet.py, fits the bundled U-Net, and steers a generation from the command line."""

import random

import pytest
import torch
from PIL import Image

import torchsd
from torchsd import cli
from torchsd.checkpoints import bundled_controlnet_path, bundled_model_path
from torchsd.checkpoints.controlnet import load_controlnet
from torchsd.checkpoints.io import load_state_dict
from torchsd.pipeline.features.control import ControlUnit, control_models
from torchsd.training.data import ShapeSpec, render_shape


@pytest.fixture(scope="module")
def sd():
    return torchsd.load_pipeline(None, "cpu", torch.float32)


def mask() -> Image.Image:
    return render_shape(ShapeSpec("square", "white", "bottom right", "black"), 64, random.Random(0), mask=True)


def test_it_ships_small_and_loads_by_name(sd):
    path = bundled_controlnet_path()
    assert path.is_file() and path.parent == bundled_model_path().parent
    dtypes = [t.dtype for t in load_state_dict(path).values()]  # fp16; six deep 3x3 convs in fp8 to fit the budget
    assert set(dtypes) == {torch.float16, torch.float8_e5m2} and dtypes.count(torch.float8_e5m2) == 6
    assert sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file()) <= 32_000_000  # the assets' budget
    assert control_models(sd).resolve("bundled") == path
    net = load_controlnet(path, sd.config.unet)
    assert net.config.unet == sd.config.unet and net.config.hint_downscale == 4  # f = 4: hint at the image's size


def test_it_changes_the_picture_and_runs_from_the_command_line(sd, tmp_path):
    plain = sd.generate("a red square at the top left on a blue background", steps=4, seed=0).images[0]
    controlled = sd.generate("a red square at the top left on a blue background", steps=4, seed=0,
                             control=[ControlUnit(image=mask(), model="bundled")]).images[0]
    assert plain.tobytes() != controlled.tobytes()
    mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert cli.main(["generate", "a red square at the top left on a blue background", "--steps", "4", "--seed", "0",
                     "--control", str(tmp_path / "mask.png"), "--control-model", "bundled", "--output", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (64, 64) and "Model: bundled" in image.text["parameters"]
