"""TAESD: torchsd's tiny autoencoder gives diffusers' AutoencoderTiny outputs on the same random weights, read from
a diffusers folder (written by ``save_pretrained``) and from madebyollin's taesd_encoder/taesd_decoder files
(written from diffusers' weights by an independent writer below); previews and the opt-in fast decode use it."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reference import max_rel_error, random_pipeline
from torchsd import load_pipeline
from torchsd.checkpoints.io import CheckpointError
from torchsd.checkpoints.taesd import load_taesd

TOL = 1e-5
# two levels: the tiny test models' VAE downsamples by 2 (SD's, and the real TAESD's, by 8)
TINY = dict(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 2),
            num_decoder_blocks=(2, 1), latent_channels=4)


@pytest.fixture(scope="module")
def reference():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(**TINY).eval()
    with torch.no_grad():  # away from the initialisation, so that no path is trivially zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model


def madebyollin_files(reference, folder, suffix=".pth"):
    """madebyollin's layout: each half a bare nn.Sequential; the decoder's layer 0 is a parameter-free clamp,
    so diffusers' decoder.layers.N is the file's N+1."""
    folder.mkdir(exist_ok=True)
    state = reference.state_dict()
    encoder = {k[len("encoder.layers."):]: v for k, v in state.items() if k.startswith("encoder.layers.")}
    decoder = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            index, _, rest = key[len("decoder.layers."):].partition(".")
            decoder[f"{int(index) + 1}.{rest}"] = value
    for name, half in (("taesd_encoder", encoder), ("taesd_decoder", decoder)):
        if suffix == ".pth":
            torch.save(half, folder / f"{name}.pth")
        else:
            save_file({k: v.contiguous() for k, v in half.items()}, str(folder / f"{name}{suffix}"))
    return folder


def check_parity(ours, reference):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 24, generator=gen) * 2 - 1
    latents = torch.randn(2, 4, 8, 12, generator=gen) * 2
    with torch.no_grad():
        theirs_latents = reference.encode(images).latents
        theirs_images = reference.decode(latents).sample
        assert max_rel_error(ours.encode(images), theirs_latents) < TOL
        assert max_rel_error(ours.decode(latents), theirs_images) < TOL


def test_diffusers_folder_matches_autoencoder_tiny(reference, tmp_path):
    reference.save_pretrained(tmp_path / "taesd")
    ours = load_taesd(tmp_path / "taesd")
    assert ours.config.encoder_blocks == (1, 2) and ours.config.decoder_blocks == (2, 1)
    check_parity(ours, reference)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_madebyollin_files_match_autoencoder_tiny(reference, tmp_path, suffix):
    folder = madebyollin_files(reference, tmp_path / "VAE-taesd", suffix)
    check_parity(load_taesd(folder), reference)
    decoder_only = load_taesd(folder / f"taesd_decoder{suffix}")
    assert decoder_only.encoder is None
    with pytest.raises(ValueError, match="no encoder.*taesd_encoder"):
        decoder_only.encode(torch.zeros(1, 3, 32, 32))


def test_default_config_is_madebyollins_taesd():
    from diffusers import AutoencoderTiny

    from torchsd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig

    ours = TinyAutoencoder(TinyAutoencoderConfig())
    theirs = AutoencoderTiny()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_bad_files_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="not a TAESD file"):
        load_taesd(tmp_path / "odd.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no TAESD here"):
        load_taesd(tmp_path / "empty")


def test_previews_and_fast_decode_use_taesd(reference, tmp_path):
    sd = random_pipeline("sd1", seed=3)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    full = sd.decode_latents(latents)
    assert torch.equal(sd.decode_preview(latents), full)  # no TAESD: the full VAE, as before
    sd.taesd = load_taesd(reference_folder := madebyollin_files(reference, tmp_path / "t"))
    with torch.no_grad():
        expected = reference.decode(latents).sample.clamp(-1, 1)
    torch.testing.assert_close(sd.decode_preview(latents), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(sd.decode_latents(latents), full)  # final images: still the VAE unless asked
    sd.fast_decode = True
    fast = sd.generate("a cat", seed=1, width=64, height=64, steps=2)
    sd.fast_decode = False
    slow = sd.generate("a cat", seed=1, width=64, height=64, steps=2)
    assert torch.equal(fast.latents, slow.latents) and fast.images[0].size == (64, 64)
    assert not np.array_equal(np.asarray(fast.images[0]), np.asarray(slow.images[0]))
    assert reference_folder.is_dir()


def test_cli_fast_decode_and_server_registry_find_taesd(reference, tmp_path):
    from torchsd.cli import main
    from torchsd.server.registry import ModelRegistry

    random_pipeline("sd1", seed=3).save(tmp_path / "models" / "tiny")
    folder = madebyollin_files(reference, tmp_path / "models" / "VAE-taesd")
    code = main(["generate", "a cat", "--model", str(tmp_path / "models" / "tiny"), "--steps", "2", "--size",
                 "32x32", "--taesd", str(folder), "--fast-decode", "--output", str(tmp_path / "cat.png")])
    assert code == 0 and Image.open(tmp_path / "cat.png").size == (32, 32)
    assert main(["generate", "a cat", "--model", str(tmp_path / "models" / "tiny"), "--fast-decode",
                 "--output", str(tmp_path / "no.png")]) != 0  # --fast-decode without --taesd is refused
    registry = ModelRegistry(tmp_path / "models", tmp_path / "models" / "tiny")
    assert not any("taesd" in e.path.name for e in registry.entries)  # VAE-taesd is not offered as a model
    assert registry.current.path.name == "tiny"
    sd = registry.pipeline()
    assert sd.taesd is not None and not sd.fast_decode
    # a TAESD of another latent space (SD's 8x one for this 2x model) is refused with the reason
    from diffusers import AutoencoderTiny

    AutoencoderTiny(**{**TINY, "num_encoder_blocks": (1, 1, 1), "num_decoder_blocks": (1, 1, 1),
                       "encoder_block_out_channels": (8,) * 3, "decoder_block_out_channels": (8,) * 3}
                    ).save_pretrained(tmp_path / "taesd8")
    with pytest.raises(ValueError, match="downsamples by 4.*the model's VAE by 2"):
        load_pipeline(tmp_path / "models" / "tiny", "cpu", torch.float32, taesd=tmp_path / "taesd8")
