"""The multimodal diffusion transformer of SD 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow
Transformers"), and the pieces FLUX.1's transformer shares with it (``flux.py``).

Latents are cut into 2x2 patches; text tokens and image patches keep separate weights ("streams") but attend
jointly over their concatenation. Every sub-layer is modulated by the conditioning vector c (timestep +
pooled text): LayerNorm without affine, then x * (1 + scale) + shift, and its output is multiplied by a gate
before the residual add (adaLN-Zero, Peebles & Xie 2023). The last block updates only the image stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MMDiTConfig
from .layers import attention, timestep_embedding
from .t5 import RMSNorm

_EPS = 1e-6  # LayerNorm and QK-RMSNorm epsilon of both MMDiT and FLUX.1


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (B, T, C), shift and scale: (B, C)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=_EPS)


class MLP(nn.Module):
    """width -> 4 width -> width with tanh-GELU."""

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden or 4 * width)
        self.fc2 = nn.Linear(hidden or 4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EmbedMLP(nn.Module):
    """Linear, SiLU, Linear: how the sinusoidal timestep and the pooled text vector enter c."""

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class QKV(nn.Module):
    """One stream's query, key and value projections, with optional per-head RMSNorm of q and k (SD 3.5,
    FLUX.1: keeps attention logits bounded in large models) and an optional output projection."""

    def __init__(self, width: int, head_dim: int, qk_norm: bool, out: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.norm_q = RMSNorm(head_dim, _EPS) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, _EPS) if qk_norm else None
        self.out = nn.Linear(width, width) if out else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, width) -> q, k, v each (B, T, heads, head_dim)."""
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim) for proj in (self.q, self.k, self.v))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v


def joint_attention(qkvs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    rope: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Attention over the concatenated tokens of several streams; the output split back per stream.

    Each q, k, v: (B, T_i, heads, head_dim). ``rope``: (T, head_dim/2, 2, 2) rotations of all tokens."""
    lengths = [q.shape[1] for q, _, _ in qkvs]
    q, k, v = (torch.cat([t[i] for t in qkvs], dim=1) for i in range(3))  # (B, T, heads, head_dim)
    if rope is not None:
        q, k = apply_rope(q, rope), apply_rope(k, rope)
    B, T, heads, head_dim = q.shape
    out = attention(*(t.reshape(B, T, heads * head_dim) for t in (q, k, v)), num_heads=heads)  # (B, T, width)
    return list(out.split(lengths, dim=1))


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of channels (x_{2i}, x_{2i+1}) of every head by the token's angles.

    x: (B, T, heads, head_dim), rope: (T, head_dim/2, 2, 2) rotation matrices (FLUX.1's layout)."""
    pairs = x.float().unflatten(-1, (-1, 1, 2))  # (B, T, heads, head_dim/2, 1, 2)
    rotated = (rope[None, :, None] * pairs).sum(-1)  # (B, T, heads, head_dim/2, 2)
    return rotated.flatten(-2).to(x.dtype)


def sincos_2d(width: int, grid: int, base: int) -> torch.Tensor:
    """(grid * grid, width) fixed 2-D sin-cos positions (MAE's): half the channels from the column, half from
    the row, positions scaled so that a ``base``-wide grid spans 0..base."""
    pos = torch.arange(grid, dtype=torch.float64) * base / grid
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))

    def embed(p: torch.Tensor) -> torch.Tensor:
        angles = p[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, width/2)

    row, col = embed(pos), embed(pos)
    return torch.cat([col[None, :, :].expand(grid, -1, -1), row[:, None, :].expand(-1, grid, -1)],
                     dim=-1).reshape(grid * grid, width).float()


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, plus the centre crop of a stored position grid (pos_embed_max_size)."""

    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.patch_size, self.grid = c.patch_size, c.pos_embed_max_size
        self.proj = nn.Conv2d(c.in_channels, c.width, c.patch_size, stride=c.patch_size)
        # stored in the checkpoints (fixed sin-cos when trained), so a buffer that loads with them
        self.register_buffer("pos_embed", sincos_2d(c.width, c.pos_embed_max_size,
                                                    c.sample_size // c.patch_size)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        h, w = H // self.patch_size, W // self.patch_size
        if h > self.grid or w > self.grid:
            raise ValueError(f"MMDiT: a {H}x{W} latent has {h}x{w} patches; the position grid holds at most "
                             f"{self.grid}x{self.grid} (pos_embed_max_size)")
        top, left = (self.grid - h) // 2, (self.grid - w) // 2
        pos = self.pos_embed.view(self.grid, self.grid, -1)[top:top + h, left:left + w].reshape(1, h * w, -1)
        return self.proj(x).flatten(2).transpose(1, 2) + pos.to(x.dtype)  # (B, h*w, width)


class Stream(nn.Module):
    """One modality's weights in a joint block: its modulation, attention projections and MLP.

    ``last``: the text stream of the final block, which only supplies keys and values (no output
    projection, no MLP; its modulation is a plain adaLN: scale and shift). ``dual``: MMDiT-X's second
    self-attention of the image stream, with its own shift, scale and gate (9 modulation vectors)."""

    def __init__(self, width: int, head_dim: int, qk_norm: bool, last: bool = False, dual: bool = False):
        super().__init__()
        self.last, self.dual = last, dual
        self.modulation = nn.Linear(width, (2 if last else 9 if dual else 6) * width)
        self.attn = QKV(width, head_dim, qk_norm, out=not last)
        self.attn2 = QKV(width, head_dim, qk_norm) if dual else None
        self.mlp = None if last else MLP(width)


class JointBlock(nn.Module):
    def __init__(self, c: MMDiTConfig, index: int):
        super().__init__()
        self.image = Stream(c.width, c.head_dim, c.qk_norm, dual=index in c.dual_attention_blocks)
        self.text = Stream(c.width, c.head_dim, c.qk_norm, last=index == c.num_layers - 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, N, width) image tokens, context: (B, L, width) text tokens, c: (B, width)."""
        img, txt = self.image, self.text
        mod = img.modulation(F.silu(c)).chunk(9 if img.dual else 6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x_norm = layer_norm(x)
        if txt.last:
            scale, shift = txt.modulation(F.silu(c)).chunk(2, dim=1)  # AdaLayerNormContinuous: scale first
            context_in = modulate(layer_norm(context), shift, scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
                txt.modulation(F.silu(c)).chunk(6, dim=1)
            context_in = modulate(layer_norm(context), c_shift_msa, c_scale_msa)

        x_attn, context_attn = joint_attention([img.attn(modulate(x_norm, shift_msa, scale_msa)),
                                                txt.attn(context_in)])
        x = x + gate_msa[:, None] * img.attn.out(x_attn)
        if img.dual:  # MMDiT-X: the image tokens also attend among themselves, from the same normed input
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            (x_attn2,) = joint_attention([img.attn2(modulate(x_norm, shift_msa2, scale_msa2))])
            x = x + gate_msa2[:, None] * img.attn2.out(x_attn2)
        x = x + gate_mlp[:, None] * img.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))

        if txt.last:
            return x, None
        context = context + c_gate_msa[:, None] * txt.attn.out(context_attn)
        context = context + c_gate_mlp[:, None] * txt.mlp(modulate(layer_norm(context), c_shift_mlp, c_scale_mlp))
        return x, context


