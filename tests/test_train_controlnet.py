"""``torchsd train controlnet``: a ControlNet learns on (image, control image, caption) beside a frozen U-Net."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchsd.checkpoints.clip import save_clip
from torchsd.checkpoints.components import save_component
from torchsd.training import presets
from torchsd.training.config import TrainConfig
from torchsd.training.data import COLORS, ShapesDataset, build_control_dataset, reposition_caption


def small_config(tmp_path, task, **changes):
    values = dict(task=task, preset="tiny", resolution=32, dataset_size=64, batch_size=8, steps=30, lr=2e-3,
                  warmup_steps=1, output=str(tmp_path / task), checkpoint_every=1000, sample_every=1000,
                  log_every=1, ema_decay=0.0)
    values.update(changes)
    return TrainConfig(**values)


def run_task(config):
    from torchsd.training.cli import make_task
    from torchsd.training.loop import run

    return run(config, make_task)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny pipeline (random VAE and CLIP, a U-Net trained for 20 steps) saved as a diffusers folder."""
    from torchsd.models.clip import CLIP
    from torchsd.models.vae import AutoencoderKL

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    vae = AutoencoderKL(presets.vae_config("tiny"))
    clip = CLIP(*presets.clip_configs("tiny"))
    save_component(folder / "vae.safetensors", "vae", vae, vae.config)
    save_clip(clip, folder / "clip.safetensors")
    config = small_config(folder, "unet", steps=20, vae=str(folder / "vae.safetensors"),
                          clip=str(folder / "clip.safetensors"))
    run_task(config)
    return folder / "unet" / "model"


def fixed_loss(task, state=None) -> float:
    from torchsd.training.loop import collate

    if state is not None:
        task.model.load_state_dict(state)
    data = task.dataset()
    with torch.no_grad():
        return float(task.loss(task.model, collate([data[i] for i in range(16)]), step=123456)[0])


def test_shape_masks_match_the_images_and_captions_can_move():
    shapes = ShapesDataset(32, length=8, seed=3)
    masks = build_control_dataset("shapes", 32, 32, seed=3, length=8)
    for i in range(8):
        image, _ = shapes[i]
        mask = masks[i]
        assert mask.shape == (3, 32, 32) and 0 <= mask.min() and mask.max() <= 1
        spec, _ = shapes.spec(i)
        background = torch.tensor(COLORS[spec.background], dtype=torch.float32)
        pixels = ((image + 1) * 127.5).permute(1, 2, 0)
        drawn = (pixels - background).abs().sum(-1) > 60  # pixels away from the background colour: the shape
        assert ((mask[0] > 0.5) == drawn).float().mean() > 0.97
    caption = "a red circle at the top left on a blue background"
    moved = reposition_caption(caption, random.Random(0))
    assert moved != caption and moved.startswith("a red circle ") and moved.endswith(" on a blue background")
    assert reposition_caption("a strawberry on a red background", random.Random(0)) == \
        "a strawberry on a red background"


