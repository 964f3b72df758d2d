"""The conditional U-Net of latent diffusion: ResBlocks + SpatialTransformers (self-attn, cross-attn, GEGLU).

Layout (SD 1.5 sizes): conv_in -> 4 down levels (320, 640, 1280, 1280 channels; 2 ResBlocks each,
attention at the first three, a stride-2 conv between levels) -> middle (Res, Attn, Res) -> 4 up levels
(3 ResBlocks each, fed the matching skip activations) -> GroupNorm, SiLU, conv_out.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from .layers import (
    Downsample,
    ResnetBlock,
    Upsample,
    attention,
    attention_probabilities,
    repeat_rows,
    silu,
    timestep_embedding,
)


class CrossAttention(nn.Module):
    """Attention from image tokens to ``context`` (cross) or to themselves (self, context=None)."""

    def __init__(self, query_dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.attention_chunk: int | None = None  # see layers.set_attention_chunk
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Linear(query_dim, query_dim)
        # Opt-in window for ``torchsd.explain``: when set, it is handed the attention probabilities,
        # averaged over heads, (B, Tq, Tk). Computing them costs an extra matmul, so only then.
        self.observer: Callable[[torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                residual: torch.Tensor | None = None, extra: tuple | None = None) -> torch.Tensor:
        """Attention output, plus ``residual`` if given (added to the output projection's fresh output).
        ``extra``: an IP-Adapter's (keys, values, scale): scale * attention over them is added before the
        output projection (decoupled cross-attention)."""
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)
        if self.observer is not None:
            self.observer(attention_probabilities(q, k, self.num_heads).mean(dim=1))
        out = attention(q, k, v, self.num_heads, chunk=self.attention_chunk)
        if extra is not None:
            k_ip, v_ip, scale = extra
            rows = q.shape[0]
            out = out + scale * attention(q, repeat_rows(k_ip, rows), repeat_rows(v_ip, rows), self.num_heads)
        out = self.to_out(out)
        return out if residual is None else out.add_(residual)


class GEGLUFeedForward(nn.Module):
    """Linear to 2x inner width, gate one half by GELU of the other (Shazeer 2020), Linear back."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        hidden, gate = self.proj_in(x).chunk(2, dim=-1)
        # at inference one allocation fewer: GELU's output is fresh, so the product can go into it
        h = hidden * F.gelu(gate) if torch.is_grad_enabled() else F.gelu(gate).mul_(hidden)
        out = self.proj_out(h)
        return out if residual is None else out.add_(residual)


class TransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention over the text context, feed-forward; each residual."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_kv: tuple | None = None) -> torch.Tensor:
        # each residual is added to the fresh output of its branch's last Linear
        x = self.attn1(self.norm1(x), residual=x)
        x = repeat_rows(x, context.shape[0])  # latents shared by several contexts part ways here
        x = self.attn2(self.norm2(x), context, residual=x, extra=image_kv)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """Treat the feature map as a sequence of H*W tokens and run transformer blocks over it.

    SD 1 projects in and out with 1x1 convs, SD 2 with Linear layers on the token sequence."""

    def __init__(self, channels: int, context_dim: int, num_heads: int, depth: int, groups: int,
                 linear_projection: bool):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        make_proj = (lambda: nn.Linear(channels, channels)) if linear_projection else \
            (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = make_proj()
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, context_dim, num_heads)
                                                for _ in range(depth))
        self.proj_out = make_proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_kv: list | None = None) -> torch.Tensor:
        """``image_kv``: IP-Adapter keys and values, one per block popped from the end (see UNet.forward)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context, image_kv.pop() if image_kv else None)
        B = h.shape[0]  # more rows than x where latents shared by several contexts part ways
        if self.linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))
        # h comes back in NHWC strides from the permute; x first keeps the result in x's layout, or the
        # following convolutions would reorder their weights on every call
        return repeat_rows(x, h.shape[0]) + h


class Level(nn.Module):
    """One resolution of the down or up path: ResBlocks, each optionally followed by a transformer,
    then an optional resampler (stored under diffusers' name, ``downsamplers`` or ``upsamplers``)."""

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer] | None,
                 resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resample_name = resample_name
        setattr(self, resample_name, nn.ModuleList([resample]) if resample is not None else None)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, run,
                skips: list[torch.Tensor] | None = None, residual: torch.Tensor | None = None,
                image_kv: list | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down levels return every output as a skip; up levels pop one skip per ResBlock. ``residual`` (a
        T2I-Adapter's feature) is added to the last ResBlock's and transformer's output in a level with
        transformers, and to the level's output (after its downsampler) in a level without: where diffusers'
        UNet2DConditionModel adds it, for which SDXL's adapters were trained (see ``level_residual_shapes``)."""
        outputs = []
        after = residual is not None and self.attentions is None
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                h = torch.cat([h, repeat_rows(skips.pop(), h.shape[0])], dim=1)
            h = run(resnet, h, emb)
            if self.attentions is not None:  # (image_kv only where given: swapped-in transformers may not take it)
                h = run(self.attentions[i], h, context, *([image_kv] if image_kv is not None else []))
            if residual is not None and not after and i == len(self.resnets) - 1:
                h = add_rows(h, residual)
            outputs.append(h)
        resample = getattr(self, self.resample_name)
        if resample is not None:
            h = resample[0](h)
            outputs.append(h)
        if after:
            h = outputs[-1] = add_rows(h, residual)
        return h, outputs


class MidBlock(nn.Module):
    """ResBlock, transformer, ResBlock at the lowest resolution."""

    def __init__(self, resnets: list[ResnetBlock], attention: SpatialTransformer):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([attention])

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, run,
                image_kv: list | None = None) -> torch.Tensor:
        h = run(self.resnets[0], h, emb)
        h = run(self.attentions[0], h, context, *([image_kv] if image_kv is not None else []))
        return run(self.resnets[1], h, emb)


