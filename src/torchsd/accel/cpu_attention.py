"""bfloat16 attention on the CPU as per-head oneDNN matmuls, with the softmax folded into their operands.

On a CPU with AVX-512 BF16 but no AMX (this project's AMD EPYC), PyTorch's CPU flash-attention kernel
runs bfloat16 no faster than float32, while oneDNN's bf16 matmuls run at about twice its float32 rate
(docs/performance.md, "bf16 attention as per-head matmuls"). (With AMX, PyTorch's kernel
uses the tiles and is faster than this one; see ``_has_amx``.) This computes softmax(Q K^T / sqrt(d)) V
for one head and one block of queries at a time with two such matmuls, and moves the softmax's own
bookkeeping into them:

- The shift. A bf16 matmul rounds its output, and rounding the logits themselves costs precision where
  they are large (a logit of 8 is rounded by up to 0.03, which moves its weight by 3%). So the row's
  maximum ``m`` (flash attention's running max) is subtracted inside the product, by one extra column:
  ``[Q / sqrt(d), -m] . [K, 1]^T = Q K^T / sqrt(d) - m``. Only the shifted logits are rounded; the
  ones that carry the weight are near 0, where bf16 is fine.
- The denominator. ``l = sum_j exp(s_ij)`` is the last row of ``[V, 1]^T . P^T``: a row of ones
  appended to V. The output is ``(P V) / l``, so P is never normalised.

``m`` need not be exact, since any per-row shift cancels in ``P V / l``; it only has to keep the
shifted logits of the keys that matter small. It is estimated before the matmul from every 8th key and
the query's own key (self-attention's usual peak). Rows whose shifted maximum still exceeds ``DELTA``
are shifted by that maximum and recomputed, so every row ends with its largest logit in [~0, DELTA].

The U-Net's output is as close to float32 as with PyTorch's kernel; ``tests/test_accel_cpu_attention.py``
checks the kernel against float64 attention, including rows whose peak the estimate misses. The models
call ``models.layers.attention``; the attention blocks ``accel.optimize`` swaps in call ``attend``.
"""

from __future__ import annotations

import functools

import torch

from ..models import layers
from . import fused

DELTA = 2.0  # largest shifted logit left in place; exp(2) keeps the top weights' rounding under 1%
_DELTA_BITS = int(torch.tensor(DELTA, dtype=torch.bfloat16).view(torch.int16))
# Keys per thread from which this is faster: its per-head matmuls gain less from more threads than
# PyTorch's kernel, which splits heads and query blocks across them (docs/performance.md).
MIN_KEYS_PER_THREAD = 1024
BLOCK = 256  # queries per matmul: a (256, keys) bf16 score block stays in this CPU's L2 at 4096 keys
_STRIDE = 8  # every 8th key for the estimate of the row maximum: 1/8 of a Q K^T matmul


def applies(q: torch.Tensor, k: torch.Tensor, causal: bool, mask: torch.Tensor | None) -> bool:
    """CPU bfloat16 inference without a mask, over enough keys to pay off, on a CPU without AMX."""
    return (q.dtype == k.dtype == torch.bfloat16 and fused.cpu_inference(q) and not causal and mask is None
            and k.shape[1] >= MIN_KEYS_PER_THREAD * torch.get_num_threads() and not _has_amx())


@functools.cache
def _has_amx() -> bool:
    """With AMX tiles PyTorch's flash kernel runs bf16 through them and is the faster one
    (docs/performance.md; benchmarks/cpu_attention_threads.py). Unknown counts as present: PyTorch's
    kernel is the safe side."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return True if probe is None else bool(probe())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, *,
           chunk: int | None = None) -> torch.Tensor:
    """``layers.attention(q, k, v, num_heads, chunk=chunk)`` (no mask, not causal), through this kernel
    where it applies."""
    if applies(q, k, False, None):
        return attention(q, k, v, num_heads, block=chunk)
    return layers.attention(q, k, v, num_heads, chunk=chunk)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
              block: int | None = None) -> torch.Tensor:
    """q (B, Tq, C), k and v (B, Tk, C), all bf16 -> (B, Tq, C); ``block`` caps the queries per matmul."""
    if block is not None and block < 1:
        raise ValueError(f"attention block must be a positive number of queries; got {block}")
    B, Tq, C = q.shape
    Tk, d = k.shape[1], C // num_heads
    block = min(block or BLOCK, BLOCK)
    out = torch.empty(B, Tq, C, dtype=q.dtype)
    q, k, v, heads_out = (t.view(B, -1, num_heads, d) for t in (q, k, v, out))  # (B, T, heads, d) views
    # Augmented operands, reused for every head: Qa = [Q / sqrt(d), -m, 0], Ka = [K, 1, 0] (the zero
    # column keeps the inner size even, as oneDNN's bf16 kernels take values in pairs), Vt = [V, 1]^T.
    Qa, Ka, Vt = q.new_zeros(Tq, d + 2), k.new_zeros(Tk, d + 2), v.new_empty(d + 1, Tk)
    Ka[:, d] = 1
    Vt[d] = 1
    for b in range(B):
        for h in range(num_heads):
            Q = torch.mul(q[b, :, h], d ** -0.5)  # rounded once, scaled in fp32
            K = k[b, :, h]
            m = fused.matmul_nt(Q, K[::_STRIDE].contiguous()).amax(-1)
            if Tq == Tk:
                m = torch.maximum(m, (Q * K).sum(-1))  # q_i . k_i, in bf16: any value near an attained one will do
            Qa[:, :d], Qa[:, d] = Q, -m
            Ka[:, :d] = K
            Vt[:d] = v[b, :, h].t()
            for i in range(0, Tq, block):
                s = _shifted_logits(Qa[i:i + block], Ka, d)
                o = fused.matmul_nt(Vt, s.exp_())  # (d + 1, block): P V and, last, l
                torch.div(o[:d], o[d], out=heads_out[b, i:i + block, h].t())
    return out


def _shifted_logits(Qa: torch.Tensor, Ka: torch.Tensor, d: int) -> torch.Tensor:
    """Q K^T / sqrt(d) - m for a block of queries, with each row's maximum at most ~DELTA.

    The check reads the bf16 bits as int16: for positive values their order is the same, and negative
    values (sign bit set) are negative integers, so ``bits > bits(DELTA)`` is ``value > DELTA``. NaN
    rows are flagged too, and stay NaN."""
    s = fused.matmul_nt(Qa, Ka)
    high = s.view(torch.int16).amax(-1) > _DELTA_BITS
    if high.any():
        rows = high.nonzero()[:, 0]
        Qa[rows, d] -= s[rows].float().amax(-1).to(Qa.dtype)
        s[rows] = fused.matmul_nt(Qa[rows], Ka)
    return s
