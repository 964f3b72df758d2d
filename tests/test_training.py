"""Training: data, short runs that lower each loss, DDP equivalence, kill-and-resume equivalence."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchsd.checkpoints.clip import save_clip
from torchsd.checkpoints.components import load_clip, load_vae, save_component
from torchsd.training import presets
from torchsd.training.config import TrainConfig, read_toml, write_toml
from torchsd.training.data import COLORS, POSITIONS, SHAPES, EmojiDataset, ShapesDataset, build_dataset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


# --- data -------------------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_captioned():
    a, b = ShapesDataset(32, seed=3), ShapesDataset(32, seed=3)
    image, caption = a[17]
    assert torch.equal(image, b[17][0]) and caption == b[17][1]
    assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1
    spec, _ = a.spec(17)
    assert spec.shape in SHAPES and spec.position in POSITIONS and spec.color != spec.background
    assert spec.color in caption and spec.background + " background" in caption and spec.shape in caption


def test_shape_caption_grammar():
    from torchsd.training.data import ShapeSpec

    assert ShapeSpec("circle", "red", "top left", "blue").caption == "a red circle at the top left on a blue background"
    assert (ShapeSpec("square", "orange", "center", "white").caption
            == "an orange square in the center on a white background")


def test_emoji_dataset_or_clear_error(tmp_path):
    with pytest.raises(ValueError, match="apt-get install fonts-noto-color-emoji"):
        EmojiDataset(32, font_path=str(tmp_path / "missing.ttf"))
    if not Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").exists():
        pytest.fail("the Noto Color Emoji font is not installed: run `make setup`")
    image, caption = EmojiDataset(48, length=10)[3]
    assert image.shape == (3, 48, 48) and caption.endswith(" background") and caption.startswith(("a ", "an "))


def test_folder_manifest_and_tar_datasets(tmp_path):
    import json
    import tarfile

    from PIL import Image

    for i, color in enumerate(["red", "green"]):
        Image.new("RGB", (40, 30), COLORS[color]).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a {color} picture")
    folder = build_dataset(str(tmp_path), 16)
    assert len(folder) == 2 and folder[1][1] == "a green picture" and folder[1][0].shape == (3, 16, 16)
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": f"{i}.png", "caption": f"item {i}"}) for i in range(2)))
    assert build_dataset(str(manifest), 16)[0][1] == "item 0"
    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("0.png", "0.txt", "1.png", "1.txt"):
            tar.add(tmp_path / name, arcname=name)
    shards = build_dataset(str(tmp_path / "shard-*.tar"), 16)
    assert len(shards) == 2 and shards[0][1] == "a red picture"
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("nonexistent-thing", 16)


def test_config_toml_roundtrip_and_validation(tmp_path):
    config = TrainConfig(task="vae", steps=7, data="shapes+emoji", mixed_precision="bf16")
    write_toml(config, tmp_path / "run.toml")
    assert TrainConfig(**read_toml(tmp_path / "run.toml")) == config
    with pytest.raises(ValueError, match="resolution must be a multiple of 8"):
        TrainConfig(task="vae", resolution=30)
    with pytest.raises(ValueError, match="needs a base model"):
        TrainConfig(task="lora")


# --- short runs -------------------------------------------------------------------------------------

def small_config(tmp_path, task, **changes):
    values = dict(task=task, preset="tiny", resolution=32, dataset_size=64, batch_size=8, steps=30, lr=2e-3,
                  warmup_steps=1, output=str(tmp_path / task), checkpoint_every=1000, sample_every=1000,
                  log_every=1, ema_decay=0.0)
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def frozen_parts(tmp_path_factory):
    """A random tiny VAE and CLIP, saved as `torchsd train` would save them."""
    from torchsd.models.clip import CLIP
    from torchsd.models.vae import AutoencoderKL

    folder = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(0)
    vae = AutoencoderKL(presets.vae_config("tiny"))
    clip = CLIP(*presets.clip_configs("tiny"))
    save_component(folder / "vae.safetensors", "vae", vae, vae.config)
    save_clip(clip, folder / "clip.safetensors")
    return folder


def run_task(config):
    from torchsd.training.cli import make_task
    from torchsd.training.loop import run

    return run(config, make_task)


def fixed_loss(config, task_state=None):
    """The task's loss on one fixed batch at fixed randomness."""
    from torchsd.training.cli import make_task
    from torchsd.training.distributed import setup

    task = make_task(config, setup("cpu"))
    if task_state is not None:
        task.model.load_state_dict(task_state)
    data = task.dataset()
    items = [data[i] for i in range(16)]
    batch = ([i for i, _, _ in items], torch.stack([d for _, d, _ in items]), [c for _, _, c in items])
    with torch.no_grad():
        return float(task.loss(task.model, batch, step=123456)[0])


