"""`torchsd explain` with a ControlNet unit: a figure of the residuals per level, whose numbers are the
residuals the ControlNet computes when called directly on the U-Net's inputs; with a T2I-Adapter (SD 1.x and
SDXL) the same figure shows its features, whose numbers are the adapter's own output for the same hint; and an
SDXL ControlNet's, read with the added vector y the U-Net got."""

import pytest
import torch
from PIL import Image

from reference import random_pipeline
from sdxl_reference import random_sdxl
from test_controlnet import random_controlnet
from test_t2i_adapter import diffusers_adapter, random_adapter
from torchsd import cli
from torchsd.checkpoints.controlnet import load_controlnet
from torchsd.checkpoints.diffusers import to_diffusers_keys
from torchsd.pipeline import GenerationRequest
from torchsd.pipeline.features.control import ControlUnit, control_map, hint_tensor

pytest.importorskip("matplotlib")  # the `explain` extra; listed in `make setup`

from torchsd.explain.report import control_section, write_report  # noqa: E402
from torchsd.explain.trace import adapter_labels, explain, skip_labels  # noqa: E402

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


# --- T2I-Adapters: their features per level, SD 1.x's and SDXL's ------------------------------------------------

@pytest.fixture(scope="module")
def xl():
    return random_sdxl("sdxl", levels=3)  # SDXL's three levels, which its adapters are made for


def unet_calls(unet, run):
    """``run()``'s result and the U-Net's inputs at each call, seen beside explain's own hook."""
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        return run(), calls
    finally:
        handle.remove()


