"""T2I-Adapter: the same random weights in torchsd and diffusers give the same features, and the U-Net with
them the same output."""

import pytest
import torch

from reference import diffusers_unet, max_rel_error, random_pipeline
from torchsd.models.adapter import AdapterConfig, T2IAdapter

TOL = 1e-4


def random_adapter(sd, seed: int = 7, downscale: int | None = None) -> T2IAdapter:
    c = sd.config.unet
    widths = tuple(c.model_channels * m for m in c.channel_mult)
    config = AdapterConfig(widths=widths, num_res_blocks=2,
                           downscale=downscale or sd.config.vae.downscale_factor)
    torch.manual_seed(seed)
    return T2IAdapter(config).eval()


def diffusers_adapter(adapter: T2IAdapter):
    from diffusers import T2IAdapter as Reference

    c = adapter.config
    ref = Reference(in_channels=c.hint_channels, channels=list(c.widths), num_res_blocks=c.num_res_blocks,
                    downscale_factor=c.downscale, adapter_type="full_adapter")
    ref.load_state_dict({"adapter." + k: v for k, v in adapter.state_dict().items()}, strict=True)
    return ref.eval()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request):
    return random_pipeline(request.param)


def test_features_and_unet_match_diffusers(sd):
    adapter = random_adapter(sd, downscale=8)
    ref = diffusers_adapter(adapter)
    unet_ref = diffusers_unet(sd)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 16, generator=gen)
    hint = torch.rand(2, 3, 64, 128, generator=gen)
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ours, theirs = adapter(hint), ref(hint)
        assert len(ours) == len(theirs) == len(sd.config.unet.channel_mult)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape and max_rel_error(a, b) < TOL
        out = sd.unet(x, t, context, level_residuals=[f * 0.5 for f in ours])
        expected = unet_ref(x, t, encoder_hidden_states=context,
                            down_intrablock_additional_residuals=[f * 0.5 for f in theirs]).sample
        assert max_rel_error(out, expected) < TOL
        assert max_rel_error(out, sd.unet(x, t, context)) > 1e-3
