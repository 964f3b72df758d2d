"""Nearest 2x upsampling followed by a 3x3 convolution, computed at the input's resolution.

After nearest upsampling each output pixel's 3x3 window covers only a 2x2 patch of the input, and which
taps land on which input pixel depends only on the output pixel's parity (even/odd row x even/odd
column). So the 3x3 kernel folds into four 2x2 kernels (taps that land on the same source pixel summed),
each run on the input itself: 16 instead of 36 multiply-adds per input pixel and channel pair, no
upsampled map in memory, and the same result up to float rounding of the summed weights (the
"resize-convolution" identity). Plain PyTorch ops, so it also runs under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fused

# Feature-map pixels from which folding the weight on each call pays: 16x16, and in bf16 8x8 where the
# batch has at least a tenth of an input pixel per channel (docs/performance.md, "Sub-pixel upsampling").
# Not on CUDA, whose 3x3 convolutions already use Winograd's saving.
MIN_PIXELS = 256
MIN_PIXELS_BF16 = 64

# _TAPS[p, a, k]: for output pixels of parity p, which source offset a (0: the earlier of the two source
# pixels the 3-tap window covers, 1: the later) each kernel tap k reads after nearest 2x upsampling.
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],    # even: tap 0 -> i-1; taps 1, 2 -> i
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])   # odd: taps 0, 1 -> i; tap 2 -> i+1


def applies(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """On a CPU, for a plain 3x3 same-padding convolution, where the map is large enough to pay."""
    B, C, H, W = x.shape
    enough = H * W >= MIN_PIXELS or (x.dtype == torch.bfloat16 and H * W >= MIN_PIXELS_BF16 and 10 * B * H * W >= C)
    return (x.device.type == "cpu" and enough and fused.is_plain(conv)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=2), weight, bias, padding=1)`` by four 2x2 convolutions."""
    B, C, H, W = x.shape
    out_channels = weight.shape[0]
    taps = _TAPS.to(x.device)
    # (3x3 taps, parity, 2x2 taps) of 0s and 1s: exact in any dtype, and a bf16 matmul sums in fp32, so
    # each folded weight is rounded once, as folding in fp32 and casting would
    fold = torch.einsum("pak,qcl->klpqac", taps, taps).reshape(9, 4, 4).to(weight.dtype)
    w = weight.reshape(out_channels * C, 9)
    y = torch.empty((B, out_channels, 2 * H, 2 * W), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if fused.is_channels_last(x) else torch.contiguous_format)
    parities = y.view(B, out_channels, H, 2, W, 2)
    for py in range(2):
        for px in range(2):
            folded = (w @ fold[:, 2 * py + px]).view(out_channels, C, 2, 2)
            # padded by 1 all round, a 2x2 kernel gives (H+1, W+1) outputs; even rows/columns read
            # pixels i-1 and i (the first H), odd ones i and i+1 (the last H). One parity at a time: the
            # peak is one (B, out_channels, H+1, W+1) map beside the result, not four
            out = F.conv2d(x, folded, bias, padding=1)
            parities[:, :, :, py, :, px] = out[:, :, py:py + H, px:px + W]
    return y
