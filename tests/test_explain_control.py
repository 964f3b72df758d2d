"""`torchsd explain` with a ControlNet unit: a figure of the residuals per level, whose numbers are the
residuals the ControlNet computes when called directly on the U-Net's inputs."""

import pytest
import torch
from PIL import Image

from reference import random_pipeline
from test_controlnet import random_controlnet
from torchsd import cli
from torchsd.checkpoints.controlnet import load_controlnet
from torchsd.checkpoints.diffusers import to_diffusers_keys
from torchsd.pipeline import GenerationRequest
from torchsd.pipeline.features.control import ControlUnit, control_map, hint_tensor

pytest.importorskip("matplotlib")  # the `explain` extra; listed in `make setup`

from torchsd.explain.report import control_section, write_report  # noqa: E402
from torchsd.explain.trace import explain, skip_labels  # noqa: E402

SIZE = 32
WEIGHT = 0.7


def hint() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    image.paste((255, 255, 255), (18, 18, 30, 30))
    return image


@pytest.fixture(scope="module")
def sd():
    return random_pipeline(seed=0)


@pytest.fixture(scope="module")
def controlnet_file(sd, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("cn") / "tiny-cn.safetensors"
    net = random_controlnet(sd, seed=5, hint_widths=(16, 32))
    save_file({k: v.contiguous() for k, v in to_diffusers_keys(net.state_dict(), "unet").items()}, str(path))
    return path


def test_residual_figure_numbers_are_the_controlnets_own(sd, controlnet_file, tmp_path):
    unit = ControlUnit(image=hint(), model=controlnet_file, weight=WEIGHT)
    request = GenerationRequest("a red circle", steps=3, seed=1, width=SIZE, height=SIZE, guidance_scale=5.0,
                                sampler="euler", control=(unit,))
    calls = []  # the U-Net's own inputs, seen beside explain's hook
    handle = sd.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[:3]), with_kwargs=True)
    try:
        e = explain(sd, request, snapshots=2)
    finally:
        handle.remove()
    record = e.control
    assert record is not None and len(calls) == len(record.timesteps) == 3  # one guided call per Euler step
    assert record.labels == skip_labels(sd.unet) + ["mid"]
    assert len(record.labels) == 1 + len(sd.unet.config.channel_mult) * (sd.unet.config.num_res_blocks + 1)

    # directly: the ControlNet on the inputs the U-Net got, scaled by the weight, the prompt's (last) row
    net = load_controlnet(controlnet_file, sd.config.unet)
    direct_hint = hint_tensor(control_map(unit.normalised(), SIZE, SIZE))
    with torch.no_grad():
        for c, (x, t, context) in enumerate(calls):
            down, mid = net(x, t, context, direct_hint)
            direct = torch.stack([(r * WEIGHT)[-1].abs().mean() for r in [*down, mid]])
            assert torch.allclose(record.means[c], direct, rtol=1e-5, atol=1e-7), (c, record.means[c], direct)
            assert float(t.flatten()[0]) == record.timesteps[c]
    assert all(m.ndim == 2 for m in record.maps)
    assert torch.allclose(torch.stack([m.mean() for m in record.maps]), record.means.mean(dim=0), rtol=1e-5)
    level_means = record.level_means()
    assert list(level_means) == [f"level {i}" for i in range(len(sd.unet.config.channel_mult))] + ["mid"]

    # the figure draws those numbers: the bars are the means over the calls
    section = control_section(e)
    bars = [patch.get_height() for patch in section.figure.axes[0].patches]
    assert bars == pytest.approx(record.means.mean(dim=0).tolist(), rel=1e-6)
    out = write_report([section], tmp_path / "control.png", "control")
    with Image.open(out) as image:
        assert image.width > 500 and image.height > 200


def test_no_control_no_section(sd):
    e = explain(sd, GenerationRequest("a red circle", steps=2, seed=1, width=SIZE, height=SIZE), snapshots=1)
    assert e.control is None and control_section(e) is None


def test_cli_writes_the_report_with_the_control_figure(sd, controlnet_file, tmp_path, capsys):
    folder = tmp_path / "model"
    sd.save(folder)
    hint().save(tmp_path / "hint.png")
    out = tmp_path / "explain.html"
    assert cli.main(["explain", "a red circle", "--model", str(folder), "--steps", "2", "--size", f"{SIZE}x{SIZE}",
                     "--control", str(tmp_path / "hint.png"), "--control-model", str(controlnet_file),
                     "--control-weight", "0.5", "--out", str(out)]) == 0
    page = out.read_text()
    assert "ControlNet: the residuals added to the U-Net, level by level" in page and "weight 0.5" in page
    assert cli.main(["explain", "a red circle", "--control", str(tmp_path / "hint.png")]) != 0
    assert "needs both --control IMAGE and --control-model" in capsys.readouterr().err