class MMDiT(nn.Module):
    """(latents (B, C, H, W), timesteps (B,) in 0..1000, context (B, L, context_dim), pooled (B, pooled_dim))
    -> velocity (B, C, H, W). ``skip_blocks``: indices of joint blocks to leave out (both streams pass them
    unchanged), for skip-layer guidance (diffusers' ``skip_layers``)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c)
        self.time_embed = EmbedMLP(256, c.width)
        self.pooled_embed = EmbedMLP(c.pooled_dim, c.width)
        self.context_proj = nn.Linear(c.context_dim, c.width)
        self.blocks = nn.ModuleList(JointBlock(c, i) for i in range(c.num_layers))
        self.final_modulation = nn.Linear(c.width, 2 * c.width)
        self.final_proj = nn.Linear(c.width, c.patch_size ** 2 * c.out_channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor, skip_blocks: tuple[int, ...] = ()) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.config.patch_size
        tokens = self.patch_embed(x)  # (B, h*w, width)
        c = self.time_embed(timestep_embedding(timesteps, 256).to(x.dtype)) + self.pooled_embed(pooled)  # (B, width)
        context = self.context_proj(context)  # (B, L, width)
        for i, block in enumerate(self.blocks):
            if i not in skip_blocks:
                tokens, context = block(tokens, context, c)
        scale, shift = self.final_modulation(F.silu(c)).chunk(2, dim=1)
        out = self.final_proj(modulate(layer_norm(tokens), shift, scale))  # (B, h*w, p*p*C)
        return unpatchify(out, H // p, W // p, p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, h*w, p*p*C) patch tokens, channels last within a patch -> (B, C, h*p, w*p)."""
    B = tokens.shape[0]
    x = tokens.view(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, -1, h * p, w * p)


