"""Fused layers (accel/fused.py) mean exactly their plain expressions, take the oneDNN kernel only where it
applies, and leave LoRA wrappers, hooks and autograd working."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import max_rel_error, random_pipeline
from torchsd.accel import fused, optimize, packed_weights, subpixel
from torchsd.models.layers import Upsample
from torchsd.training.lora import LoRALinear

pytestmark = pytest.mark.skipif(not fused.available(), reason="this PyTorch build has no oneDNN ops in this form")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def kernels_run(fn) -> set[str]:
    """The mkldnn kernels a call ran, from the profiler (proof that the fused path was taken)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("mkldnn::")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_geglu_conv_equal_their_plain_expressions(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 50, 32, dtype=dtype)
    lin = nn.Linear(32, 48).to(dtype)
    proj = nn.Linear(32, 2 * 48).to(dtype)
    residual = torch.randn(2, 50, 48, dtype=dtype)
    m = torch.randn(2, 16, 9, 7, dtype=dtype)
    conv, conv1x1 = nn.Conv2d(16, 24, 3, padding=1).to(dtype), nn.Conv2d(16, 24, 1).to(dtype)
    full, per_channel = torch.randn(2, 24, 9, 7, dtype=dtype), torch.randn(2, 24, 1, 1, dtype=dtype)
    hidden, gate = proj(x).chunk(2, dim=-1)
    cases = [
        (lambda: fused.linear(x, lin), lin(x)),
        (lambda: fused.linear(x, lin, residual=residual), lin(x) + residual),
        (lambda: fused.geglu(x, proj), hidden * F.gelu(gate)),
        (lambda: fused.conv2d(m, conv), conv(m)),
        (lambda: fused.conv2d(m, conv, residual=full), conv(m) + full),
        (lambda: fused.conv2d(m, conv, residual=per_channel), conv(m) + per_channel),
        (lambda: fused.conv2d(m, conv1x1, residual=full), conv1x1(m) + full),
    ]
    for run, expected in cases:
        with torch.no_grad():
            assert kernels_run(run), "the fused kernel did not run"
            assert max_rel_error(run().float(), expected.float()) < TOLERANCE[dtype]


def test_channels_last_input_and_prepacked_weights():
    torch.manual_seed(0)
    conv = optimize(nn.Conv2d(16, 24, 3, padding=1))  # the packable convolution
    m = torch.randn(2, 16, 16, 16).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 24, 16, 16)
    with torch.no_grad():
        expected = F.conv2d(m, conv.weight, conv.bias, padding=1) + residual
        assert max_rel_error(fused.conv2d(m, conv, residual=residual), expected) < 1e-5
        with packed_weights(conv):
            assert max_rel_error(fused.conv2d(m, conv, residual=residual), expected) < 1e-5
            assert conv.packed  # the fused call used (and made) the reordered weight


