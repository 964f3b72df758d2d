"""Network sizes for models trained from scratch.

``bundled``: the model that ships with torchsd (64x64 images, f=4 autoencoder, 16x16x4 latents),
sized to train on two CPU cores in about two hours.
``tiny``: for tests; trains for a few steps in seconds.
"""

from __future__ import annotations

from ..config import CLIPTextConfig, CLIPVisionConfig, UNetConfig, VAEConfig


def vae_config(preset: str) -> VAEConfig:
    if preset == "tiny":
        return VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, scaling_factor=1.0)
    return VAEConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8, scaling_factor=1.0)


def clip_configs(preset: str) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    if preset == "tiny":
        return (CLIPTextConfig(width=32, num_layers=2, num_heads=2, ffn_dim=64, projection_dim=32),
                CLIPVisionConfig(image_size=32, patch_size=8, width=32, num_layers=2, num_heads=2, ffn_dim=64,
                                 projection_dim=32))
    return (CLIPTextConfig(width=96, num_layers=3, num_heads=4, ffn_dim=384, projection_dim=96),
            CLIPVisionConfig(image_size=64, patch_size=8, width=96, num_layers=3, num_heads=4, ffn_dim=384,
                             projection_dim=96))


def unet_config(preset: str, context_dim: int, latent_channels: int = 4) -> UNetConfig:
    if preset == "tiny":
        return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, model_channels=16,
                          channel_mult=(1, 2), num_res_blocks=1, attention_levels=(False, True), num_heads=2,
                          context_dim=context_dim, norm_groups=8)
    return UNetConfig(in_channels=latent_channels, out_channels=latent_channels, model_channels=64,
                      channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(False, True, True), num_heads=4,
                      context_dim=context_dim, norm_groups=16)
