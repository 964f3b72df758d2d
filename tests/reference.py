"""Helpers that build the reference implementations (diffusers, transformers) with torchsd's weights."""

from __future__ import annotations

import torch

from torchsd.checkpoints.diffusers import (text_config_to_transformers, to_diffusers_keys, unet_config_to_diffusers,
                                          vae_config_to_diffusers)
from torchsd.config import ModelConfig
from torchsd.pipeline import StableDiffusion


def _strip_private(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def diffusers_unet(sd: StableDiffusion):
    from diffusers import UNet2DConditionModel

    cfg = _strip_private(unet_config_to_diffusers(sd.config.unet, sd.config.sample_size // 8))
    model = UNet2DConditionModel(**cfg)
    model.load_state_dict(to_diffusers_keys(sd.unet.state_dict(), "unet"), strict=True)
    return model.eval()


def diffusers_vae(sd: StableDiffusion):
    from diffusers import AutoencoderKL

    cfg = _strip_private(vae_config_to_diffusers(sd.config.vae, sd.config.sample_size))
    model = AutoencoderKL(**cfg)
    model.load_state_dict(to_diffusers_keys(sd.vae.state_dict(), "vae"), strict=True)
    return model.eval()


def transformers_text_encoder(sd: StableDiffusion):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**text_config_to_transformers(sd.config.text)))
    state = to_diffusers_keys(sd.text_encoder.state_dict(), "text_encoder")
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 drops the nesting
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


def random_pipeline(family: str = "sd1", prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusion:
    import dataclasses

    config = ModelConfig.tiny(family)
    if prediction_type != "epsilon":
        config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule,
                                                                          prediction_type=prediction_type))
    sd = StableDiffusion.from_config(config, seed=seed)
    # random init leaves some layers (zero-initialised in real training) at values far from typical;
    # perturb every parameter so that no path through the network is trivially zero
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for model in (sd.unet, sd.vae, sd.text_encoder):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return sd


def max_rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |a - b| relative to the output's scale (its max |b|)."""
    return float((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp_min(1e-12))


def pixels(image) -> torch.Tensor:
    """A PIL image as a float32 tensor of its 8-bit values."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32))