def test_plain_path_under_autograd_float16_lora_and_hooks():
    torch.manual_seed(0)
    x = torch.randn(3, 8, 16)
    lin = nn.Linear(16, 16)
    residual = torch.randn(3, 8, 16)
    # autograd: plain ops, and gradients reach the weights and the input
    y = fused.linear(x.requires_grad_(), lin, residual=residual)
    assert not fused._fusable(x, lin)
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    x = x.detach()
    with torch.no_grad():
        assert not fused._fusable(x.half(), lin.half())
        lin.float()
        # a LoRA wrapper is called as a module, so its low-rank update is part of the result
        lora = LoRALinear(lin, rank=2, alpha=2.0)
        nn.init.normal_(lora.up.weight)
        assert torch.allclose(fused.linear(x, lora), lin(x) + lora.up(lora.down(x)), atol=1e-5)
        # a hook (sequential offload moves weights in one) is honoured: the module is called
        seen = []
        handle = lin.register_forward_pre_hook(lambda module, args: seen.append(1))
        fused.linear(x, lin, residual=residual)
        handle.remove()
        assert seen == [1]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_fused_equals_unet_plain(family):
    """The whole optimized U-Net at inference (fused) against the same weights under autograd (plain ops)."""
    sd = random_pipeline(family)
    optimize(sd.unet)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, sd.config.unet.context_dim)
    plain = sd.unet(x, t, context).detach()
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in kernels_run(lambda: sd.unet(x, t, context))
        assert max_rel_error(sd.unet(x, t, context), plain) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_few_pixel_convolutions_as_a_matmul(dtype, channels_last):
    """Below 8x8 outputs (float32) the convolution runs as unfold + matmul; stride 2 and residuals too."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 4, 4, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv, down = nn.Conv2d(32, 24, 3, padding=1).to(dtype), nn.Conv2d(32, 32, 3, stride=2, padding=1).to(dtype)
    full, per_channel = torch.randn(2, 24, 4, 4, dtype=dtype), torch.randn(2, 24, 1, 1, dtype=dtype)
    with torch.no_grad():
        assert fused._as_matmul_wins(x, conv)
        for run, expected in [(lambda: fused.conv2d(x, conv), conv(x)),
                              (lambda: fused.conv2d(x, conv, residual=full), conv(x) + full),
                              (lambda: fused.conv2d(x, conv, residual=per_channel), conv(x) + per_channel),
                              (lambda: fused.conv2d(x, down), down(x))]:
            assert "mkldnn::_linear_pointwise" in kernels_run(run)
            y = run()
            assert y.shape == expected.shape and fused.is_channels_last(y) == channels_last  # layout kept
            assert max_rel_error(y.float(), expected.float()) < TOLERANCE[dtype]


def test_bf16_wide_input_convolutions_at_8x8_as_a_matmul():
    """bf16 at 8x8: the up path's concatenated inputs (over 1280 channels) go through the matmul, 1280 not."""
    torch.manual_seed(0)
    x = torch.randn(1, 1288, 8, 8, dtype=torch.bfloat16)
    wide, narrow = nn.Conv2d(1288, 16, 3, padding=1).bfloat16(), nn.Conv2d(1280, 16, 3, padding=1).bfloat16()
    with torch.no_grad():
        assert fused._as_matmul_wins(x, wide) and not fused._as_matmul_wins(x[:, :1280], narrow)
        assert not fused._as_matmul_wins(torch.randn(1, 1288, 16, 16, dtype=torch.bfloat16), wide)
        assert max_rel_error(fused.conv2d(x, wide).float(), wide(x).float()) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_as_a_subpixel_convolution(dtype, channels_last):
    """conv3x3(nearest 2x upsample) folded into four 2x2 kernels at the input resolution: same values
    (float32: rounding of the summed weights), same layout, same gradients."""
    torch.manual_seed(0)
    up = optimize(Upsample(16).to(dtype))
    assert type(up).__name__ == "SubpixelUpsample"
    x = torch.randn(2, 16, 32, 40, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = F.conv2d(F.interpolate(x.float(), scale_factor=2.0), up.conv.weight.float(),
                            up.conv.bias.float(), padding=1)
    assert subpixel.applies(x, up.conv)
    with torch.no_grad():
        y = up(x)
    assert y.shape == (2, 16, 64, 80) and fused.is_channels_last(y) == channels_last
    assert max_rel_error(y.float(), expected) < TOLERANCE[dtype]
    wide = nn.Conv2d(1280, 1280, 3, padding=1).to(dtype)
    assert subpixel.applies(torch.randn(2, 1280, 16, 16, dtype=dtype), wide)
    assert not subpixel.applies(x[:, :, :4, :4], up.conv)  # small maps: the plain path (measured faster)
    # 8x8: only bf16, and only with enough batch for the channels
    assert subpixel.applies(x[:, :, :8, :8], up.conv) == (dtype == torch.bfloat16)
    assert not subpixel.applies(torch.randn(1, 1280, 8, 8, dtype=dtype), wide)
    if dtype == torch.float32:
        x = x.detach().requires_grad_()
        up(x).square().sum().backward()
        grads = x.grad.clone(), up.conv.weight.grad.clone()
        x.grad, up.conv.weight.grad = None, None
        up.conv(F.interpolate(x, scale_factor=2.0)).square().sum().backward()
        for ours, theirs in zip(grads, (x.grad, up.conv.weight.grad)):
            assert max_rel_error(ours, theirs) < 1e-5
