"""SDXL's networks against diffusers' and transformers' on the same random weights, and the full-size
presets against the published configs (parameter counts on the meta device)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdxl_reference import (
    SDXL_BASE_UNET,
    SDXL_REFINER_UNET,
    SDXL_TEXT_ENCODER_2,
    diffusers_unet_of,
    random_text_encoder,
    random_unet,
    transformers_text_encoder_of,
)
from torchsd.checkpoints.diffusers import unet_config_from_diffusers, unet_config_to_diffusers
from torchsd.config import ModelConfig, UNetConfig
from torchsd.models.clip import CLIPTextModel
from torchsd.models.unet import UNet, added_vector


def _time_ids(config: ModelConfig, batch: int) -> torch.Tensor:
    values = [[64, 48, 3, 5, 64, 64], [32, 64, 0, 0, 64, 32]] if config.family == "sdxl" else \
        [[64, 48, 3, 5, 6.0], [32, 64, 0, 0, 2.5]]
    return torch.tensor(values[:batch], dtype=torch.float32)


@pytest.mark.parametrize("family", ["sdxl", "sdxl_refiner"])
def test_unet_matches_diffusers_text_time(family):
    config = ModelConfig.tiny(family)
    unet = random_unet(config)
    reference = diffusers_unet_of(unet)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 7, config.unet.context_dim, generator=gen)
    pooled = torch.randn(2, config.unet.pooled_dim, generator=gen)
    time_ids = _time_ids(config, 2)
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ours = unet(x, t, context, added_vector(pooled, time_ids, config.unet.micro_condition_dim))
        theirs = reference(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_unet_several_contexts_with_added_vector_equal_a_repeated_batch():
    """CFG hands one latent two contexts and two added vectors: the same as a batch of two copies."""
    config = ModelConfig.tiny("sdxl")
    unet = random_unet(config)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(2, 5, config.unet.context_dim, generator=gen)
    y = torch.randn(2, config.unet.added_embed_dim, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 3.0, context, y), unet(x.repeat(2, 1, 1, 1), 3.0, context, y))


def test_unet_without_added_vector_is_refused():
    unet = random_unet(ModelConfig.tiny("sdxl"))
    with pytest.raises(ValueError, match="added vector"):
        unet(torch.zeros(1, 4, 8, 8), 1.0, torch.zeros(1, 3, unet.config.context_dim))


@pytest.mark.parametrize("which", [0, 1])
def test_text_encoders_match_transformers(which):
    """CLIP-L (CLIPTextModel) and bigG (CLIPTextModelWithProjection): penultimate states without the final
    LayerNorm, and bigG's projected pooled output at the end token, padded as SDXL pads each."""
    config = ModelConfig.tiny("sdxl").text_encoders[which]
    encoder = random_text_encoder(config, seed=which)
    reference = transformers_text_encoder_of(encoder)
    pad = config.pad_token_id
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [pad] * 4, [49406, 4, 5, 6, 7, 8, 9, 10, 49407]])
    with torch.no_grad():
        hidden, pooled = encoder.penultimate(ids, pooled=config.with_projection)
        out = reference(ids, output_hidden_states=True)
    torch.testing.assert_close(hidden, out.hidden_states[-2], atol=1e-5, rtol=1e-4)
    if config.with_projection:
        torch.testing.assert_close(pooled, out.text_embeds, atol=1e-5, rtol=1e-4)
    else:
        assert pooled is None


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset,published", [("sdxl_base", SDXL_BASE_UNET), ("sdxl_refiner", SDXL_REFINER_UNET)])
def test_full_size_unet_has_the_published_parameter_count(preset, published):
    from diffusers import UNet2DConditionModel

    config = getattr(ModelConfig, preset)()
    with torch.device("meta"):
        ours, theirs = UNet(config.unet), UNet2DConditionModel(**published)
    assert _count(ours) == _count(theirs)
    # the published config reads back as the preset, and the preset writes a config diffusers builds alike
    assert unet_config_from_diffusers(published, pooled_dim=1280) == config.unet
    with torch.device("meta"):
        again = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(config.unet, 128).items()
                                        if not k.startswith("_")})
    assert _count(again) == _count(theirs)


def test_full_size_text_encoders_have_the_published_parameter_counts():
    from transformers import CLIPTextConfig as Config
    from transformers import CLIPTextModel as Plain
    from transformers import CLIPTextModelWithProjection

    config = ModelConfig.sdxl_base()
    with torch.device("meta"):
        clip_l, big_g = CLIPTextModel(config.text), CLIPTextModel(config.text_2)
        ref_l = Plain(Config(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
        ref_g = CLIPTextModelWithProjection(Config(**SDXL_TEXT_ENCODER_2))
    assert (_count(clip_l), _count(big_g)) == (_count(ref_l), _count(ref_g))
    assert ModelConfig.sdxl_refiner().text == config.text_2


def test_config_validation_teaches_the_fix():
    with pytest.raises(ValueError, match="one positive count per level"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(False, True), transformer_depth=(1, 2, 3))
    with pytest.raises(ValueError, match="both pooled_dim and micro_conditions"):
        UNetConfig(pooled_dim=1280)
    base = ModelConfig.sdxl_base()
    with pytest.raises(ValueError, match="pooled_dim"):
        dataclasses.replace(base, unet=dataclasses.replace(base.unet, pooled_dim=1024))
    with pytest.raises(ValueError, match="text_2"):
        dataclasses.replace(base, text_2=None)
    # configs written before per-level depths; the level without attention holds 1
    assert UNetConfig(transformer_depth=2).transformer_depth == (2, 2, 2, 1)
    assert ModelConfig.from_dict(base.to_dict()) == base
    assert ModelConfig.sd15().unet.transformer_depth == (1, 1, 1, 1)
