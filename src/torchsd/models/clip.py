"""CLIP (Radford et al. 2021): the text transformer that conditions the U-Net, the image transformer
(ViT) that CLIP guidance uses, and the joint model with both projections into one embedding space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPTextConfig, CLIPVisionConfig
from .layers import attention

# CLIP's image normalisation (the statistics of its training set)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.attention_chunk: int | None = None  # see layers.set_attention_chunk
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, causal=causal,
                                       chunk=self.attention_chunk))


class MLP(nn.Module):
    def __init__(self, width: int, ffn_dim: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, width)
        self.act = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer."""

    def __init__(self, width: int, num_heads: int, ffn_dim: int, activation: str):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, num_heads)
        self.layer_norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, ffn_dim, activation)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, width) after the final LayerNorm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Embedding(config.max_positions, config.width)
        self.layers = nn.ModuleList(
            EncoderLayer(config.width, config.num_heads, config.ffn_dim, config.activation)
            for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.width)
        # CLIPTextModelWithProjection (SDXL's bigG): the pooled output projected into the joint space
        self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False) \
            if config.with_projection else None

    def forward(self, token_ids: torch.Tensor, clip_skip: int = 1,
                token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """``clip_skip`` n > 1 takes the hidden state n-1 layers before the last, then the final LN.

        ``token_embeddings`` (B, T, width), if given, replace the looked-up token vectors (textual inversion)."""
        if not 1 <= clip_skip <= len(self.layers):
            raise ValueError(f"clip_skip must be in 1..{len(self.layers)}; got {clip_skip}")
        T = token_ids.shape[1]
        if T > self.config.max_positions:
            raise ValueError(f"token sequence of {T} is longer than the text encoder's "
                             f"{self.config.max_positions} positions; split long prompts into chunks")
        return self.final_layer_norm(self.hidden_state(self.embed(token_ids, token_embeddings), clip_skip))

    def embed(self, token_ids: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        tokens = self.token_embedding(token_ids) if token_embeddings is None else token_embeddings
        return tokens + self.position_embedding(positions)[None]  # (B, T, width)

    def penultimate(self, token_ids: torch.Tensor, token_embeddings: torch.Tensor | None = None, *,
                    pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SDXL's reading: the hidden state before the last layer, without the final LayerNorm (B, T, width),
        and with ``pooled`` the projected pooled output (B, projection_dim) (``text_projection`` of the final
        normed state at the first end token). Without ``pooled`` the last layer is not run."""
        if token_ids.shape[1] > self.config.max_positions:
            raise ValueError(f"token sequence of {token_ids.shape[1]} is longer than the text encoder's "
                             f"{self.config.max_positions} positions; split long prompts into chunks")
        hidden = self.hidden_state(self.embed(token_ids, token_embeddings), clip_skip=2)
        if not pooled:
            return hidden, None
        if self.text_projection is None:
            raise ValueError("this text encoder has no text_projection (CLIPTextConfig.with_projection)")
        final = self.final_layer_norm(self.layers[-1](hidden, causal=True))
        return hidden, self.text_projection(final[torch.arange(final.shape[0]), self.eos_positions(token_ids)])

    def hidden_state(self, x: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        for layer in self.layers[: len(self.layers) - clip_skip + 1]:
            x = layer(x, causal=True)
        return x

    def pooled(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden state at each sequence's first end token: (B, width)."""
        hidden = self(token_ids)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), self.eos_positions(token_ids)]

    def eos_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Each sequence's first end token (the last position where it has none): (B,)."""
        is_eos = (token_ids == self.config.eos_token_id).int()
        return torch.where(is_eos.any(dim=1), is_eos.argmax(dim=1), token_ids.shape[1] - 1)


class CLIPVisionModel(nn.Module):
    """Normalised images (B, 3, S, S) -> pooled class-token features (B, width) after post-LN."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        num_patches = (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(config.width) * config.width ** -0.5)
        self.patch_embedding = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(num_patches + 1, config.width)
        self.pre_layernorm = nn.LayerNorm(config.width)
        self.layers = nn.ModuleList(
            EncoderLayer(config.width, config.num_heads, config.ffn_dim, config.activation)
            for _ in range(config.num_layers))
        self.post_layernorm = nn.LayerNorm(config.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixels.shape
        size = self.config.image_size
        if (H, W) != (size, size):
            raise ValueError(f"CLIP image encoder takes {size}x{size} images; got {W}x{H}: "
                             f"resize and crop them first (CLIP.preprocess)")
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(B, 1, -1)
        x = torch.cat([cls, patches], dim=1)  # (B, 1 + num_patches, width)
        x = self.pre_layernorm(x + self.position_embedding.weight[None])
        for layer in self.layers:
            x = layer(x, causal=False)
        return self.post_layernorm(x[:, 0])


class CLIP(nn.Module):
    """The joint model: both towers, their projections and the learned temperature."""

    @staticmethod
    def tiny_configs() -> tuple[CLIPTextConfig, CLIPVisionConfig]:
        """A joint CLIP of about 3.5M parameters (mostly the token table), 32x32 images: for tests and benchmarks."""
        return (CLIPTextConfig(width=64, num_layers=3, num_heads=4, ffn_dim=128, projection_dim=32),
                CLIPVisionConfig(image_size=32, patch_size=8, width=48, num_layers=2, num_heads=4, ffn_dim=96,
                                 projection_dim=32))

    def __init__(self, text_config: CLIPTextConfig, vision_config: CLIPVisionConfig):
        super().__init__()
        if text_config.projection_dim != vision_config.projection_dim:
            raise ValueError(f"CLIP: text projection_dim {text_config.projection_dim} must equal vision "
                             f"projection_dim {vision_config.projection_dim}")
        self.text = CLIPTextModel(text_config)
        self.vision = CLIPVisionModel(vision_config)
        self.text_projection = nn.Linear(text_config.width, text_config.projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_config.width, vision_config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text.pooled(token_ids))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` already preprocessed (see ``preprocess``)."""
        return self.visual_projection(self.vision(pixels))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], any square-ish size -> resized, centre-cropped, CLIP-normalised."""
        return preprocess_images(images, self.vision.config.image_size)

    def forward(self, token_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Similarity logits (B_images, B_texts) scaled by the learned temperature."""
        text = F.normalize(self.encode_text(token_ids), dim=-1)
        image = F.normalize(self.encode_image(pixels), dim=-1)
        return self.logit_scale.exp() * image @ text.T


def preprocess_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W): resize the short side to ``size`` (bicubic), centre-crop,
    normalise with CLIP's mean and std. Differentiable, so CLIP guidance can back-propagate through it."""
    H, W = images.shape[-2:]
    # the long side is floored, as transformers' CLIPImageProcessor does it
    new_h, new_w = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
    if (new_h, new_w) != (H, W):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[..., top:top + size, left:left + size]
    x = (images + 1) / 2
    mean = torch.tensor(IMAGE_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(IMAGE_STD, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std
