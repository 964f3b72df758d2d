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
    from transformers import CLIPTextConfig as Config
    from transformers import CLIPTextModel as Plain
    from transformers import CLIPTextModelWithProjection

    cfg = {**text_config_to_transformers(encoder.config), "eos_token_id": 2}
    cls = CLIPTextModelWithProjection if encoder.config.with_projection else Plain
    model = cls(Config(**cfg))
    state = to_diffusers_keys(encoder.state_dict(), "text_encoder")
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers >= 5 is flat
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval()


# --- diffusers pipelines and original single files, written by the references' own code ---------------

def tokenizer_pair(sd, folder):
    """transformers' tokenizers for SDXL from torchsd's vocabulary: ``tokenizer`` pads with the end token,
    ``tokenizer_2`` with "!" (id 0), as stabilityai/stable-diffusion-xl-base-1.0's do."""
    from transformers import CLIPTokenizer

    sd.tokenizer.save_pretrained(folder / "tokenizer")
    first = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    second = CLIPTokenizer.from_pretrained(folder / "tokenizer", pad_token="!")
    assert second.pad_token_id == 0
    return first, second


def diffusers_xl_pipeline(sd, folder, scheduler=None):
    """diffusers' StableDiffusionXLPipeline (base) or ...Img2ImgPipeline (refiner) with ``sd``'s weights."""
    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from reference import diffusers_vae
    from torchsd.checkpoints.diffusers import schedule_config_to_diffusers

    schedule = {k: v for k, v in schedule_config_to_diffusers(sd.config.schedule).items() if not k.startswith("_")}
    scheduler = scheduler or DDIMScheduler(**schedule)
    unet = diffusers_unet_of(sd.unet, sd.config.sample_size // sd.config.vae.downscale_factor)
    first, second = tokenizer_pair(sd, folder)
    if sd.config.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=diffusers_vae(sd), text_encoder=transformers_text_encoder_of(sd.text_encoder),
            text_encoder_2=transformers_text_encoder_of(sd.text_encoder_2), tokenizer=first, tokenizer_2=second,
            unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    return StableDiffusionXLImg2ImgPipeline(
        vae=diffusers_vae(sd), text_encoder=None, text_encoder_2=transformers_text_encoder_of(sd.text_encoder),
        tokenizer=None, tokenizer_2=second, unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)


def random_sdxl(family: str = "sdxl", seed: int = 0, levels: int = 2):
    """A tiny SDXL StableDiffusion with every parameter perturbed. ``levels=3``: SDXL's three levels (no attention
    at the first, 32, 64, 128 channels), where the tiny config has two; SDXL's T2I-Adapters need them."""
    import dataclasses

    from torchsd.pipeline import StableDiffusion

    config = ModelConfig.tiny(family)
    if levels == 3:
        config = dataclasses.replace(config, unet=dataclasses.replace(
            config.unet, channel_mult=(1, 2, 4), attention_levels=(False, True, True), transformer_depth=(1, 1, 2)))
    elif levels != 2:
        raise ValueError("random_sdxl: levels is 2 (the tiny config) or 3")
    sd = StableDiffusion.from_config(config, seed=seed)
    for i, model in enumerate(sd.networks):
        perturb(model, seed + 10 * i)
    return sd


def original_sdxl_file(sd) -> dict[str, torch.Tensor]:
    """``sd``'s weights in Stability's SDXL single-file layout, written with ldm_reference's independent
    regex writer (U-Net, VAE, CLIP-L) and an OpenCLIP writer for bigG (fused in_proj, (in, out) projection)."""
    from ldm_reference import OPENCLIP, unet_to_original, vae_to_original
    from reference import diffusers_unet, diffusers_vae

    unet_state = dict(diffusers_unet(sd).state_dict())
    label = {f"model.diffusion_model.label_emb.0.{i}.{p}": unet_state.pop(f"add_embedding.linear_{n}.{p}")
             for n, i in ((1, 0), (2, 2)) for p in ("weight", "bias")}
    state = unet_to_original(unet_state, sd.config.unet.num_res_blocks) | label
    state |= vae_to_original(diffusers_vae(sd).state_dict(), len(sd.config.vae.channel_mult))
    big_g = sd.text_encoder_2 if sd.config.family == "sdxl" else sd.text_encoder
    if sd.config.family == "sdxl":
        clip_l = transformers_text_encoder_of(sd.text_encoder).state_dict()
        state |= {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
                  for k, v in clip_l.items() if not k.endswith("position_ids")}
    g = {k.removeprefix("text_model."): v for k, v in transformers_text_encoder_of(big_g).state_dict().items()}
    out = {"token_embedding.weight": g["embeddings.token_embedding.weight"],
           "positional_embedding": g["embeddings.position_embedding.weight"],
           "ln_final.weight": g["final_layer_norm.weight"], "ln_final.bias": g["final_layer_norm.bias"],
           "text_projection": g["text_projection.weight"].T.contiguous(), "logit_scale": torch.tensor(4.6)}
    import re

    for key, value in g.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            continue
        block = f"transformer.resblocks.{m[1]}."
        if m[2] == "self_attn.q_proj":
            out[block + f"attn.in_proj_{m[3]}"] = torch.cat([g[f"encoder.layers.{m[1]}.self_attn.{n}_proj.{m[3]}"]
                                                             for n in "qkv"])
        elif m[2] in OPENCLIP:
            out[block + f"{OPENCLIP[m[2]]}.{m[3]}"] = value
    prefix = "conditioner.embedders.1.model." if sd.config.family == "sdxl" else "conditioner.embedders.0.model."
    return state | {prefix + k: v for k, v in out.items()}
