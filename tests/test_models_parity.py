"""The same random weights in torchsd and in diffusers / transformers give the same outputs."""

import pytest
import torch

from reference import diffusers_unet, diffusers_vae, max_rel_error, random_pipeline, transformers_text_encoder

TOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request):
    return random_pipeline(request.param)


def test_unet_matches_diffusers(sd):
    ref = diffusers_unet(sd)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 24, generator=gen)
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ours = sd.unet(x, t, context)
        theirs = ref(x, t, encoder_hidden_states=context).sample
    assert ours.shape == theirs.shape == x.shape
    assert max_rel_error(ours, theirs) < TOL


def test_vae_encode_decode_match_diffusers(sd):
    ref = diffusers_vae(sd)
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = sd.vae.encode(images)
        theirs = ref.encode(images).latent_dist
        assert max_rel_error(ours.mean, theirs.mean) < TOL
        assert max_rel_error(ours.std, theirs.std) < TOL
        decoded, ref_decoded = sd.vae.decode(ours.mean), ref.decode(theirs.mean).sample
    assert decoded.shape == images.shape
    assert max_rel_error(decoded, ref_decoded) < TOL


def test_text_encoder_matches_transformers(sd):
    ref = transformers_text_encoder(sd)
    ids = sd.tokenizer(["a red circle at the top left on a blue background", ""])
    with torch.no_grad():
        ours = sd.text_encoder(ids)
        out = ref(ids, output_hidden_states=True)
        assert max_rel_error(ours, out.last_hidden_state) < TOL
        # clip skip 2: hidden state -2, then the final layer norm
        skipped = getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[-2])
        assert max_rel_error(sd.text_encoder(ids, clip_skip=2), skipped) < TOL


def test_sd15_preset_has_the_published_parameter_count():
    from torchsd.config import ModelConfig
    from torchsd.models.unet import UNet

    with torch.device("meta"):
        unet = UNet(ModelConfig.sd15().unet)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
