"""FLUX.1's transformer (Black Forest Labs 2024): the MMDiT's joint blocks with rotary positions, followed by
single-stream blocks in which text and image tokens share all weights and attention runs in parallel with
the MLP (Dehghani et al. 2023's "parallel layers": one input norm, one fused output projection).

Positions: every token has three ids, (0, 0, 0) for text and (0, row, column) for image patches; each
attention head rotates its channels by angles of those ids (RoPE, Su et al. 2021), 16 channels for the
first axis and 56 for each image axis, so attention sees relative 2-D offsets and any image size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FluxConfig
from .layers import timestep_embedding
from .mmdit import QKV, EmbedMLP, Stream, joint_attention, layer_norm, modulate


def rope_rotations(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """ids (T, axes) -> (T, head_dim/2, 2, 2) rotation matrices; axis a turns its d_a/2 channel pairs at
    frequencies theta^(-2i/d_a), as the BFL code and diffusers' FluxPosEmbed."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, axis].double()[:, None] * freqs[None])  # (T, dim/2)
    angle = torch.cat(angles, dim=1)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(*angle.shape, 2, 2).float()


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """(h*w, 3) ids (0, row, column) of the patch tokens, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).float()


def pack(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p) tokens, channels outermost within a patch (FLUX.1's packing)."""
    B, C, H, W = latents.shape
    x = latents.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpack(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """The inverse of ``pack``: (B, h*w, C*p*p) -> (B, C, h*p, w*p)."""
    B = tokens.shape[0]
    x = tokens.view(B, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, -1, h * p, w * p)


class DoubleBlock(nn.Module):
    """A joint block as the MMDiT's, text tokens first so that the rotations line up with the ids."""

    def __init__(self, c: FluxConfig):
        super().__init__()
        self.image = Stream(c.width, c.head_dim, qk_norm=True)
        self.text = Stream(c.width, c.head_dim, qk_norm=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor, rope: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, N, width) image tokens, context: (B, L, width) text tokens, c: (B, width)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.image.modulation(F.silu(c)).chunk(6, dim=1)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            self.text.modulation(F.silu(c)).chunk(6, dim=1)
        context_attn, x_attn = joint_attention(
            [self.text.attn(modulate(layer_norm(context), c_shift_msa, c_scale_msa)),
             self.image.attn(modulate(layer_norm(x), shift_msa, scale_msa))], rope)
        x = x + gate_msa[:, None] * self.image.attn.out(x_attn)
        x = x + gate_mlp[:, None] * self.image.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))
        context = context + c_gate_msa[:, None] * self.text.attn.out(context_attn)
        context = context + c_gate_mlp[:, None] * self.text.mlp(modulate(layer_norm(context), c_shift_mlp,
                                                                          c_scale_mlp))
        return x, context


class SingleBlock(nn.Module):
    """x + gate * out([attention(h) | gelu(mlp_in(h))]), h = modulated LayerNorm(x), over all tokens."""

    def __init__(self, c: FluxConfig):
        super().__init__()
        self.modulation = nn.Linear(c.width, 3 * c.width)
        self.attn = QKV(c.width, c.head_dim, qk_norm=True, out=False)
        self.mlp_in = nn.Linear(c.width, c.mlp_dim)
        self.out = nn.Linear(c.width + c.mlp_dim, c.width)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x: (B, L + N, width), text tokens first."""
        shift, scale, gate = self.modulation(F.silu(c)).chunk(3, dim=1)
        h = modulate(layer_norm(x), shift, scale)
        (attn,) = joint_attention([self.attn(h)], rope)
        mlp = F.gelu(self.mlp_in(h), approximate="tanh")
        return x + gate[:, None] * self.out(torch.cat([attn, mlp], dim=2))  # (B, L + N, width)


class Flux(nn.Module):
    """(latents (B, C, H, W), timesteps (B,) in 0..1000, context (B, L, context_dim), pooled (B, pooled_dim),
    guidance (B,) scale, dev only) -> velocity (B, C, H, W)."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        self.image_in = nn.Linear((c.latent_channels + c.condition_channels) * c.patch_size ** 2, c.width)
        self.context_in = nn.Linear(c.context_dim, c.width)
        self.time_embed = EmbedMLP(256, c.width)
        self.guidance_embed = EmbedMLP(256, c.width) if c.guidance_embeds else None
        self.pooled_embed = EmbedMLP(c.pooled_dim, c.width)
        self.double_blocks = nn.ModuleList(DoubleBlock(c) for _ in range(c.num_double_blocks))
        self.single_blocks = nn.ModuleList(SingleBlock(c) for _ in range(c.num_single_blocks))
        self.final_modulation = nn.Linear(c.width, 2 * c.width)
        self.final_proj = nn.Linear(c.width, c.patch_size ** 2 * c.latent_channels)

    def with_condition(self, x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """x with FLUX.1 Fill's condition channels after its own (B, C + cc, H, W). Packing keeps each channel's
        2x2 patch together, so this is diffusers' concatenation of the packed tokens. A condition made for one
        image serves a batch of its copies (classifier-free guidance's two halves)."""
        cc = self.config.condition_channels
        if cc == 0:
            if condition is not None:
                raise ValueError("this FLUX.1 transformer takes no condition channels (only FLUX.1 Fill does)")
            return x
        if condition is None or condition.shape[1] != cc or condition.shape[2:] != x.shape[2:]:
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"this FLUX.1 transformer (Fill) needs condition=(B, {cc}, {x.shape[2]}, {x.shape[3]}): "
                             f"the masked image's latents and the mask; got {got}")
        if condition.shape[0] != x.shape[0]:
            condition = condition.repeat(x.shape[0] // condition.shape[0], 1, 1, 1)
        return torch.cat([x, condition.to(x.dtype)], dim=1)

    def conditioning(self, timesteps: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None
                     ) -> torch.Tensor:
        """c (B, width): timestep + pooled text (+ guidance scale, embedded like a timestep: scale * 1000)."""
        c = self.time_embed(timestep_embedding(timesteps, 256).to(pooled.dtype)) + self.pooled_embed(pooled)
        if self.guidance_embed is not None:
            if guidance is None:
                raise ValueError("this FLUX.1 model embeds a guidance scale (FLUX.1-dev): pass guidance=, "
                                 "e.g. 3.5")
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=pooled.device).expand(pooled.shape[0])
            c = c + self.guidance_embed(timestep_embedding(guidance * 1000, 256).to(pooled.dtype))
        return c

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                guidance: torch.Tensor | float | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"FLUX.1 packs latents into {p}x{p} patches; got {H}x{W}")
        h, w = H // p, W // p
        tokens = self.image_in(pack(self.with_condition(x, condition), p))  # (B, h*w, width)
        context = self.context_in(context)  # (B, L, width)
        c = self.conditioning(timesteps, pooled, guidance)
        L = context.shape[1]
        ids = torch.cat([torch.zeros(L, 3, device=x.device), image_ids(h, w, x.device)])  # (L + h*w, 3)
        rope = rope_rotations(ids, self.config.axes_dims_rope, self.config.rope_theta)
        for block in self.double_blocks:
            tokens, context = block(tokens, context, c, rope)
        tokens = torch.cat([context, tokens], dim=1)  # (B, L + h*w, width)
        for block in self.single_blocks:
            tokens = block(tokens, c, rope)
        tokens = tokens[:, L:]
        scale, shift = self.final_modulation(F.silu(c)).chunk(2, dim=1)
        out = self.final_proj(modulate(layer_norm(tokens), shift, scale))  # (B, h*w, C*p*p)
        return unpack(out, h, w, p)
