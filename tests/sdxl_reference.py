"""SDXL helpers for tests: tiny random torchsd networks and the reference (diffusers, transformers)
networks holding the same weights."""

from __future__ import annotations

import torch

from torchsd.checkpoints.diffusers import text_config_to_transformers, to_diffusers_keys, unet_config_to_diffusers
from torchsd.config import CLIPTextConfig, ModelConfig
from torchsd.models.clip import CLIPTextModel
from torchsd.models.unet import UNet

# stabilityai/stable-diffusion-xl-{base,refiner}-1.0 unet/config.json (the fields that shape the network)
SDXL_BASE_UNET = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
}
SDXL_REFINER_UNET = {
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2560, "sample_size": 128,
    "transformer_layers_per_block": 4, "use_linear_projection": True,
}
# text_encoder_2/config.json of the base (and the refiner's): OpenCLIP ViT-bigG/14's text tower
SDXL_TEXT_ENCODER_2 = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
    "projection_dim": 1280, "hidden_act": "gelu", "vocab_size": 49408, "max_position_embeddings": 77,
}


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Move every parameter off its initial value (zero biases, unit norms) so that no path is trivial."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def random_unet(config: ModelConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return perturb(UNet(config.unet), seed)


def random_text_encoder(config: CLIPTextConfig, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return perturb(CLIPTextModel(config), seed)


def diffusers_unet_of(unet: UNet, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in unet_config_to_diffusers(unet.config, sample_size).items() if not k.startswith("_")}
    model = UNet2DConditionModel(**cfg)
    model.load_state_dict(to_diffusers_keys(unet.state_dict(), "unet"), strict=True)
    return model.eval()


def transformers_text_encoder_of(encoder: CLIPTextModel):
    """transformers' CLIPTextModel (or ...WithProjection) holding ``encoder``'s weights, with SDXL's
    eos_token_id 2, which makes transformers pool at the largest token id (the end token)."""
    from transformers import CLIPTextConfig as Config, CLIPTextModel as Plain, CLIPTextModelWithProjection

    cfg = {**text_config_to_transformers(encoder.config), "eos_token_id": 2}
    cls = CLIPTextModelWithProjection if encoder.config.with_projection else Plain
    model = cls(Config(**cfg))
    state = to_diffusers_keys(encoder.state_dict(), "text_encoder")
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 is flat
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()
