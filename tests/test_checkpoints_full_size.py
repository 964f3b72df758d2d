"""A full-size SD 1.5 random checkpoint: written, inferred from its tensors, loaded and run (slow)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import torchsd
from torchsd.checkpoints.ldm import model_states_on_meta, single_file_tensors
from torchsd.config import ModelConfig


@pytest.mark.slow
def test_full_size_sd15_file_loads_and_runs_one_step(tmp_path):
    config = ModelConfig.sd15()
    gen = torch.Generator().manual_seed(0)
    layout = single_file_tensors(config, model_states_on_meta(config))
    # fp16 halves the file; no torchsd metadata, so the config is inferred as for a downloaded file
    tensors = {k: (torch.randn(v.shape, generator=gen) * 0.02).half() if v.is_meta else v for k, v in layout.items()}
    path = tmp_path / "sd15-random.safetensors"
    save_file(tensors, str(path))
    del tensors
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() is None and len(list(f.keys())) == 1143

    sd = torchsd.load_pipeline(path, dtype=torch.float32)
    assert sd.config == config
    assert sum(p.numel() for p in sd.unet.parameters()) == 859_520_964
    result = sd.generate("a photograph of an astronaut riding a horse", steps=1, width=64, height=64, seed=1)
    assert result.images[0].size == (64, 64) and torch.isfinite(result.latents).all()
