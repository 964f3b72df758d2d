"""bfloat16 CPU attention (accel/cpu_attention.py) against float64 attention on the same bf16 inputs:
accurate where the row-max estimate is good, fixed up where it misses the peak, NaN where SDPA gives NaN,
and taken by ``attend`` (the optimized attention blocks' call) only where it applies; the models'
``layers.attention`` is always PyTorch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

from torchsd.accel import cpu_attention, fused
from torchsd.models import layers

pytestmark = pytest.mark.skipif(not fused.available(), reason="this PyTorch build has no oneDNN ops in this form")


def reference(q, k, v, heads):
    """float64 SDPA on the same (bf16-valued) inputs, (B, T, C) layout."""
    B, Tq, C = q.shape

    def split(t):
        return t.double().view(B, -1, heads, C // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(B, Tq, C)


def rel(y, ref):
    return float((y.double() - ref).norm() / ref.norm())


def sdpa_bf16(q, k, v, heads):
    B, Tq, C = q.shape

    def split(t):
        return t.view(B, -1, heads, C // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(B, Tq, C)


@pytest.mark.parametrize("B,Tq,Tk,C,heads", [(2, 1024, 1024, 320, 8), (1, 1024, 1024, 64, 1), (1, 300, 1100, 160, 2)])
def test_matches_float64_attention_as_closely_as_sdpa(B, Tq, Tk, C, heads):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, Tq, C, generator=g) * 1.5).bfloat16()
    k = (torch.randn(B, Tk, C, generator=g) * 1.5 + 0.5).bfloat16()  # a shared key component, as trained models have
    v = torch.randn(B, Tk, C, generator=g).bfloat16()
    ref = reference(q, k, v, heads)
    ours = cpu_attention.attention(q, k, v, heads)
    theirs = sdpa_bf16(q, k, v, heads)
    assert ours.dtype == torch.bfloat16 and ours.shape == (B, Tq, C)
    # measured: ours about 4e-3, PyTorch's bf16 kernel about 2e-3; one bf16 rounding of the output is ~1e-3
    assert rel(ours, ref) < max(2.5 * rel(theirs, ref), 6e-3)


def test_rows_whose_peak_the_estimate_misses_are_shifted_again(monkeypatch):
    """Two keys, neither sampled (indices 3 and 5 are not multiples of 8) nor on the diagonal for most of
    the first 64 queries, far above the rest for those queries (logits near 12 and 11.4): their shifted
    logits come out near 12, where bf16 rounds by up to 0.03, unless the rows are shifted again."""
    g = torch.Generator().manual_seed(1)
    T, C = 1024, 40
    e = torch.randn(C, generator=g)
    e /= e.norm()
    q = torch.randn(1, T, C, generator=g)
    q[0, :64] = 3 * e + 0.1 * torch.randn(64, C, generator=g)
    k = torch.randn(1, T, C, generator=g) * 0.3
    k[0, 3], k[0, 5] = 25 * e, 24 * e  # logits 3 * 25 / sqrt(40) ~ 11.9 and ~ 11.4
    q, k, v = q.bfloat16(), k.bfloat16(), torch.randn(1, T, C, generator=g).bfloat16()
    ref = reference(q, k, v, 1)
    calls = []
    real = fused.matmul_nt
    with monkeypatch.context() as patch:
        patch.setattr(fused, "matmul_nt", lambda a, b: calls.append(a.shape[0]) or real(a, b))
        ours = cpu_attention.attention(q, k, v, 1)
    fixed = [n for n in calls if n not in (T, cpu_attention.BLOCK, C + 1)]  # the recomputed rows
    assert fixed and sum(fixed) >= 32, calls
    assert rel(ours[0, :64], ref[0, :64]) < 6e-3

    monkeypatch.setattr(cpu_attention, "_DELTA_BITS", torch.iinfo(torch.int16).max)  # never fix up:
    unfixed = cpu_attention.attention(q, k, v, 1)  # the same rows lose precision
    assert rel(unfixed[0, :64], ref[0, :64]) > 1.5 * rel(ours[0, :64], ref[0, :64])


def test_nan_spreads_as_in_sdpa():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1024, 32, generator=g).bfloat16() for _ in range(3))
    q[0, 5, 0] = float("nan")
    out = cpu_attention.attention(q, k, v, 2)
    assert out[0, 5, :16].isnan().all() and out[0, 5, 16:].isfinite().all()  # the NaN's row, in its head only
    assert out[0, :5].isfinite().all() and out[0, 6:].isfinite().all()
    k[0, 7, 20] = float("nan")
    assert cpu_attention.attention(q, k, v, 2)[..., 16:].isnan().all()  # every query sees that key


def test_block_size_does_not_change_the_result():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 1024, 64, generator=g).bfloat16() for _ in range(3))
    assert torch.equal(cpu_attention.attention(q, k, v, 4), cpu_attention.attention(q, k, v, 4, block=100))
    for bad in (0, -5):
        with pytest.raises(ValueError, match="positive number of queries"):
            cpu_attention.attention(q, k, v, 4, block=bad)
        with torch.inference_mode(), pytest.raises(ValueError, match="positive number of queries"):
            cpu_attention.attend(q, k, v, 4, chunk=bad)


def test_attend_takes_it_only_for_bf16_inference_over_many_keys_without_amx(monkeypatch):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1024, 64, generator=g).bfloat16() for _ in range(3))
    monkeypatch.setattr(cpu_attention, "MIN_KEYS_PER_THREAD", 1024 / torch.get_num_threads())  # from 1024 keys
    monkeypatch.setattr(cpu_attention, "_has_amx", lambda: True)  # PyTorch's kernel uses AMX: faster
    with torch.inference_mode():
        assert torch.equal(cpu_attention.attend(q, k, v, 2), sdpa_bf16(q, k, v, 2))
    monkeypatch.setattr(cpu_attention, "_has_amx", lambda: False)
    with torch.inference_mode():
        assert torch.equal(cpu_attention.attend(q, k, v, 2), cpu_attention.attention(q, k, v, 2))
        assert torch.equal(layers.attention(q, k, v, 2), sdpa_bf16(q, k, v, 2))  # the models' own: plain
        assert torch.equal(cpu_attention.attend(q, k[:, :1000], v[:, :1000], 2),
                           sdpa_bf16(q, k[:, :1000], v[:, :1000], 2))
        assert torch.equal(cpu_attention.attend(q.float(), k.float(), v.float(), 2),
                           sdpa_bf16(q.float(), k.float(), v.float(), 2))
    qg = q.clone().requires_grad_()
    out = cpu_attention.attend(qg, k, v, 2)  # autograd: SDPA, which has a backward
    out.float().sum().backward()
    assert qg.grad is not None and torch.equal(out.detach(), sdpa_bf16(q, k, v, 2))


def test_more_threads_need_more_keys(monkeypatch):
    """PyTorch's kernel spreads heads over threads and gains more from them: 1024 keys per thread."""
    monkeypatch.setattr(cpu_attention, "_has_amx", lambda: False)
    threads = torch.get_num_threads()
    q, k = torch.zeros(1, 8, 64, dtype=torch.bfloat16), torch.zeros(1, 2048, 64, dtype=torch.bfloat16)
    try:
        with torch.inference_mode():
            torch.set_num_threads(1)
            assert cpu_attention.applies(q, k[:, :1024], False, None)
            torch.set_num_threads(2)
            assert not cpu_attention.applies(q, k[:, :1024], False, None) and cpu_attention.applies(q, k, False, None)
            assert not cpu_attention.applies(q.float(), k.float(), False, None)  # bf16 only
        assert not cpu_attention.applies(q, k, False, None)  # autograd: PyTorch's kernel, which has a backward
    finally:
        torch.set_num_threads(threads)