def trained_state(config):
    return torch.load(Path(config.output) / "state.pt", weights_only=True)["model"]


@pytest.mark.parametrize("task", ["vae", "clip"])
def test_short_run_lowers_the_loss(tmp_path, task):
    config = small_config(tmp_path, task, steps=40)
    before = fixed_loss(config)
    results = run_task(config)
    after = fixed_loss(config, trained_state(config))
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / task / f"{task}.safetensors").exists()
    assert list((tmp_path / task / "samples").glob("step-*.png"))
    assert "psnr" in results or "image_to_text_top1" in results


def test_short_unet_run_lowers_the_loss_and_exports_a_pipeline(tmp_path, frozen_parts):
    config = small_config(tmp_path, "unet", steps=40, vae=str(frozen_parts / "vae.safetensors"),
                          clip=str(frozen_parts / "clip.safetensors"), caption_dropout=0.0)
    before = fixed_loss(config)
    run_task(config)
    after = fixed_loss(config, trained_state(config))
    assert after < 0.8 * before, (before, after)
    import torchsd

    sd = torchsd.load_pipeline(tmp_path / "unet" / "model", dtype=torch.float32)
    assert sd.generate("a red circle", steps=2, seed=0).images[0].size == (32, 32)
    assert (tmp_path / "unet" / "latents.safetensors").exists()
    frozen = load_clip(frozen_parts / "clip.safetensors").text.state_dict()  # without --text-encoder-lr: as given
    assert all(torch.equal(v, frozen[k]) for k, v in sd.text_encoder.state_dict().items())


def test_text_encoder_lr_fine_tunes_the_text_encoder_beside_the_unet(tmp_path, frozen_parts):
    config = small_config(tmp_path, "unet", steps=30, vae=str(frozen_parts / "vae.safetensors"),
                          clip=str(frozen_parts / "clip.safetensors"), caption_dropout=0.0, text_encoder_lr=1e-3)
    before = fixed_loss(config)
    run_task(config)
    state = torch.load(Path(config.output) / "state.pt", weights_only=True)
    after = fixed_loss(config, state["model"])
    assert after < 0.8 * before, (before, after)
    unet_group, text_group = state["optimizer"]["param_groups"]
    assert (unet_group["initial_lr"], text_group["initial_lr"]) == (config.lr, 1e-3)
    import torchsd

    sd = torchsd.load_pipeline(tmp_path / "unet" / "model", dtype=torch.float32)
    frozen = load_clip(frozen_parts / "clip.safetensors").text.state_dict()
    changed = {k for k, v in sd.text_encoder.state_dict().items() if not torch.equal(v, frozen[k])}
    assert {"token_embedding.weight", "final_layer_norm.weight"} <= changed  # the exported encoder is the trained one
    assert sd.generate("a red circle", steps=2, seed=0).images[0].size == (32, 32)


def test_text_encoder_weights_the_context_never_reads_stay_frozen():
    import dataclasses

    from torchsd.models.clip import CLIPTextModel
    from torchsd.models.unet import UNet
    from torchsd.training.unet_task import UNetAndTextEncoder

    text_config = dataclasses.replace(presets.clip_configs("tiny")[0], with_projection=True, projection_dim=16)
    model = UNetAndTextEncoder(UNet(presets.unet_config("tiny", text_config.width, 4)), CLIPTextModel(text_config),
                               torch.tensor([[text_config.bos_token_id, text_config.eos_token_id]]))
    frozen = {name for name, p in model.text_encoder.named_parameters() if not p.requires_grad}
    assert frozen == {"text_projection.weight"}  # pooled-output only: no gradient reaches it from the context
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient behind