def added_vector(pooled: torch.Tensor, micro_conditions: torch.Tensor, dim: int) -> torch.Tensor:
    """SDXL's added vector y: the pooled text (B, pooled_dim) beside each micro-conditioning number
    (B, n) as ``dim`` sinusoidal features, like a timestep's -> (B, pooled_dim + n*dim)."""
    B, n = micro_conditions.shape
    features = timestep_embedding(micro_conditions.reshape(-1), dim).reshape(B, n * dim)
    return torch.cat([pooled.float(), features], dim=-1).to(pooled.dtype)


def embed_inputs(time_embedding: nn.Module, add_embedding: nn.Module | None, model_channels: int, x: torch.Tensor,
                 timesteps: torch.Tensor | float, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``UNet.embed`` for any network with its ``time_embedding`` and ``add_embedding`` (a ControlNet's too)."""
    if (y is None) != (add_embedding is None):
        raise ValueError("this network takes the added vector y (pooled text + micro-conditioning)" if y is None
                         else "this network has no added embedding: pass y=None")
    timesteps = torch.as_tensor(timesteps, device=x.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(x.shape[0])
    if y is not None and y.shape[0] != x.shape[0]:
        x, timesteps = repeat_rows(x, y.shape[0]), repeat_rows(timesteps, y.shape[0])
    t_emb = timestep_embedding(timesteps, model_channels).to(x.dtype)
    emb = time_embedding(t_emb)  # (B, 4*model_channels)
    if y is not None:
        emb = emb + add_embedding(y.to(emb.dtype))
    return x, emb


def added_embedding(added_embed_dim: int, temb: int) -> nn.Sequential | None:
    """SDXL's MLP from the added vector y to the time embedding's width (None where the config has none)."""
    if not added_embed_dim:
        return None
    mlp = nn.Sequential()
    mlp.add_module("linear_1", nn.Linear(added_embed_dim, temb))
    mlp.add_module("act", nn.SiLU())
    mlp.add_module("linear_2", nn.Linear(temb, temb))
    return mlp


def block_builders(c: UNetConfig):
    """The ResBlock and transformer constructors of a U-Net config: (in, out) -> block, (width, depth) -> block."""
    def res(cin: int, cout: int) -> ResnetBlock:
        return ResnetBlock(cin, cout, temb_channels=c.time_embed_dim, groups=c.norm_groups, eps=1e-5)

    def transformer(width: int, depth: int) -> SpatialTransformer:
        return SpatialTransformer(width, c.context_dim, c.heads_at(width), depth, c.norm_groups,
                                  c.use_linear_projection)

    return res, transformer


def add_stem(net: nn.Module, c: UNetConfig) -> None:
    """``conv_in``, the time embedding MLP and SDXL's added embedding, under the names the U-Net's weights use
    (its ControlNet copy gets the same, so ``ControlNet.from_unet`` copies by key)."""
    temb = c.time_embed_dim
    net.conv_in = nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)
    net.time_embedding = nn.Sequential()
    net.time_embedding.add_module("linear_1", nn.Linear(c.model_channels, temb))
    net.time_embedding.add_module("act", nn.SiLU())
    net.time_embedding.add_module("linear_2", nn.Linear(temb, temb))
    # SDXL: the pooled text and the micro-conditioning, added to the time embedding
    net.add_embedding = added_embedding(c.added_embed_dim, temb)


def add_down_path(net: nn.Module, c: UNetConfig) -> list[int]:
    """``down_blocks`` and ``mid_block`` (the U-Net's and its ControlNet's); returns the width of every
    activation the down path keeps as a skip connection, in order."""
    res, transformer = block_builders(c)
    widths = [c.model_channels * m for m in c.channel_mult]
    skip_widths = [c.model_channels]
    net.down_blocks = nn.ModuleList()
    cin = c.model_channels
    for level, width in enumerate(widths):
        last = level == len(widths) - 1
        resnets, attns = [], []
        for _ in range(c.num_res_blocks):
            resnets.append(res(cin, width))
            if c.attention_levels[level]:
                attns.append(transformer(width, c.transformer_depth[level]))
            cin = width
            skip_widths.append(width)
        if not last:
            skip_widths.append(width)
        net.down_blocks.append(Level(resnets, attns, None if last else Downsample(width), "downsamplers"))
    net.mid_block = MidBlock([res(cin, cin), res(cin, cin)], transformer(cin, c.mid_transformer_depth))
    return skip_widths


def level_residual_shapes(c: UNetConfig) -> list[tuple[int, int]]:
    """(channels, how many times smaller than the latents) of each place ``UNet.forward`` adds a level residual
    (a T2I-Adapter's feature): one per down level, then the middle block's output. A level with transformers
    takes it before its downsampler, one without after it (``Level.forward``): SD 1.5's (320, 1), (640, 2),
    (1280, 4), (1280, 8), then (1280, 8); SDXL's (320, 2), (640, 2), (1280, 4), then (1280, 4)."""
    shapes = []
    for level, mult in enumerate(c.channel_mult):
        last = level == len(c.channel_mult) - 1
        shapes.append((c.model_channels * mult, 2 ** (level + (not c.attention_levels[level] and not last))))
    return shapes + [(c.model_channels * c.channel_mult[-1], 2 ** (len(c.channel_mult) - 1))]


class UNet(nn.Module):
    accepts_several_contexts = True  # see forward

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        c = config
        widths = [c.model_channels * m for m in c.channel_mult]
        add_stem(self, c)
        skip_widths = add_down_path(self, c)  # the width of every activation kept as a skip connection
        res, transformer = block_builders(c)
        cin = widths[-1]

        self.up_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            resnets, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                resnets.append(res(cin + skip_widths.pop(), width))
                if c.attention_levels[level]:
                    attns.append(transformer(width, c.transformer_depth[level]))
                cin = width
            up = Upsample(width) if level > 0 else None
            self.up_blocks.append(Level(resnets, attns, up, "upsamplers"))

        self.conv_norm_out = nn.GroupNorm(c.norm_groups, cin, eps=1e-5)
        self.conv_out = nn.Conv2d(cin, c.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def embed(self, x: torch.Tensor, timesteps: torch.Tensor | float, y: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents and the embedding every ResBlock reads: the timestep's, plus for SDXL-like configs the
        added vector ``y``'s. Where y has more rows than x (its own per context: cond and uncond pooled
        vectors), the embedding differs per context, so the latents are repeated to y's rows from the start."""
        return embed_inputs(self.time_embedding, self.add_embedding, self.config.model_channels, x, timesteps, y)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, context: torch.Tensor,
                y: torch.Tensor | None = None, *,
                down_residuals: list[torch.Tensor] | None = None, mid_residual: torch.Tensor | None = None,
                level_residuals: list[torch.Tensor] | None = None, image_keys_values: list | None = None
                ) -> torch.Tensor:
        """x: (B, in_channels, h, w) latents; timesteps: (B,) or a scalar; context: (k*B, T, context_dim);
        y: (k*B, added_embed_dim), the added vector of SDXL-like configs (see ``added_vector``).

        With k > 1 each latent is denoised under k contexts (rows ordered context-major: all B latents
        under the first, then under the second, ...), as classifier-free guidance asks for. Everything
        before the first cross-attention depends on the latent alone, so it runs once per latent and the
        result is repeated there: the same numbers as a (k*B) batch of repeated latents, for less work
        (the top level's ResBlock and self-attention: 3-4% of an SD 1.5 step at 512x512).

        ``down_residuals`` (one per skip connection, in the order they are made) and ``mid_residual`` are
        added to the skips and to the middle block's output: a ControlNet's outputs. ``level_residuals`` (a
        T2I-Adapter's features: one per down level, and for SDXL's adapters one more, added to the middle
        block's output) are added where ``level_residual_shapes`` says.
        ``image_keys_values``: an IP-Adapter's (keys, values, scale), one per cross-attention layer in the order
        they run (``IPAdapter.keys_values``)."""
        if context.shape[0] % x.shape[0]:
            raise ValueError(f"context has {context.shape[0]} rows for {x.shape[0]} latents; "
                             "it needs the same number or a whole multiple of it")
        x, emb = self.embed(x, timesteps, y)
        h = self.conv_in(x)
        skips = [h]
        image_kv = list(reversed(image_keys_values)) if image_keys_values else None  # popped in order
        if level_residuals is not None and len(level_residuals) not in (len(self.down_blocks),
                                                                        len(self.down_blocks) + 1):
            raise ValueError(f"level_residuals: {len(level_residuals)} tensors for {len(self.down_blocks)} down "
                             f"levels; give one per level, and optionally one for the middle block")
        for level, block in enumerate(self.down_blocks):
            h, outputs = block(h, emb, context, self._run,
                               residual=None if level_residuals is None else level_residuals[level],
                               image_kv=image_kv)
            skips.extend(outputs)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"down_residuals: {len(down_residuals)} tensors for {len(skips)} skip connections")
            skips = [add_rows(s, r) for s, r in zip(skips, down_residuals)]
        h = self.mid_block(h, emb, context, self._run, image_kv)
        if level_residuals is not None and len(level_residuals) > len(self.down_blocks):
            h = add_rows(h, level_residuals[-1])
        if mid_residual is not None:
            h = add_rows(h, mid_residual)
        for block in self.up_blocks:
            h, _ = block(h, emb, context, self._run, skips=skips, image_kv=image_kv)
        return self.conv_out(silu(self.conv_norm_out(h)))


def add_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b where one may hold the other's rows repeated for several contexts (see UNet.forward)."""
    rows = max(a.shape[0], b.shape[0])
    return repeat_rows(a, rows) + repeat_rows(b, rows)
