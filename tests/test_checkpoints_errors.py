"""Hostile and broken files are refused by name, with a message that says what to do; nothing runs."""

import os
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import torchsd
from ldm_reference import original_checkpoint
from test_checkpoints_single_file import inferable_config
from torchsd.checkpoints.io import CheckpointError
from torchsd.cli import main


class RunsCode:
    """Unpickling this calls os.system: what a malicious .ckpt does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def random_bytes(size: int, seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).tolist())


@pytest.fixture(scope="module")
def sd1_state():
    return original_checkpoint(inferable_config("sd1"), seed=4)[0]


@pytest.mark.parametrize("container", ["torch.save", "plain-pickle"])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, sd1_state, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    payload = {"state_dict": dict(sd1_state), "callback": RunsCode(marker)}
    if container == "torch.save":
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
    else:  # a legacy (non-zip) checkpoint is a bare pickle stream
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(CheckpointError, match=r"refused to load: the pickle holds more than tensors \(it would "
                                              "import posix.system: run code") as err:
        torchsd.load_pipeline(path, dtype=torch.float32)
    assert "weights_only=False" not in str(err.value) and "safetensors" in str(err.value)
    assert not marker.exists()
    # the CLI says the same in one line, exit 2
    assert main(["generate", "x", "--model", str(path), "--output", str(tmp_path / "o.png")]) == 2
    assert not marker.exists() and not (tmp_path / "o.png").exists()


def test_truncated_and_corrupt_files(tmp_path, sd1_state):
    whole = tmp_path / "whole.safetensors"
    save_file(sd1_state, str(whole))
    data = whole.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "header-only.safetensors": data[:64],
        "garbage.safetensors": random_bytes(4096, seed=1),
        "text.safetensors": b"this is a README, not weights\n" * 20,
    }
    ckpt = tmp_path / "whole.ckpt"
    torch.save({"state_dict": sd1_state}, ckpt)
    cases["truncated.ckpt"] = ckpt.read_bytes()[: ckpt.stat().st_size // 2]
    cases["garbage.ckpt"] = random_bytes(4096, seed=2)
    cases["pickle-of-other-things.ckpt"] = pickle.dumps(RunsCode(tmp_path / "pwned"), protocol=5)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
            torchsd.load_pipeline(tmp_path / name, dtype=torch.float32)
        assert name in str(err.value)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        torchsd.load_pipeline(tmp_path / "empty.ckpt", dtype=torch.float32)
    (tmp_path / "model.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint type '\.txt'; expected \.safetensors"):
        torchsd.load_pipeline(tmp_path / "model.txt", dtype=torch.float32)


@pytest.mark.parametrize("tensors, message", [
    ({"foo.weight": torch.zeros(2)}, "not a Stable Diffusion checkpoint: it has no model.diffusion_model"),
    ({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, "this is a LoRA"),
    ({"emb_params": torch.zeros(2, 8)}, "textual-inversion embedding"),
    ({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, "holds only an autoencoder.*--vae"),
    ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "component of a diffusers folder"),
], ids=["unrelated", "lora", "embedding", "vae", "diffusers-component"])
def test_files_that_are_not_model_checkpoints(tmp_path, tensors, message):
    path = tmp_path / "thing.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=message):
        torchsd.load_pipeline(path, dtype=torch.float32)


def test_pickle_without_tensors(tmp_path):
    path = tmp_path / "notes.ckpt"
    torch.save({"epoch": 3, "note": "no weights here"}, path)
    with pytest.raises(CheckpointError, match="holds no tensors; it is not a model checkpoint"):
        torchsd.load_pipeline(path, dtype=torch.float32)


@pytest.mark.parametrize("extra, message", [
    ({"first_stage_model.quantize.embedding.weight": torch.zeros(16, 4)}, "a VQ autoencoder"),
    ({"control_model.time_embed.0.weight": torch.zeros(4, 4)}, "a ControlNet"),
    ({"depth_model.model.pretrained.act_postprocess1.0.project.0.weight": torch.zeros(2)}, "depth-to-image"),
], ids=["vq", "controlnet", "depth"])  # SDXL is read since issue 20 (tests/test_sdxl_files.py)
def test_unsupported_families_are_refused_by_name(tmp_path, sd1_state, extra, message):
    path = tmp_path / "other.safetensors"
    save_file(dict(sd1_state) | extra, str(path))
    with pytest.raises(CheckpointError, match=message + ".*torchsd runs Stable Diffusion 1.x and 2.x"):
        torchsd.load_pipeline(path, dtype=torch.float32)


@pytest.mark.parametrize("channels, message", [
    (8, "InstructPix2Pix model \\(a U-Net with 8 input channels\\)"),
    (5, "do not make a Stable Diffusion 1.x model torchsd runs.*in_channels 5 must be the VAE's latent channels"),
])
def test_unknown_input_channels_are_refused(tmp_path, sd1_state, channels, message):
    state = dict(sd1_state)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(state[key].shape[0], channels, 3, 3)
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        torchsd.load_pipeline(tmp_path / "other.safetensors", dtype=torch.float32)


def test_missing_keys_are_named_with_the_likely_cause(tmp_path, sd1_state):
    state = dict(sd1_state)
    del state["model.diffusion_model.middle_block.2.out_layers.3.weight"]
    del state["first_stage_model.decoder.mid.attn_1.q.bias"]
    save_file(state, str(tmp_path / "pruned.safetensors"))
    with pytest.raises(CheckpointError) as err:
        torchsd.load_pipeline(tmp_path / "pruned.safetensors", dtype=torch.float32)
    text = str(err.value)
    assert "2 missing (first: model.diffusion_model.middle_block.2.out_layers.3.weight, " \
           "first_stage_model.decoder.mid.attn_1.q.bias)" in text
    assert "truncated, was pruned of part of the model" in text


def test_unexpected_keys_are_named(tmp_path, sd1_state):
    state = dict(sd1_state) | {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.lora.weight":
                               torch.zeros(2, 2)}
    save_file(state, str(tmp_path / "extra.safetensors"))
    expected = (r"1 unexpected \(first: model\.diffusion_model\.input_blocks\.1\.1\."
                r"transformer_blocks\.0\.attn1\.lora\.weight\) — the file holds a variant")
    with pytest.raises(CheckpointError, match=expected):
        torchsd.load_pipeline(tmp_path / "extra.safetensors", dtype=torch.float32)


def test_wrong_shape_is_named(tmp_path, sd1_state):
    state = dict(sd1_state)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    state[key] = torch.zeros(32, 65)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=f"{key} has shape \\(32, 65\\) but the model needs \\(32, 64\\)"):
        torchsd.load_pipeline(tmp_path / "shape.safetensors", dtype=torch.float32)


def test_missing_text_encoder_or_vae_is_refused(tmp_path, sd1_state):
    unet_only = {k: v for k, v in sd1_state.items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only | {k: v for k, v in sd1_state.items() if k.startswith("first_stage_model.")},
              str(tmp_path / "no-text.safetensors"))
    with pytest.raises(CheckpointError, match="no text encoder"):
        torchsd.load_pipeline(tmp_path / "no-text.safetensors", dtype=torch.float32)
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="no autoencoder"):
        torchsd.load_pipeline(tmp_path / "unet.safetensors", dtype=torch.float32)


def test_corrupt_embedded_config_is_refused(tmp_path, sd1_state):
    save_file(sd1_state, str(tmp_path / "m.safetensors"), metadata={"torchsd_config": "{not json"})
    with pytest.raises(CheckpointError, match="embedded torchsd_config is not a valid torchsd config"):
        torchsd.load_pipeline(tmp_path / "m.safetensors", dtype=torch.float32)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_random_bytes_are_always_refused_as_corrupt(tmp_path, suffix):
    """Random bytes make an unpickler fail in any way it likes (EOFError, IndexError, KeyError, ...); every one
    must reach the user as the same CheckpointError, never as a traceback. Seeded, so a failure reproduces."""
    from torchsd.checkpoints.io import load_state_dict

    rng = torch.Generator().manual_seed(1234)
    path = tmp_path / f"garbage{suffix}"
    for i in range(400):
        size = int(torch.randint(1, 4096, (1,), generator=rng))
        blob = bytes(torch.randint(0, 256, (size,), generator=rng, dtype=torch.uint8).tolist())
        if i % 2:  # a pickle protocol header first, so the unpickler goes deeper before failing
            blob = b"\x80\x02" + blob
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match="truncated or corrupt|holds no tensors|refused to load"):
            load_state_dict(path)
