"""Training SDXL with torchsd's trainer: both text encoders' conditioning as diffusers' SDXL training script
encodes captions, the micro-conditioning from the data, a kohya SDXL LoRA that torchsd and diffusers both
read, and FSDP2 (fully_shard): one sharded step on 2 processes (gloo, CPU) equals one single-process step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import torchsd
from reference import max_rel_error
from sdxl_reference import random_sdxl
from torchsd.models.unet import added_vector
from torchsd.training.cli import make_task
from torchsd.training.config import TrainConfig
from torchsd.training.distributed import setup
from torchsd.training.loop import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
PROMPT = "a red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-train") / "xl"
    random_sdxl("sdxl", seed=2).save(path)
    return path


def diffusers_xl(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_script_encode(pipe, captions):
    """diffusers' examples/text_to_image/train_text_to_image_sdxl.py ``encode_prompt``."""
    states = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
    return torch.cat(states, dim=-1), pooled


def test_captions_and_micro_conditioning_from_the_data(folder, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(images / "a.png")  # wide: scaled to 24x16, cropped 4 from the left
    (images / "a.txt").write_text(PROMPT)
    Image.new("RGB", (16, 40), (30, 30, 200)).save(images / "b.png")  # tall: cropped 12 from the top
    (images / "b.txt").write_text("a long caption " * 30)  # beyond 77 tokens: truncated as the script does
    config = TrainConfig(task="unet", model=str(folder), data=str(images), resolution=16, dataset_size=2,
                         output=str(tmp_path / "out"), batch_size=2)
    (tmp_path / "out").mkdir()
    task = make_task(config, setup("cpu"))
    task.dataset()  # cached latents, with each image's size and crop
    captions = [PROMPT, "a long caption " * 30, ""]
    context, pooled = task.context(captions)
    with torch.no_grad():
        expected_context, expected_pooled = training_script_encode(diffusers_xl(folder), captions)
    assert context.shape == (3, 77, 64 + 128)
    assert max_rel_error(context, expected_context) < 1e-5 and max_rel_error(pooled, expected_pooled) < 1e-5
    y = task.added_vector(pooled[:2], [0, 1])
    numbers = torch.tensor([[32, 48, 0, 4, 16, 16], [40, 16, 12, 0, 16, 16]], dtype=torch.float32)
    assert torch.equal(y, added_vector(pooled[:2], numbers, 256))
    loss, _ = task.loss(task.model, ([0, 1], torch.stack([task.dataset()[i][1] for i in (0, 1)]), captions[:2]), 0)
    assert torch.isfinite(loss)


def test_refiner_training_is_refused_with_its_fix(tmp_path):
    random_sdxl("sdxl_refiner", seed=1).save(tmp_path / "refiner")
    config = TrainConfig(task="unet", model=str(tmp_path / "refiner"), output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="train an SDXL base model"):
        make_task(config, setup("cpu"))


def test_sdxl_lora_is_read_by_torchsd_and_by_diffusers(folder, tmp_path):
    """A LoRA trained here, written in kohya's SDXL layout (original-layout names), applied by torchsd's
    <lora:> and by diffusers' load_lora_weights: the same latents, and not those of the base model."""
    from safetensors import safe_open

    config = TrainConfig(task="lora", model=str(folder), resolution=32, dataset_size=4, batch_size=4, steps=3,
                         lr=3e-2, lora_rank=4, lora_alpha=16.0, warmup_steps=1, sample_every=0,
                         output=str(tmp_path / "lora"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(config, make_task, device="cpu")
    finally:
        torch.set_num_threads(threads)
    path = tmp_path / "lora" / "lora.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_out_0.alpha" in keys
    assert all(k.startswith("lora_unet_") and "down_blocks" not in k for k in keys)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"

    (tmp_path / "loras").mkdir()
    path.rename(tmp_path / "loras" / "trained.safetensors")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    sd = torchsd.load_pipeline(folder, dtype=torch.float32, lora_dirs=[tmp_path / "loras"])
    options = dict(steps=3, guidance_scale=5.0, sampler="ddim", width=32, height=32, latents=latents, seed=0)
    ours = sd.generate(f"{PROMPT} <lora:trained:0.8>", "blurry", **options).latents
    without = sd.generate(PROMPT, "blurry", **options).latents
    pipe = diffusers_xl(folder)
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path / "loras" / "trained.safetensors"), adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[0.8])
    theirs = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, width=32, height=32,
                  latents=latents, output_type="latent").images
    assert max_rel_error(ours, theirs) < 1e-4
    assert max_rel_error(ours, without) > 1e-2


def train_args(folder, output, extra=()):
    return ["unet", "--model", str(folder), "--resolution", "32", "--dataset-size", "8", "--batch-size", "4",
            "--steps", "1", "--lr", "1e-3", "--warmup-steps", "1", "--output", str(output), "--sample-every", "0",
            "--ema-decay", "0.9", *extra]


def test_fsdp_step_equals_single_process_step(folder, tmp_path):
    """One step of SDXL fine-tuning sharded by FSDP2 over 2 processes (gloo on the CPU) against one
    single-process step on the same global batch: the mean gradient (AdamW's first moment), the weights and
    the EMA, all gathered whole into the checkpoint."""
    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "torchsd", "train", *train_args(folder, single)], env=ENV,
                          timeout=900, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = tmp_path / "fsdp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "torchsd", "train",
                           *train_args(folder, sharded, ["--fsdp"])], env=ENV, timeout=900, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(single / "state.pt", weights_only=True)
    b = torch.load(sharded / "state.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and a["ema"].keys() == b["ema"].keys()
    assert all(not type(v).__name__ == "DTensor" for v in b["model"].values())  # whole tensors
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert moments_a.keys() == moments_b.keys() and moments_a
    # (a gradient that is zero but for rounding, such as a bias before a GroupNorm's, is compared at the scale of
    # the largest one)
    scale = max(float(m["exp_avg"].abs().max()) for m in moments_a.values())
    for i in moments_a:
        m_a, m_b = moments_a[i]["exp_avg"], moments_b[i]["exp_avg"]
        assert m_a.shape == m_b.shape and (m_a - m_b).abs().max() <= 1e-5 * m_a.abs().max() + 1e-7 * scale, i
    # the weights and the EMA: AdamW's first step moves each weight by lr * g / (|g| + eps), so where a gradient is
    # near eps (or zero but for rounding) the rounding decides part of its step; everywhere else they agree
    names = list(a["model"])  # every U-Net tensor is a parameter the optimizer holds, in this order
    assert len(names) == len(moments_a)
    compared = 0
    for i, name in enumerate(names):
        real = moments_a[i]["exp_avg"].abs() > 0.1 * 100 * 1e-8  # |g| > 100 eps: AdamW's step is about lr * sign(g)
        compared += int(real.sum())
        for part in ("model", "ema"):
            excess = ((a[part][name] - b[part][name]).abs() - 3e-7 * a[part][name].abs())[real]  # a few ulps
            assert excess.numel() == 0 or float(excess.max()) < 1e-7, (part, name, float(excess.max()))
    assert compared > 0.5 * sum(v.numel() for v in a["model"].values()), compared
    # the exported pipeline is whole too
    exported = torchsd.load_pipeline(sharded / "model", dtype=torch.float32)
    assert exported.config.family == "sdxl"
    assert torch.equal(exported.unet.state_dict()["conv_in.weight"], b["ema"]["conv_in.weight"])
