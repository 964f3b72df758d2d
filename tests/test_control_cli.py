"""ControlNet on the command line: repeatable --control flags, the infotext's ControlNet keys, and
``--from IMAGE`` reading them back (the hint image given again: an infotext holds no images)."""

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from reference import random_pipeline
from test_controlnet import random_controlnet
from torchsd.checkpoints.diffusers import to_diffusers_keys
from torchsd.cli import main
from torchsd.pipeline.infotext import read_png_infotext


def test_control_flags_infotext_and_from(tmp_path, capsys):
    sd = random_pipeline("sd1")
    sd.save(tmp_path / "model")
    (tmp_path / "cn").mkdir()
    for seed, name in ((3, "edges"), (4, "depth")):
        net = random_controlnet(sd, seed, hint_widths=(16, 32))
        save_file({k: v.contiguous() for k, v in to_diffusers_keys(net.state_dict(), "unet").items()},
                  str(tmp_path / "cn" / f"{name}.safetensors"))
    hint = Image.new("RGB", (48, 32))
    hint.paste((255, 255, 255), (10, 8, 30, 24))
    hint.save(tmp_path / "hint.png")
    common = ["--model", str(tmp_path / "model"), "--device", "cpu", "--control-dir", str(tmp_path / "cn")]
    args = ["generate", "a cat", "--steps", "3", "--size", "32x32", "--seed", "4",
            "--control", str(tmp_path / "hint.png"), "--control-model", "edges", "--control-weight", "0.7",
            "--control-preprocessor", "canny", "--control-mode", "prompt", "--control-end", "0.8",
            "--control-resize", "crop",
            "--control", str(tmp_path / "hint.png"), "--control-model", str(tmp_path / "cn" / "depth.safetensors"),
            "--control-weight", "0.5", "--control-resize", "fill", "--control-preprocessor", "none"]
    assert main([*args, "--output", str(tmp_path / "a.png"), *common]) == 0
    info = read_png_infotext(tmp_path / "a.png")
    assert ('ControlNet 0: "Module: canny, Model: edges, Weight: 0.7, Resize Mode: Crop and Resize, '
            'Guidance Start: 0, Guidance End: 0.8, Control Mode: My prompt is more important"') in info
    assert 'ControlNet 1: "Module: none, Model: depth, Weight: 0.5, Resize Mode: Resize and Fill' in info
    hint_args = ["--control", str(tmp_path / "hint.png"), "--control", str(tmp_path / "hint.png")]
    assert main(["generate", "--from", str(tmp_path / "a.png"), *hint_args, "--output", str(tmp_path / "b.png"),
                 *common]) == 0
    assert read_png_infotext(tmp_path / "b.png") == info
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    assert main(["generate", "a cat", "--steps", "3", "--size", "32x32", "--seed", "4", "--output",
                 str(tmp_path / "c.png"), *common]) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))
    capsys.readouterr()
    assert main(["generate", "a cat", "--control-model", "edges", "--output", str(tmp_path / "d.png"), *common]) == 2
    assert "give one --control IMAGE per unit" in capsys.readouterr().err
    assert main(["generate", "a cat", "--control", str(tmp_path / "hint.png"), "--control-model", "nope",
                 "--steps", "2", "--size", "32x32", "--output", str(tmp_path / "e.png"), *common]) == 2
    assert "ControlNet 'nope' not found" in capsys.readouterr().err