def test_text_encoder_lr_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="the lora task keeps it frozen"):
        TrainConfig(task="lora", model="bundled", text_encoder_lr=1e-5)
    with pytest.raises(ValueError, match="drop --fsdp"):
        TrainConfig(task="unet", model="bundled", text_encoder_lr=1e-5, fsdp=True)
    with pytest.raises(ValueError, match="0 .the text encoder stays frozen. or positive"):
        TrainConfig(task="unet", model="bundled", text_encoder_lr=-1.0)


def test_lora_run_lowers_the_loss_and_leaves_base_weights(tmp_path, frozen_parts):
    from safetensors.torch import load_file

    base = small_config(tmp_path, "unet", steps=1, vae=str(frozen_parts / "vae.safetensors"),
                        clip=str(frozen_parts / "clip.safetensors"))
    run_task(base)
    model = str(tmp_path / "unet" / "model")
    config = small_config(tmp_path, "lora", steps=40, model=model, lr=1e-2, lora_rank=4)
    before = fixed_loss(config)
    run_task(config)
    state = trained_state(config)
    after = fixed_loss(config, state)
    assert after < 0.97 * before, (before, after)  # only the attention projections learn
    lora = load_file(tmp_path / "lora" / "lora.safetensors")
    downs = [k for k in lora if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in downs)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in lora
    import torchsd

    original = torchsd.load_pipeline(model, dtype=torch.float32).unet.state_dict()
    bases = {k.replace(".base.", "."): v for k, v in state.items() if ".base." in k}
    assert bases and all(torch.equal(v, original[k]) for k, v in bases.items())


def test_output_folder_is_not_overwritten_without_resume(tmp_path):
    config = small_config(tmp_path, "vae", steps=1)
    run_task(config)
    with pytest.raises(ValueError, match="pass --resume"):
        run_task(config)


# --- distributed and faults ---------------------------------------------------------------------------

def cli(*args):
    return [sys.executable, "-m", "torchsd", "train", *args]


def unet_args(frozen_parts, output, steps, batch=8, extra=()):
    return ["unet", "--preset", "tiny", "--resolution", "32", "--dataset-size", "64", "--batch-size", str(batch),
            "--steps", str(steps), "--lr", "1e-3", "--warmup-steps", "1",
            "--vae", str(frozen_parts / "vae.safetensors"),
            "--clip", str(frozen_parts / "clip.safetensors"), "--output", str(output), "--sample-every", "1000",
            "--ema-decay", "0.9", *extra]


@pytest.mark.parametrize("extra, port", [((), 29517), (("--text-encoder-lr", "1e-3"), 29518)],
                         ids=["unet", "unet+text_encoder"])
