"""The 16-channel autoencoder of SD 3 and FLUX.1 (no quant convs, a shift factor) equals diffusers'."""

import dataclasses

import pytest
import torch

from reference import _perturb, max_rel_error
from torchsd.checkpoints.diffusers import from_diffusers_keys, vae_config_from_diffusers, vae_config_to_diffusers
from torchsd.config import VAEConfig
from torchsd.models.vae import AutoencoderKL

TINY = dataclasses.replace(VAEConfig.sd3(), base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)


def test_matches_diffusers_autoencoder_without_quant_convs():
    from diffusers import AutoencoderKL as Reference

    cfg = {k: v for k, v in vae_config_to_diffusers(TINY, 32).items() if not k.startswith("_")}
    assert (cfg["latent_channels"], cfg["use_quant_conv"], cfg["use_post_quant_conv"]) == (16, False, False)
    torch.manual_seed(0)
    reference = Reference(**cfg).eval()
    _perturb(reference, 0)
    assert vae_config_from_diffusers(dict(reference.config)) == dataclasses.replace(TINY)
    ours = AutoencoderKL(TINY).eval()
    ours.load_state_dict(from_diffusers_keys(reference.state_dict(), "vae"), strict=True)
    assert not any("quant_conv" in k for k in ours.state_dict())
    images = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mine, theirs = ours.encode(images), reference.encode(images).latent_dist
        assert mine.mean.shape == (2, 16, 16, 12)
        assert max_rel_error(mine.mean, theirs.mean) < 1e-5
        assert max_rel_error(mine.std, theirs.std) < 1e-5
        assert max_rel_error(ours.decode(mine.mean), reference.decode(theirs.mean).sample) < 1e-5


@pytest.mark.parametrize("preset,scaling,shift", [("sd3", 1.5305, 0.0609), ("flux", 0.3611, 0.1159)])
def test_presets_carry_the_published_factors(preset, scaling, shift):
    config = getattr(VAEConfig, preset)()
    assert (config.latent_channels, config.scaling_factor, config.shift_factor, config.use_quant_conv) == \
        (16, scaling, shift, False)


def test_sd_vae_config_is_unchanged():
    config = VAEConfig()
    assert (config.shift_factor, config.use_quant_conv) == (0.0, True)
    assert "use_quant_conv" not in vae_config_to_diffusers(config, 512)
    assert "quant_conv.weight" in AutoencoderKL(dataclasses.replace(config, base_channels=32)).state_dict()
