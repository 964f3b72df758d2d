"""The fast blocks that ``optimize`` swaps in for the models' plain ones, for CPU inference.

Each subclasses the plain block it replaces and holds the very same layers (so the same Parameters and
state-dict keys; ``isinstance`` checks, LoRA merging and ``set_attention_chunk`` see no difference). Its
``forward`` means exactly the plain one, which it runs as it is wherever the kernels here do not apply:
under autograd, off the CPU, in float16, while ``torch.compile`` traces (``fused.cpu_inference``). Inside,
each layer still takes its plain call where it is not a bare ``nn.Linear`` / ``nn.Conv2d`` (a LoRA
wrapper, a layer with hooks such as sequential offload's; ``fused.is_plain``).

- ``FusedResnetBlock``, ``FusedDownsample``, ``FusedSpatialTransformer``: convolutions and linears through
  oneDNN, with the residual and time-embedding adds as their post-ops; few-pixel convolutions as matmuls
  and large float32 3x3 ones by Winograd (``fused.try_conv2d``).
- ``SubpixelUpsample``: nearest 2x + 3x3 convolution at the input's resolution (``subpixel``).
- ``FastCrossAttention``: fused projections, the bf16 attention kernel (``cpu_attention``), and the text
  context's keys and values reused across sampling steps.
- ``BandedFeedForward``: GEGLU fused into its projection, in bands of rows at large sizes.
- ``FastSelfAttention2d``: the VAE's attention through the bf16 attention kernel.
- ``FusedEncoderLayer``: CLIP's transformer layer with its linears through oneDNN, both residual adds
  and (where the activation is GELU) the activation as their post-ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip import MLP, EncoderLayer, SelfAttention
from ..models.layers import Downsample, ResnetBlock, Upsample, attention, attention_probabilities, repeat_rows, silu
from ..models.unet import CrossAttention, GEGLUFeedForward, SpatialTransformer
from ..models.vae import SelfAttention2d
from . import cpu_attention, fused, prepacked, subpixel


class FusedResnetBlock(ResnetBlock):
    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if not fused.cpu_inference(x):
            return super().forward(x, temb)
        # the adds ride on the convolutions: the time embedding as a (B, C, 1, 1) broadcast
        t = None if self.time_emb_proj is None else \
            repeat_rows(self.time_emb_proj(F.silu(temb))[:, :, None, None], x.shape[0])
        h = fused.conv2d(silu(self.norm1(x)), self.conv1, residual=t)
        skip = x if self.conv_shortcut is None else fused.conv2d(x, self.conv_shortcut)
        return fused.conv2d(silu(self.norm2(h)), self.conv2, residual=skip)


class FusedDownsample(Downsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused.cpu_inference(x):
            return super().forward(x)
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return fused.conv2d(x, self.conv)


class SubpixelUpsample(Upsample):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if subpixel.applies(x, self.conv):  # plain ops: under autograd too
            return subpixel.upsample_conv(x, prepacked.plain_weight(self.conv), self.conv.bias)
        if not fused.cpu_inference(x):
            return super().forward(x)
        return fused.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), self.conv)


class FastCrossAttention(CrossAttention):
    # (context copy, weight states, k, v) of the last cross-attention call; see _keys_values
    _context_cache: tuple | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, *,
                residual: torch.Tensor | None = None, extra: tuple | None = None) -> torch.Tensor:
        if not fused.cpu_inference(x):
            return super().forward(x, context, residual=residual, extra=extra)
        q = fused.linear(x, self.to_q)
        k, v = (fused.linear(x, self.to_k), fused.linear(x, self.to_v)) if context is None else \
            self._keys_values(context)
        if self.observer is not None:
            self.observer(attention_probabilities(q, k, self.num_heads).mean(dim=1))
        out = cpu_attention.attend(q, k, v, self.num_heads, chunk=self.attention_chunk)
        if extra is not None:  # an IP-Adapter's keys and values (see CrossAttention.forward)
            k_ip, v_ip, scale = extra
            rows = q.shape[0]
            out = out + scale * cpu_attention.attend(q, repeat_rows(k_ip, rows), repeat_rows(v_ip, rows),
                                                     self.num_heads)
        return fused.linear(out, self.to_out, residual=residual)

    def _keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """to_k(context), to_v(context). The text context is the same at every sampling step, so the pair
        is kept and reused while the context's values and both weights are unchanged. The context is
        compared by value (a copy is kept), so a context edited in place or rebuilt equal is handled.
        CPU inference only: on accelerators a captured CUDA graph would replay a stale pair."""
        weights = _weight_state(self.to_k), _weight_state(self.to_v)
        if not (fused.cpu_inference(context) and None not in weights and fused.is_plain(self.to_k)
                and fused.is_plain(self.to_v)):
            return fused.linear(context, self.to_k), fused.linear(context, self.to_v)
        cached = self._context_cache
        if (cached is not None and cached[1] == weights and cached[0].shape == context.shape
                and cached[0].dtype == context.dtype and torch.equal(cached[0], context)):
            return cached[2], cached[3]
        k, v = fused.linear(context, self.to_k), fused.linear(context, self.to_v)
        self._context_cache = (context.clone(), weights, k, v)
        return k, v


def _weight_state(layer: nn.Module) -> tuple | None:
    """What identifies a Linear's weights as unchanged: the tensors and their in-place edit counters (None
    where a tensor has no counter, as tensors made under inference mode)."""
    try:
        return tuple((id(p), p.data_ptr(), p._version) for p in layer.parameters())
    except RuntimeError:
        return None


class BandedFeedForward(GEGLUFeedForward):
    # On a CPU, glibc maps a block over 32 MB fresh from the OS at every allocation, and page faults fill
    # it in (SD 1.5's 64x64 level in fp32: 42 MB of (tokens, inner) activations). In bands of at most this
    # many bytes the activations come from reused memory, and the peak is smaller too.
    band_bytes = 16 << 20

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not fused.cpu_inference(x):
            return super().forward(x, residual=residual)
        rows = x.numel() // x.shape[-1]
        band = max(1, self.band_bytes // (self.proj_out.in_features * x.element_size()))
        if rows <= band or residual is None:
            return fused.linear(fused.geglu(x, self.proj_in), self.proj_out, residual=residual)
        flat, skip = x.reshape(rows, -1), residual.reshape(rows, -1)
        out = torch.empty_like(skip)
        for i in range(0, rows, band):
            out[i:i + band] = fused.linear(fused.geglu(flat[i:i + band], self.proj_in), self.proj_out,
                                           residual=skip[i:i + band])
        return out.view(residual.shape)


class FusedSpatialTransformer(SpatialTransformer):
    def forward(self, x: torch.Tensor, context: torch.Tensor, image_kv: list | None = None) -> torch.Tensor:
        if not fused.cpu_inference(x):
            return super().forward(x, context, image_kv)
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = fused.linear(h.permute(0, 2, 3, 1).reshape(B, H * W, C), self.proj_in)  # (B, HW, C)
        else:
            h = fused.conv2d(h, self.proj_in).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context, image_kv.pop() if image_kv else None)
        B = h.shape[0]  # more rows than x where latents shared by several contexts part ways
        if self.linear_projection:
            h = fused.linear(h, self.proj_out).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = fused.conv2d(h.reshape(B, H, W, C).permute(0, 3, 1, 2), self.proj_out)
        # h comes back in NHWC strides from the permute; x first keeps the result in x's layout, or the
        # following convolutions would reorder their weights on every call
        return repeat_rows(x, h.shape[0]) + h


class FastSelfAttention2d(SelfAttention2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused.cpu_inference(x):
            return super().forward(x)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.to_out(cpu_attention.attend(self.to_q(h), self.to_k(h), self.to_v(h), num_heads=1,
                                             chunk=self.attention_chunk))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class FusedEncoderLayer(EncoderLayer):
    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        if not (fused.cpu_inference(x) and _called_plainly(attn, SelfAttention) and _called_plainly(mlp, MLP)):
            return super().forward(x, causal)
        h = self.layer_norm1(x)
        q, k, v = (fused.linear(h, proj) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        h = attention(q, k, v, attn.num_heads, causal=causal, chunk=attn.attention_chunk)
        x = fused.linear(h, attn.out_proj, residual=x)
        h = self.layer_norm2(x)
        h = fused.linear_gelu(h, mlp.fc1) if mlp.act is F.gelu else mlp.act(fused.linear(h, mlp.fc1))
        return fused.linear(h, mlp.fc2, residual=x)


def _called_plainly(module: nn.Module, cls: type) -> bool:
    """Whether calling ``module`` would run just ``cls.forward`` (so its body may be inlined): that class
    exactly, no hooks."""
    return type(module) is cls and not module._forward_hooks and not module._forward_pre_hooks
