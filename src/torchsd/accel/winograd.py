"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016), for float32 on a CPU.

Each 2x2 block of outputs comes from a 4x4 tile d of the (padded) input. With the fixed matrices B, G, A
below, Y = A^T [ (G g G^T) . (B^T d B) ] A, where . multiplies elementwise over the 4x4 positions. Summed
over input channels, the 16 positions become 16 independent matrix products:

    M[k] = U[k] @ V[k],   U[k] = (G g G^T)[k]  (out, in),   V[k] = (B^T d B)[k]  (in, tiles)

16 multiplies per 2x2 outputs and channel pair instead of 36: 2.25x fewer for the matmuls that dominate, for
the price of the transforms (adds and subtracts over the input and output). cuDNN uses it for the same
convolutions; oneDNN on this CPU does not. In float32 the result differs from direct convolution only by
rounding (``tests/test_accel_winograd.py`` holds it under 2e-6 of the output's scale); in bfloat16 the rounded
transforms tripled the error, so it is float32 only.

Whether it wins depends on the CPU. Where the vector units are half as wide as AVX-512's registers (AMD
Zen 4 runs each 512-bit instruction as two 256-bit halves), oneDNN's direct convolution reaches half the rate it
does on full-width units, and Winograd's fewer products win (0.74-0.91x the direct time at SD 1.5's shapes);
on full-width units (Zen 5) the direct convolution runs near the matmul peak and the transforms, which are
memory-bound, cost more than the products save (1.3-1.6x the direct time). CPUID does not tell the two apart,
so ``pays`` measures it once per process and thread count (docs/performance.md, "Winograd").

The work goes in bands of tile rows: each band's padded input, V and M stay small enough to come from
cache and reused memory. Done on whole tensors, V and M were faulted in fresh at every call and the
transforms cost more than they saved (docs/performance.md, "Winograd" and "Tried and left out").
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

# G (4x3): the filter transform. B^T and A^T are applied below as explicit adds and subtracts:
#   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
# (G kron G): row 4i+j maps the 9 taps of g to position (i, j) of G g G^T
_GG = torch.kron(_G, _G).to(torch.float32)  # (16, 9)

BAND_BYTES = 8 << 20  # V of one band: 8 MB; 4 MB and 16 MB were both slower here (1 thread, SD 1.5 shapes)


PROBE = (1, 320, 64, 64)  # SD 1.5's top level at 512 px, one image: where Winograd gained most where it gains
MARGIN = 1.1  # how much faster than the direct convolution it must be: near a tie, keep the direct one


def pays() -> bool:
    """Whether Winograd beats oneDNN's direct convolution on this CPU at the current thread count (measured
    at its first use: ``PROBE``, interleaved, best of three each, Winograd at least ``MARGIN`` times faster)."""
    return _pays(torch.get_num_threads())


@functools.cache
def _pays(threads: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*PROBE, generator=gen)
    w = torch.randn(PROBE[1], PROBE[1], 3, 3, generator=gen) * 0.02
    best = {"direct": float("inf"), "winograd": float("inf")}
    candidates = {"direct": lambda: F.conv2d(x, w, padding=1), "winograd": lambda: conv3x3(x, w)}
    with torch.inference_mode():
        for lap in range(4):  # lap 0 warms both up and is not counted
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                if lap:
                    best[name] = min(best[name], time.perf_counter() - start)
    return best["winograd"] * MARGIN <= best["direct"]


def applies(x: torch.Tensor, weight: torch.Tensor, padding, stride, dilation, groups: int) -> bool:
    """What ``conv3x3`` computes: float32 in NCHW, a 3x3 kernel with stride 1, padding 1, no dilation or
    groups, even height and width. (In NHWC the transforms' strided reads made it slower than oneDNN's
    direct convolution from 128 channels at 256x256 up.)"""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.ndim == 4 and x.is_contiguous()
            and tuple(weight.shape[2:]) == (3, 3) and tuple(padding) == (1, 1) and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0)


def filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T for every (out, in) pair: (out, in, 3, 3) -> (16, out, in)."""
    out_channels, C = weight.shape[:2]
    return (_GG.to(weight.device) @ weight.reshape(out_channels * C, 9).t()).view(16, out_channels, C)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1) + residual`` (residual: the output's shape, or (B, out, 1, 1))."""
    B, C, H, W = x.shape
    out_channels = weight.shape[0]
    th, tw = H // 2, W // 2
    U = filter_transform(weight)
    y = torch.empty(B, out_channels, H, W, dtype=x.dtype, device=x.device)
    # y's 2x2 output blocks as (row parity, column parity, out_channels, B, tile row, tile column)
    blocks = y.view(B, out_channels, th, 2, tw, 2).permute(3, 5, 1, 0, 2, 4)
    rows_per_band = max(1, min(th, BAND_BYTES // (16 * C * B * tw * x.element_size())))
    V = torch.empty(16, C, B, rows_per_band, tw, dtype=x.dtype, device=x.device)
    M = torch.empty(16, out_channels, B * rows_per_band * tw, dtype=x.dtype, device=x.device)
    for t0 in range(0, th, rows_per_band):
        n = min(rows_per_band, th - t0)
        Vb, Mb = (V, M) if n == rows_per_band else (V[:, :, :, :n], M[:, :, :B * n * tw])
        _input_transform(_padded_rows(x, 2 * t0 - 1, 2 * (t0 + n) + 1), Vb, n, W)
        torch.bmm(U, Vb.reshape(16, C, B * n * tw), out=Mb)
        _output_transform(Mb.view(4, 4, out_channels, B, n, tw), blocks[:, :, :, :, t0:t0 + n])
    if bias is not None:
        y += bias.view(1, out_channels, 1, 1)
    if residual is not None:
        y += residual
    return y


def _padded_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of x zero-padded by one pixel all round (rows outside x are zeros): one band's
    input, so that no padded copy of the whole input is ever held (at the VAE's 512x512 level, 268 MB)."""
    H = x.shape[2]
    return F.pad(x[:, :, max(start, 0):min(stop, H)], (1, 1, max(-start, 0), max(stop - H, 0)))


def _input_transform(xp: torch.Tensor, V: torch.Tensor, n: int, W: int) -> None:
    """V[4i+j] = (B^T d B)[i, j] for the 4x4 tiles of ``xp`` (padded input rows of one band) at stride 2."""
    r = [xp[:, :, i:i + 2 * n:2] for i in range(4)]  # row i of every tile: (B, C, n, W+2)
    t = (r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3])
    for i in range(4):
        c = [t[i][..., j:j + W:2] for j in range(4)]  # column j of every tile: (B, C, n, W/2)
        out = [V[4 * i + j].transpose(0, 1) for j in range(4)]  # (B, C, n, W/2) views into V
        torch.sub(c[0], c[2], out=out[0])
        torch.add(c[1], c[2], out=out[1])
        torch.sub(c[2], c[1], out=out[2])
        torch.sub(c[1], c[3], out=out[3])


def _output_transform(M: torch.Tensor, blocks: torch.Tensor) -> None:
    """blocks[p, q] = (A^T m A)[p, q] from M (4, 4, O, B, n, tw) into the output's (2, 2, O, B, n, tw) view."""
    s = (M[0] + M[1] + M[2], M[1] - M[2] - M[3])  # A^T applied to the rows: (4, O, B, n, tw) each
    for p in range(2):
        torch.add(s[p][0] + s[p][1], s[p][2], out=blocks[p, 0])
        torch.sub(s[p][1] - s[p][2], s[p][3], out=blocks[p, 1])