def test_ddp_step_equals_single_process_step(tmp_path, frozen_parts, extra, port):
    single = tmp_path / "single"
    subprocess.run(cli(*unet_args(frozen_parts, single, 1, extra=extra)), check=True, env=ENV, timeout=600,
                   capture_output=True)
    ddp = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "torchsd", "train",
                           *unet_args(frozen_parts, ddp, 1, extra=extra)],
                          env=ENV, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "state.pt", weights_only=True)
    b = torch.load(ddp / "state.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    # The gradients themselves: after one step AdamW's first moment is (1 - beta1) * g, so comparing it compares
    # the all-reduced mean gradient with the single process's, up to float rounding of the reduction. (The
    # weights alone would not show a sum in place of the mean: one Adam step is scale-invariant.)
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys() and moments_a
    for i in moments_a:
        m_a, m_b = moments_a[i]["exp_avg"], moments_b[i]["exp_avg"]
        assert (m_a - m_b).abs().max() <= 1e-5 * m_a.abs().max() + 1e-12, i
    # and the weights: AdamW moves each by about lr * g / (|g| + eps), so where a gradient is as small as eps
    # the rounding above decides part of the step; all but a few agree to float precision
    diffs = torch.cat([(a["model"][k] - b["model"][k]).abs().flatten() for k in a["model"]])
    assert (diffs > 1e-7).float().mean() < 1e-3, float((diffs > 1e-7).float().mean())


# Runs `torchsd train` in a child that SIGKILLs itself halfway through writing its second checkpoint:
# steps 4-6 are lost, half a temporary file is left behind, and no cleanup runs. Killing it from outside
# by polling state.pt raced the run (8 tiny steps can finish between two polls).
KILL_IN_SECOND_CHECKPOINT = """
import os, signal, sys, torch
from torchsd.cli import main
save, saves = torch.save, []
def dying_save(obj, path, *args, **kwargs):
    saves.append(path)
    if len(saves) == 2:
        open(path, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, path, *args, **kwargs)
torch.save = dying_save
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_between_checkpoints_then_resume_equals_uninterrupted(tmp_path, frozen_parts):
    steps, every = 8, ["--checkpoint-every", "3"]
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    subprocess.run(cli(*unet_args(frozen_parts, reference, steps, extra=every)),
                   check=True, env=ENV, timeout=600, capture_output=True)
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_CHECKPOINT, "train",
                             *unet_args(frozen_parts, victim, steps, extra=every)],
                            env=ENV, timeout=600, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert torch.load(victim / "state.pt", weights_only=True)["step"] == 3
    assert list(victim.glob(".state.pt.*.tmp")), "the kill landed in the middle of writing a checkpoint"
    subprocess.run(cli(*unet_args(frozen_parts, victim, steps, extra=[*every, "--resume"])),
                   check=True, env=ENV, timeout=600, capture_output=True)
    a = torch.load(reference / "state.pt", weights_only=True)
    b = torch.load(victim / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert not list(victim.glob(".state.pt.*.tmp")), "the resumed run left a temporary checkpoint file behind"


def test_artifacts_refuse_the_wrong_kind(frozen_parts):
    from torchsd.checkpoints.io import CheckpointError

    assert load_vae(frozen_parts / "vae.safetensors").config == presets.vae_config("tiny")
    assert load_clip(frozen_parts / "clip.safetensors").text.config == presets.clip_configs("tiny")[0]
    with pytest.raises(CheckpointError, match="expected a vae"):  # a CLIP file is no autoencoder
        load_vae(frozen_parts / "clip.safetensors")


def test_vae_patch_discriminator_joins_after_warm_up(tmp_path):
    import csv

    config = small_config(tmp_path, "vae", steps=4, disc_start=2, log_every=1)
    run_task(config)
    rows = list(csv.DictReader(open(tmp_path / "vae" / "metrics.csv")))
    assert len(rows) == 4 and float(rows[0]["g_loss"]) == 0.0 and float(rows[-1]["g_loss"]) != 0.0
    state = torch.load(tmp_path / "vae" / "state.pt", weights_only=True)
    assert state["task"]["discriminator"], "the discriminator's weights are checkpointed for --resume"


def test_lr_warms_up_holds_then_decays_to_zero_at_the_last_step():
    from torchsd.training.loop import lr_factor

    config = TrainConfig(task="vae", steps=100, warmup_steps=10, decay_steps=20)
    factors = [lr_factor(config, s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[79] == 1.0 and factors[80] == 1.0
    assert factors[90] == pytest.approx(0.5) and factors[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # never rises after warm-up
    assert lr_factor(TrainConfig(task="vae", steps=100, warmup_steps=10), 99) == 1.0  # no decay: constant
    with pytest.raises(ValueError, match="decay_steps must be between 0 and steps"):
        TrainConfig(task="vae", steps=100, decay_steps=101)


def test_clip_fine_tune_starts_from_the_given_clip(tmp_path, frozen_parts):
    """`train clip --clip FILE` fine-tunes that CLIP (the task starts from its weights), and refuses
    a resolution its image tower does not read."""
    config = small_config(tmp_path, "clip", steps=1, clip=str(frozen_parts / "clip.safetensors"))
    from torchsd.training.cli import make_task
    from torchsd.training.distributed import setup

    task = make_task(config, setup("cpu"))
    given = load_clip(frozen_parts / "clip.safetensors").state_dict()
    assert all(torch.equal(v.float(), given[k].float()) for k, v in task.model.clip.state_dict().items())
    assert all(p.requires_grad for p in task.model.parameters())
    with pytest.raises(ValueError, match="train at --resolution 32"):
        make_task(small_config(tmp_path, "clip", steps=1, clip=str(frozen_parts / "clip.safetensors"),
                               resolution=64), setup("cpu"))