@pytest.mark.parametrize("family, labels", [
    ("sd1", ["level 0 res 1", "level 1 res 1"]),
    # SDXL's first level has no transformers: its feature goes after the downsampler; the fourth to the middle block
    ("sdxl", ["level 0 down", "level 1 res 1", "level 2 res 1", "mid"]),
])
def test_adapter_figure_numbers_are_the_adapters_own(family, labels, sd, xl, tmp_path):
    from torchsd.models.unet import level_residual_shapes

    model = sd if family == "sd1" else xl
    adapter = random_adapter(model)
    diffusers_adapter(adapter).save_pretrained(tmp_path / "adapter")  # as diffusers writes it
    # acts on the first two of three steps; "ControlNet is more important": on the prompt's rows only
    unit = ControlUnit(image=hint(), model=tmp_path / "adapter", weight=WEIGHT, guidance_end=0.67,
                       control_mode="control")
    request = GenerationRequest("a red circle", steps=3, seed=1, width=SIZE, height=SIZE, guidance_scale=5.0,
                                sampler="euler", control=(unit,))
    e, calls = unet_calls(model.unet, lambda: explain(model, request, snapshots=2))
    record = e.adapter
    assert e.control is None and record is not None and record.kind == "T2I-Adapter"
    assert len(calls) == 3 and len(record.timesteps) == 2  # the third step runs without the adapter
    assert record.timesteps == [float(args[1].flatten()[0]) for args, _ in calls[:2]]
    assert all(kwargs.get("level_residuals") is None for _, kwargs in calls[2:])
    assert record.labels == labels == adapter_labels(model.unet, len(labels))

    # directly: the adapter on the same hint, times the weight, the same at every call it acts on
    direct_hint = hint_tensor(control_map(unit.normalised(), SIZE, SIZE))
    with torch.no_grad():
        features = adapter(direct_hint)
    direct = torch.stack([(f * WEIGHT)[0].abs().mean() for f in features])
    for c in range(2):
        assert torch.allclose(record.means[c], direct, rtol=1e-5, atol=1e-7), (c, record.means[c], direct)
    # and where they act: the sizes of the places the U-Net adds level residuals, h / scale
    h = SIZE // model.config.vae.downscale_factor
    places = level_residual_shapes(model.config.unet)[:len(labels)]
    assert [tuple(m.shape) for m in record.maps] == [(h // scale, h // scale) for _, scale in places]
    assert record.units == [f"adapter (weight {WEIGHT:g})"]

    section = control_section(e)
    assert section.title == "T2I-Adapter: the features added to the U-Net, level by level"
    bars = [patch.get_height() for patch in section.figure.axes[0].patches]
    assert bars == pytest.approx(direct.tolist(), rel=1e-5)
    out = write_report([section], tmp_path / "adapter.png", "adapter")
    with Image.open(out) as image:
        assert image.width > 500 and image.height > 200


def test_a_controlnet_and_an_adapter_share_the_figure(sd, controlnet_file, tmp_path):
    diffusers_adapter(random_adapter(sd)).save_pretrained(tmp_path / "adapter")
    request = GenerationRequest("a red circle", steps=2, seed=1, width=SIZE, height=SIZE, sampler="euler",
                                control=(ControlUnit(image=hint(), model=controlnet_file, weight=0.5),
                                         ControlUnit(image=hint(), model=tmp_path / "adapter", weight=0.8)))
    e = explain(sd, request, snapshots=1)
    assert e.control.units == ["tiny-cn (weight 0.5)"] and e.adapter.units == ["adapter (weight 0.8)"]
    assert len(e.control.timesteps) == len(e.adapter.timesteps) == 2
    section = control_section(e)
    assert section.title == "ControlNet and T2I-Adapter: what they add to the U-Net, level by level"
    heights = [[p.get_height() for p in ax.patches] for ax in section.figure.axes if ax.patches]
    assert heights == [pytest.approx(e.control.means.mean(dim=0).tolist(), rel=1e-6),
                       pytest.approx(e.adapter.means.mean(dim=0).tolist(), rel=1e-6)]


def test_cli_sdxl_with_an_adapter_and_with_a_controlnet(xl, tmp_path, capsys):
    """Through the CLI on a saved SDXL model: the adapter's figure, and an SDXL ControlNet's, whose numbers are
    the ControlNet's own on the U-Net's inputs, its added vector y included."""
    folder = tmp_path / "xl"
    xl.save(folder)
    hint().save(tmp_path / "hint.png")
    diffusers_adapter(random_adapter(xl)).save_pretrained(tmp_path / "adapter")
    base = ["explain", "a red circle", "--model", str(folder), "--steps", "2", "--size", f"{SIZE}x{SIZE}",
            "--control", str(tmp_path / "hint.png")]
    out = tmp_path / "adapter.html"
    assert cli.main([*base, "--control-model", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    assert "T2I-Adapter: the features added to the U-Net, level by level" in out.read_text()

    net = random_controlnet(xl, seed=5, hint_widths=(16, 32))
    cn = tmp_path / "xl-cn.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_diffusers_keys(net.state_dict(), "unet").items()}, str(cn))
    unit = ControlUnit(image=hint(), model=cn, weight=WEIGHT)
    request = GenerationRequest("a red circle", steps=2, seed=1, width=SIZE, height=SIZE, guidance_scale=5.0,
                                sampler="euler", control=(unit,))
    e, calls = unet_calls(xl.unet, lambda: explain(xl, request, snapshots=1))
    assert e.adapter is None and len(e.control.timesteps) == len(calls) == 2
    direct_hint = hint_tensor(control_map(unit.normalised(), SIZE, SIZE))
    with torch.no_grad():
        for c, (args, kwargs) in enumerate(calls):
            x, t, context = args[:3]
            y = kwargs["y"] if "y" in kwargs else args[3]
            assert y.shape[0] == 2  # SDXL's y per context: its own pooled text for each CFG half
            down, mid = net(x, t, context, direct_hint, y=y)
            direct = torch.stack([(r * WEIGHT)[-1].abs().mean() for r in [*down, mid]])
            assert torch.allclose(e.control.means[c], direct, rtol=1e-5, atol=1e-7), (c, e.control.means[c], direct)
    out = tmp_path / "cn.png"
    assert cli.main([*base, "--control-model", str(cn), "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.width > 500 and image.height > 1000  # every section, the ControlNet's among them
