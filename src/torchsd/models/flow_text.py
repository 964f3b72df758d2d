"""The CLIP text towers as SD 3 / 3.5 and FLUX.1 read them: the penultimate hidden state (SD 3's context,
before the final LayerNorm) and the pooled vector (the final-normed end token, projected by
``text_projection`` where the model has one: SD 3's CLIP-L and OpenCLIP-bigG, SDXL's bigG; FLUX.1 pools
CLIP-L unprojected). One pass gives both: the last layer runs once on top of the penultimate state."""

from __future__ import annotations

import torch
from torch import nn

from ..config import CLIPTextConfig
from .clip import CLIPTextModel


class CLIPWithProjection(nn.Module):
    """``text``: the CLIP text transformer; ``text_projection``: width -> projection_dim, no bias (or None)."""

    def __init__(self, config: CLIPTextConfig, projection: bool = True):
        super().__init__()
        self.config = config
        self.text = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.width, config.projection_dim, bias=False) if projection else None

    def forward(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token ids (B, T) -> (penultimate hidden state (B, T, width), pooled (B, projection_dim or width))."""
        text = self.text
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        x = text.token_embedding(token_ids) + text.position_embedding(positions)[None]  # (B, T, width)
        penultimate = text.hidden_state(x, clip_skip=2)
        final = text.final_layer_norm(text.layers[-1](penultimate, causal=True))
        is_eos = (token_ids == self.config.eos_token_id).int()
        eos_index = torch.where(is_eos.any(dim=1), is_eos.argmax(dim=1), token_ids.shape[1] - 1)
        pooled = final[torch.arange(final.shape[0], device=final.device), eos_index]  # (B, width)
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return penultimate, pooled
