"""Winograd F(2x2, 3x3) convolutions equal direct convolution to float32 rounding, in every band layout,
with bias and residual, and run only where they were measured to win."""

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import max_rel_error
from torchsd.accel import fused, winograd


def reference(x, w, b=None, residual=None):
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("shape, out_channels", [((2, 8, 6, 10), 5), ((1, 3, 2, 2), 4), ((3, 16, 12, 8), 16)])
@pytest.mark.parametrize("band_bytes", [1, 1 << 10, 8 << 20])  # one tile row per band, a remainder band, one band
def test_matches_direct_convolution(monkeypatch, shape, out_channels, band_bytes):
    monkeypatch.setattr(winograd, "BAND_BYTES", band_bytes)
    torch.manual_seed(0)
    x = torch.randn(shape)
    w = torch.randn(out_channels, shape[1], 3, 3)
    b = torch.randn(out_channels)
    full = torch.randn(shape[0], out_channels, *shape[2:])
    per_channel = torch.randn(shape[0], out_channels, 1, 1)  # the time embedding's broadcast add
    for bias, residual in [(None, None), (b, None), (b, full), (None, per_channel)]:
        y = winograd.conv3x3(x, w, bias, residual)
        assert y.shape == (shape[0], out_channels, *shape[2:]) and y.is_contiguous()
        assert max_rel_error(y, reference(x, w, bias, residual).float()) < 2e-6


def test_filter_transform_is_g_g_gt():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
    expected = torch.einsum("ik,ockl,jl->ijoc", G, w, G).reshape(16, 3, 2)
    assert torch.allclose(winograd.filter_transform(w.float()).double(), expected, atol=1e-6)


@pytest.mark.skipif(not fused.available(), reason="this PyTorch build has no oneDNN ops in this form")
def test_fused_conv_takes_it_only_where_it_applies(monkeypatch):
    monkeypatch.setattr(winograd, "pays", lambda: True)
    calls = []
    original = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(a[0].shape) or original(*a))
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1)
    big, small = torch.randn(2, 16, 32, 32), torch.randn(2, 16, 16, 16)  # 2048 output pixels, and 512
    residual = torch.randn(2, 8, 1, 1)
    with torch.no_grad():
        for x in (big, small, big.contiguous(memory_format=torch.channels_last), big.bfloat16()):
            c = conv.to(x.dtype)
            y = fused.conv2d(x, c, residual=residual.to(x.dtype))
            expected = reference(x.float(), c.weight.float(), c.bias.float(), residual)
            assert max_rel_error(y.float(), expected.float()) < (2e-6 if x.dtype == torch.float32 else 2e-2)
    assert calls == [big.shape]  # float32 NCHW at enough pixels only; not 16x16, NHWC or bfloat16
    with torch.enable_grad():  # under autograd: the plain convolution, so gradients flow
        conv.float()(big.requires_grad_()).sum().backward()
    assert len(calls) == 1 and big.grad is not None


@pytest.mark.skipif(not fused.available(), reason="this PyTorch build has no oneDNN ops in this form")
def test_fused_conv_keeps_the_direct_one_where_winograd_does_not_pay(monkeypatch):
    monkeypatch.setattr(winograd, "pays", lambda: False)
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: pytest.fail("Winograd ran where it does not pay"))
    conv = nn.Conv2d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, 32, 32)
    with torch.no_grad():
        assert max_rel_error(fused.conv2d(x, conv), reference(x, conv.weight, conv.bias).float()) < 2e-6


@pytest.mark.parametrize("slow, expected", [("winograd", False), ("direct", True)])
def test_pays_is_measured_against_the_direct_convolution(monkeypatch, slow, expected):
    """The probe times both and picks Winograd only where it is faster by the margin: here one side is made
    slow on purpose, so the answer does not depend on this CPU. Measured once per thread count."""
    def slowed(fn):
        return lambda *args, **kwargs: time.sleep(0.02) or fn(*args, **kwargs)

    monkeypatch.setattr(winograd, "PROBE", (1, 8, 8, 8))
    if slow == "winograd":
        monkeypatch.setattr(winograd, "conv3x3", slowed(winograd.conv3x3))
    else:
        monkeypatch.setattr(winograd.F, "conv2d", slowed(F.conv2d))
    winograd._pays.cache_clear()
    try:
        assert winograd.pays() is expected
        assert winograd._pays.cache_info().misses == 1 and winograd.pays() is expected
        assert winograd._pays.cache_info().hits == 1
    finally:
        winograd._pays.cache_clear()  # the other tests measure this CPU again, not the slowed functions
