"""Prepacked convolutions give the same numbers as plain ones and follow every change of the weights."""

import pytest
import torch
from torch import nn

from reference import max_rel_error, random_pipeline
from torchsd.prepacked import prepack_convolutions, prepacking_available
from torchsd.runtime import RuntimeOptions, apply_runtime

pytestmark = pytest.mark.skipif(not prepacking_available(), reason="this PyTorch build has no oneDNN")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prepacked_unet_and_vae_match_plain(dtype, tolerance):
    sd = random_pipeline("sd1")
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 77, sd.config.unet.context_dim)
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        sd.unet.to(dtype), sd.vae.to(dtype)
        plain = sd.unet(x.to(dtype), t, context.to(dtype)).float(), sd.vae.decode(latents.to(dtype)).float()
        assert prepack_convolutions(sd.unet) > 0 and prepack_convolutions(sd.vae) > 0
        packed = sd.unet(x.to(dtype), t, context.to(dtype)).float(), sd.vae.decode(latents.to(dtype)).float()
    assert any(getattr(m, "_prepacked", None) is not None for m in sd.unet.modules())  # the fast path ran
    for a, b in zip(plain, packed):
        assert max_rel_error(b, a) < tolerance


def test_a_changed_weight_is_repacked_and_gradients_take_the_plain_path():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    reference = nn.Conv2d(8, 16, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    prepack_convolutions(conv)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.allclose(conv(x), reference(x), atol=1e-5)
        first = conv._prepacked
        for edit in (lambda c: c.weight.mul_(2), lambda c: c.load_state_dict({"weight": torch.randn(16, 8, 3, 3),
                                                                              "bias": torch.randn(16)})):
            edit(conv)  # as a LoRA merge or a new checkpoint would
            reference.load_state_dict(conv.state_dict())
            assert torch.allclose(conv(x), reference(x), atol=1e-4)
        assert conv._prepacked is not first
    y = conv(x.requires_grad_())  # autograd: the ordinary convolution, so backward works
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    prepack_convolutions(conv, enabled=False)
    assert "forward" not in conv.__dict__


def test_runtime_option_and_flag():
    sd = apply_runtime(random_pipeline("sd1"), RuntimeOptions(prepack=True), "cpu", torch.float32)
    assert "forward" in sd.unet.conv_in.__dict__ and "forward" in sd.vae.decoder.conv_in.__dict__
    with pytest.raises(ValueError, match="does not mix with offload"):
        RuntimeOptions(prepack=True, offload="model")
    import argparse

    from torchsd.runtime import add_runtime_arguments, runtime_options_from_args

    parser = argparse.ArgumentParser()
    add_runtime_arguments(parser)
    assert runtime_options_from_args(parser.parse_args(["--prepack"])).prepack
    assert not runtime_options_from_args(parser.parse_args([])).prepack
