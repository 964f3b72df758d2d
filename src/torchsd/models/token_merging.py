"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "ToMe for SD"): merge similar tokens before
self-attention, unmerge after.

In the transformer blocks of the top U-Net levels, the image tokens are split into destinations (one per
sx x sy cell: its top-left token, tomesd's ``use_rand=False``, so a seed gives the same image) and sources
(the rest); the r = ratio * N sources most similar (cosine, on the block's input) to some destination are
averaged into it. Self-attention runs on the N - r tokens left, and each merged source takes its
destination's output back. Cross-attention and the feed-forward see all tokens (tomesd's defaults, which
AUTOMATIC1111 uses too). The price is an approximate image (docs/performance.md).

``token_merging(unet, ratio)`` swaps ``TokenMergingTransformer`` variants in for the run, sharing every
weight with the originals (module paths unchanged: LoRAs merge into the same layers), and swaps the originals
back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .layers import repeat_rows
from .unet import SpatialTransformer, TransformerBlock, UNet

Merge = Callable[[torch.Tensor], torch.Tensor]


def bipartite_soft_matching(metric: torch.Tensor, height: int, width: int, r: int,
                            stride: tuple[int, int] = (2, 2)) -> tuple[Merge, Merge]:
    """ToMe for SD, Sec. 3 (2-D strided destinations, no randomness): (merge, unmerge) for tokens (B, N, C)
    laid out row-major on a height x width grid, merging the r source tokens most similar to a destination."""
    B, N, _ = metric.shape
    sy, sx = stride
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    is_destination = torch.zeros(height, width, dtype=torch.bool, device=metric.device)
    is_destination[:height // sy * sy:sy, :width // sx * sx:sx] = True  # cells cut by the edge get none
    is_destination = is_destination.flatten()
    dst_tokens = is_destination.nonzero().squeeze(1)  # (Nd,) grid positions
    src_tokens = (~is_destination).nonzero().squeeze(1)  # (Ns,)
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        scores = unit[:, src_tokens] @ unit[:, dst_tokens].transpose(-1, -2)  # (B, Ns, Nd) cosine similarity
        r = min(r, len(src_tokens))
        best, best_dst = scores.max(dim=-1)  # each source's closest destination
        order = best.argsort(dim=-1, descending=True)
        kept, merged = order[:, r:], order[:, :r]  # (B, Ns - r), (B, r) indices into the sources
        merged_into = best_dst.gather(1, merged)  # (B, r) indices into the destinations

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # x (B, M, C), index (B, k) -> (B, k, C)
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, src_tokens], x[:, dst_tokens]
        # a destination becomes the mean of itself and the sources merged into it
        dst = dst.scatter_reduce(1, merged_into[..., None].expand(-1, -1, x.shape[-1]), take(src, merged),
                                 reduce="mean")
        return torch.cat([take(src, kept), dst], dim=1)  # (B, N - r, C)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        C = y.shape[-1]
        n_kept = kept.shape[1]
        kept_out, dst_out = y[:, :n_kept], y[:, n_kept:]
        out = y.new_zeros(B, N, C)
        out[:, dst_tokens] = dst_out
        out.scatter_(1, src_tokens[kept][..., None].expand(-1, -1, C), kept_out)
        out.scatter_(1, src_tokens[merged][..., None].expand(-1, -1, C), take(dst_out, merged_into))
        return out

    return merge, unmerge


def _adopt(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``module``'s own submodules and attributes (no copy of any weight), and its
    hooks (offloading's, torchsd.explain's), which keep working on the variant."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key, value in module.__dict__.items():
        if key not in ("_modules", "_parameters", "_buffers"):
            new.__dict__[key] = value
    new._modules, new._parameters, new._buffers = (dict(d) for d in (module._modules, module._parameters,
                                                                      module._buffers))
    return new


class TokenMergingBlock(TransformerBlock):
    """TransformerBlock with ToMe around self-attention; needs the token grid's size."""

    ratio: float

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        height, width = size
        merge, unmerge = bipartite_soft_matching(x, height, width, int(x.shape[1] * self.ratio))
        x = unmerge(self.attn1(merge(self.norm1(x)))) + x  # (B, N, C) again
        x = repeat_rows(x, context.shape[0])
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class TokenMergingTransformer(SpatialTransformer):
    """SpatialTransformer whose blocks merge tokens: as SpatialTransformer.forward, handing them the grid size."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context, size=(H, W))
        B = h.shape[0]
        if self.linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))
        return repeat_rows(x, h.shape[0]) + h


def _merging_variant(transformer: SpatialTransformer, ratio: float) -> TokenMergingTransformer:
    variant = _adopt(TokenMergingTransformer, transformer)
    blocks = []
    for block in transformer.transformer_blocks:
        merging = _adopt(TokenMergingBlock, block)
        merging.ratio = ratio
        blocks.append(merging)
    variant.transformer_blocks = nn.ModuleList(blocks)
    return variant


@contextmanager
def token_merging(unet: UNet, ratio: float, max_downsample: int = 1) -> Iterator[None]:
    """Within: ``unet``'s transformers at levels downsampled at most ``max_downsample`` times merge ``ratio``
    of their tokens (tomesd's ``max_downsample``: 1 = the top level only, 8 = all of SD's)."""
    swapped: list[tuple[nn.ModuleList, int, nn.Module]] = []
    levels = len(unet.down_blocks)
    places = [(block, 2 ** i) for i, block in enumerate(unet.down_blocks)]
    places += [(block, 2 ** (levels - 1 - i)) for i, block in enumerate(unet.up_blocks)]
    places += [(unet.mid_block, 2 ** (levels - 1))]
    for block, downsample in places:
        if downsample > max_downsample or block.attentions is None:
            continue
        for i, transformer in enumerate(block.attentions):
            swapped.append((block.attentions, i, transformer))
            block.attentions[i] = _merging_variant(transformer, ratio)
    try:
        yield
    finally:
        for attentions, i, transformer in swapped:
            attentions[i] = transformer