def test_control_data_needs_pairs(tmp_path):
    with pytest.raises(ValueError, match="needs paired data"):
        build_control_dataset("emoji", 32, 32)
    Image.new("RGB", (40, 32), "red").save(tmp_path / "a.png")
    Image.new("L", (40, 32), 255).save(tmp_path / "a_edges.png")
    rows = [{"image": "a.png", "conditioning_image": "a_edges.png", "text": "red"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    controls = build_control_dataset(str(tmp_path / "m.jsonl"), 32, 32)
    assert controls[0].shape == (3, 32, 32) and torch.all(controls[0] == 1)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png"}))
    with pytest.raises(ValueError, match="no 'control'"):
        build_control_dataset(str(tmp_path / "bad.jsonl"), 32, 32)
    with pytest.raises(ValueError, match="needs the model it steers"):
        TrainConfig(task="controlnet")


def test_controlnet_run_lowers_the_loss_changes_only_the_controlnet_and_saves_a_loadable_file(tmp_path, tiny_model):
    import torchsd
    from torchsd.checkpoints.controlnet import load_controlnet
    from torchsd.training.cli import make_task
    from torchsd.training.distributed import setup

    config = small_config(tmp_path, "controlnet", steps=80, model=str(tiny_model), caption_dropout=0.5,
                          position_noise=0.3, lr=1e-3)
    task = make_task(config, setup("cpu"))
    assert not any(p.requires_grad for p in task.unet.parameters())
    unet_before = {k: v.clone() for k, v in task.unet.state_dict().items()}
    # a fresh ControlNet adds nothing: the loss is the U-Net's own
    from torchsd.training.loop import collate
    from torchsd.training.losses import denoising_loss, draw, per_sample_generators

    batch = collate([task.dataset()[i] for i in range(16)])
    with torch.no_grad():
        controlled = float(task.loss(task.model, batch, step=5)[0])
        generators = per_sample_generators(config.seed, 5, batch[0])
        z0 = task.latents(batch[1], generators)
        # the same captions as task.loss draws (dropout and position noise from the same generators)
        drop = draw(generators, (), kind="rand") < config.caption_dropout
        moved = draw(generators, (), kind="rand") < config.position_noise
        captions = [reposition_caption(c, random.Random(config.seed * 7919 + 5 * 104_729 + i)) if m else c
                    for c, m, i in zip(batch[3], moved.tolist(), batch[0])]
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        plain = float(denoising_loss(task.unet, z0, task.context(captions)[0], task.alphas_cumprod, generators,
                                     task.prediction_type, config.min_snr_gamma))
    assert controlled == pytest.approx(plain, rel=1e-6)

    before = fixed_loss(task)
    run_task(config)
    state = torch.load(Path(config.output) / "state.pt", weights_only=True)["model"]
    assert all(k.startswith(("conv_in", "time_embedding", "down_blocks", "mid_block", "controlnet_")) for k in state)
    after = fixed_loss(make_task(config, setup("cpu")), state)
    assert after < 0.97 * before, (before, after)
    assert any(v.abs().max() > 0 for k, v in state.items() if k.startswith("controlnet_down_blocks"))
    # the U-Net it steers is the base model's, unchanged
    base = torchsd.load_pipeline(tiny_model, dtype=torch.float32).unet.state_dict()
    assert all(torch.equal(base[k], v) for k, v in unet_before.items())

    path = Path(config.output) / "controlnet.safetensors"
    net = load_controlnet(path, base_config := task.unet.config)
    assert net.config.unet == base_config and net.config.hint_widths == (16, 32)  # f = 2: one stride-2 conv
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert list((Path(config.output) / "samples").glob("step-*.png"))
    # and it steers the base model through the pipeline
    sd = torchsd.load_pipeline(tiny_model, dtype=torch.float32)
    from torchsd.pipeline.features.control import ControlUnit

    mask = Image.new("RGB", (32, 32))
    result = sd.generate("a red circle", steps=2, seed=0, control=[ControlUnit(image=mask, model=path)])
    assert result.images[0].size == (32, 32)


def test_sdxl_controlnet_reads_pooled_text_and_micro_conditioning_learns_and_steers_sdxl(tmp_path):
    """On a tiny SDXL base: the ControlNet and the U-Net get the same added vector y (bigG's pooled text beside
    the micro-conditioning), the loss falls, and the exported ControlNet steers an SDXL run."""
    import torchsd
    from sdxl_reference import random_sdxl
    from torchsd.checkpoints.controlnet import load_controlnet
    from torchsd.models.unet import added_vector
    from torchsd.pipeline.features.control import ControlUnit
    from torchsd.training.cli import make_task
    from torchsd.training.distributed import setup
    from torchsd.training.loop import collate
    from torchsd.training.losses import denoising_loss, draw, per_sample_generators

    random_sdxl("sdxl", seed=2).save(tmp_path / "xl")
    config = small_config(tmp_path, "controlnet", steps=30, model=str(tmp_path / "xl"), caption_dropout=0.5,
                          dataset_size=32, lr=1e-3, sample_every=0)  # (sampling: the SD 1.x test's)
    task = make_task(config, setup("cpu"))
    assert task.model.add_embedding is not None and not any(p.requires_grad for p in task.unet.parameters())
    batch = collate([task.dataset()[i] for i in range(8)])
    seen = {}
    hooks = [net.register_forward_pre_hook(lambda m, args, kwargs, n=name: seen.setdefault(n, (args, kwargs)),
                                           with_kwargs=True) for name, net in (("cn", task.model), ("unet", task.unet))]
    try:
        with torch.no_grad():
            controlled = float(task.loss(task.model, batch, step=5)[0])
    finally:
        for hook in hooks:
            hook.remove()
    y, unet_y = seen["cn"][1]["y"], seen["unet"][0][3]
    c = task.sd.config.unet
    assert y.shape == (8, c.added_embed_dim) and torch.equal(y, unet_y)
    # y = pooled text beside (original size, crop top-left, target size): shapes are drawn at 32x32, uncropped
    pooled = y[:, :c.pooled_dim]
    numbers = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 8)
    assert torch.equal(y, added_vector(pooled, numbers, c.micro_condition_dim))
    generators = per_sample_generators(config.seed, 5, batch[0])
    z0 = task.latents(batch[1], generators)  # the draws task.loss makes: latents, then caption dropout
    drop = draw(generators, (), kind="rand") < config.caption_dropout
    captions = ["" if d else caption for caption, d in zip(batch[3], drop.tolist())]
    assert 0 < drop.sum() < 8  # both kinds of rows in the batch, each with its own pooled text
    assert torch.allclose(pooled, task.context(captions)[1].float())
    with torch.no_grad():  # a fresh ControlNet adds nothing: the U-Net's own loss, with the same y
        plain = float(denoising_loss(task.unet, z0, task.context(captions)[0],
                                     task.alphas_cumprod, generators, task.prediction_type, config.min_snr_gamma,
                                     y=y))
    assert controlled == pytest.approx(plain, rel=1e-6)

    before = fixed_loss(task)
    run_task(config)
    state = torch.load(Path(config.output) / "state.pt", weights_only=True)["model"]
    after = fixed_loss(make_task(config, setup("cpu")), state)
    print(f"fixed-noise loss {before:.4f} -> {after:.4f}")
    assert after < 0.97 * before, (before, after)

    path = Path(config.output) / "controlnet.safetensors"
    net = load_controlnet(path, task.unet.config)
    assert net.add_embedding is not None and all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    sd = torchsd.load_pipeline(tmp_path / "xl", dtype=torch.float32)
    mask = Image.new("RGB", (32, 32))
    mask.paste((255, 255, 255), (16, 16, 30, 30))
    run = dict(steps=3, seed=0, width=32, height=32, guidance_scale=5.0)
    steered = sd.generate("a red circle", control=[ControlUnit(image=mask, model=path)], **run).latents
    plain_run = sd.generate("a red circle", **run).latents
    assert (steered - plain_run).abs().max() > 1e-3 * plain_run.abs().max()
