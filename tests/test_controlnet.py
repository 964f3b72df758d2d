"""ControlNet: the same random weights in torchsd and diffusers give the same residuals, and the U-Net with
them the same output."""

import pytest
import torch

from reference import diffusers_unet, max_rel_error, random_pipeline
from torchsd.checkpoints.diffusers import to_diffusers_keys
from torchsd.models.controlnet import ControlNet

TOL = 1e-4


def random_controlnet(sd, seed: int = 3, hint_widths=(16, 32, 96, 256)) -> ControlNet:
    """from_unet, then every weight perturbed: zero convolutions at zero would hide a wrong wiring."""
    net = ControlNet.from_unet(sd.unet, hint_widths=hint_widths)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def diffusers_controlnet(net: ControlNet, unet_reference):
    from diffusers import ControlNetModel

    ref = ControlNetModel.from_unet(unet_reference, conditioning_embedding_out_channels=net.config.hint_widths)
    ref.load_state_dict(to_diffusers_keys(net.state_dict(), "unet"), strict=True)
    return ref.eval()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request):
    return random_pipeline(request.param)


def test_from_unet_copies_the_encoder_and_starts_at_zero(sd):
    net = ControlNet.from_unet(sd.unet)
    assert torch.equal(net.down_blocks[0].resnets[0].conv1.weight, sd.unet.down_blocks[0].resnets[0].conv1.weight)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, sd.config.text.width)
    with torch.no_grad():
        down, mid = net(x, torch.tensor([500]), context, torch.rand(1, 3, 64, 64))
    assert len(down) == 1 + 3 * len(sd.config.unet.channel_mult) - 1
    assert all(not d.any() for d in down) and not mid.any()


def test_residuals_and_unet_match_diffusers(sd):
    net = random_controlnet(sd)
    unet_ref = diffusers_unet(sd)
    ref = diffusers_controlnet(net, unet_ref)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 16, generator=gen)
    hint = torch.rand(2, 3, 64, 128, generator=gen)
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        down, mid = net(x, t, context, hint)
        out = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
        ref_down, ref_mid = out
        assert len(down) == len(ref_down)
        for ours, theirs in zip(down, ref_down):
            assert max_rel_error(ours, theirs) < TOL
        assert max_rel_error(mid, ref_mid) < TOL
        ours = sd.unet(x, t, context, down_residuals=down, mid_residual=mid)
        theirs = unet_ref(x, t, encoder_hidden_states=context, down_block_additional_residuals=ref_down,
                          mid_block_additional_residual=ref_mid).sample
        assert max_rel_error(ours, theirs) < TOL
        assert max_rel_error(ours, sd.unet(x, t, context)) > 1e-3  # the residuals did something


def test_several_contexts_per_latent_equal_a_repeated_batch(sd):
    """CFG's one-latent-two-contexts call gives the rows a batch of repeated latents gives."""
    net = random_controlnet(sd)
    gen = torch.Generator().manual_seed(1)
    x, hint = torch.randn(1, 4, 8, 8, generator=gen), torch.rand(1, 3, 64, 64, generator=gen)
    context = torch.randn(2, 77, sd.config.text.width, generator=gen)
    t = torch.tensor([400.0])
    with torch.no_grad():
        down, mid = net(x, t, context, hint)
        shared = sd.unet(x, t, context, down_residuals=down, mid_residual=mid)
        x2, t2 = x.repeat(2, 1, 1, 1), t.repeat(2)
        down2, mid2 = net(x2, t2, context, hint)
        batched = sd.unet(x2, t2, context, down_residuals=down2, mid_residual=mid2)
    assert max_rel_error(shared, batched) < 1e-5
