"""Tiny SD 3 and FLUX.1 pipelines built from diffusers' and transformers' own classes with random weights,
saved with their own ``save_pretrained``: the reference folders the flow-pipeline tests load.

The CLIP tokenizers carry CLIP's real vocabulary (torchsd's copy, read back by transformers); T5's is a
Unigram model trained here (as in test_t5.py), since no T5 vocabulary is installed."""

from __future__ import annotations

from pathlib import Path

import torch

from reference import _perturb

# Tiny, but with what single files do not store at its published value, so that the same weights also make
# readable single files: 64-wide CLIP heads, 128-wide FLUX.1 heads with its (16, 56, 56) rotary axes, T5's bucket
# distance 128. CLIP-L 64 + bigG 128 = 192 = T5's width.
CLIP_L = dict(hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=1, projection_dim=64,
              hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, projection_dim=128,
              hidden_act="gelu")
T5 = dict(d_model=192, d_kv=16, d_ff=96, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          relative_attention_max_distance=128)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[32, 64], layers_per_block=1,
           norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           use_quant_conv=False, use_post_quant_conv=False, sample_size=32)
SD3_VAE = dict(VAE, scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(VAE, scaling_factor=0.3611, shift_factor=0.1159)
MMDIT = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
             num_attention_heads=4, joint_attention_dim=192, caption_projection_dim=32, pooled_projection_dim=192,
             pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
            num_attention_heads=1, joint_attention_dim=192, pooled_projection_dim=64, axes_dims_rope=(16, 56, 56))


def clip_tokenizer(folder: Path, pad: str | None = None):
    """transformers' CLIPTokenizer over CLIP's vocabulary; ``pad="!"`` as SD 3's tokenizer_2."""
    from transformers import CLIPTokenizer

    from torchsd.text.tokenizer import CLIPTokenizer as Ours

    Ours().save_pretrained(folder / "source")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "source")
    if pad is not None:
        tokenizer = CLIPTokenizer.from_pretrained(folder / "source", pad_token=pad)
    return tokenizer


def t5_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    text = ["a photo of a cat sitting on a red chair", "an astronaut riding a horse on the moon",
            "a watercolor painting of mountains at dawn", "zebra stripes and photos of horses"] * 20
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "t5.json"))
    return T5TokenizerFast(tokenizer_file=str(folder / "t5.json"), extra_ids=0)


def _clip(config: dict, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1, **config)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    _perturb(model, seed, scale=0.05)
    return model


def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=150, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                    tie_word_embeddings=False, **T5)).eval()
    _perturb(model, seed, scale=0.05)
    return model


def _vae(config: dict, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).eval()
    _perturb(vae, seed)
    return vae


def sd3_pipeline(work: Path, *, t5: bool = True, seed: int = 0):
    """A tiny StableDiffusion3Pipeline (SD 3.5 Medium's shape: QK-norm, one dual-attention block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**MMDIT).eval()
    _perturb(transformer, seed, scale=0.05)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(SD3_VAE, seed + 1),
        text_encoder=_clip(CLIP_L, True, seed + 2), tokenizer=clip_tokenizer(work / "tok_l"),
        text_encoder_2=_clip(CLIP_G, True, seed + 3), tokenizer_2=clip_tokenizer(work / "tok_g", pad="!"),
        text_encoder_3=_t5(seed + 4) if t5 else None, tokenizer_3=t5_tokenizer(work / "tok_t5") if t5 else None)


def flux_pipeline(work: Path, *, dev: bool = True, seed: int = 0):
    """A tiny FluxPipeline: dev (guidance embedding, dynamic shift) or schnell."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(guidance_embeds=dev, **FLUX).eval()
    _perturb(transformer, seed, scale=0.05)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=dev, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    clip_l = CLIP_L
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(FLUX_VAE, seed + 1),
                        text_encoder=_clip(clip_l, False, seed + 2), tokenizer=clip_tokenizer(work / "tok_l"),
                        text_encoder_2=_t5(seed + 4), tokenizer_2=t5_tokenizer(work / "tok_t5"))


def fill_pipeline(work: Path, *, seed: int = 0):
    """A tiny FluxFillPipeline (FLUX.1 Fill-dev's layout): the transformer's tokens carry the masked image's
    latents and the mask unshuffled by the VAE's factor (here 2: 4 channels) besides the latents."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    base = flux_pipeline(work, seed=seed)
    factor = 2 ** (len(VAE["block_out_channels"]) - 1)
    latent = base.vae.config.latent_channels
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(guidance_embeds=True, **{**FLUX, "in_channels": 4 * (2 * latent + factor ** 2),
                                                                  "out_channels": 4 * latent}).eval()
    _perturb(transformer, seed, scale=0.05)
    return FluxFillPipeline(transformer=transformer, scheduler=base.scheduler, vae=base.vae,
                            text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)


def saved(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder)
    return folder


# --- LoRAs, written by diffusers' own writer ------------------------------------------------------------------------

CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TRANSFORMER_TARGETS = ["to_q", "to_k", "to_v", "proj_out", "ff.net.2"]


def random_adapter(model, targets, seed: int, rank: int = 4, alpha: float = 8.0):
    """PEFT LoRA layers injected into ``model`` (diffusers' or transformers'), lora_B not zero: the config."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    peft.inject_adapter_in_model(config, model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=gen) * 0.1)
    return config


def save_lora(pipe, folder: Path, name: str = "pytorch_lora_weights.safetensors", seed: int = 0) -> Path:
    """Random LoRAs on ``pipe``'s transformer and CLIP text encoders (CLIP-L; SD 3's bigG too), written by the
    pipeline class's own ``save_lora_weights``; ``pipe`` keeps them injected."""
    from peft.utils import get_peft_model_state_dict

    components = ["transformer", "text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_3") else [])
    kwargs = {}
    for i, component in enumerate(components):
        model = getattr(pipe, component)
        config = random_adapter(model, TRANSFORMER_TARGETS if component == "transformer" else CLIP_TARGETS, seed + i)
        kwargs[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{component}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(folder, weight_name=name, **kwargs)
    return folder / name
