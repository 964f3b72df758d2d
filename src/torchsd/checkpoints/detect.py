"""What a single-file checkpoint holds, read from its tensor names and shapes alone.

``refuse_unsupported`` names the model families torchsd does not run (VQ autoencoders, SD 3, ...);
``infer_config`` rebuilds a ``ModelConfig`` of an SD 1.x / 2.x file in the original (CompVis) layout or an
SDXL base / refiner file in Stability's (``conditioner.embedders.*``).

Tensors reveal channels, multipliers, depths, context width and input channels, but not everything:
head counts follow the published models (SD 1: 8 heads; SD 2: 64-wide heads; CLIP text: 64-wide heads),
GroupNorm uses 32 groups, and the prediction type comes from the caller (``prediction_type=`` or a
sidecar ``.yaml``). Files torchsd writes carry their exact config in the metadata instead.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch

from ..config import CLIPTextConfig, ModelConfig, PredictionType, ScheduleConfig, UNetConfig, VAEConfig
from .io import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
OPENCLIP_H_WIDTH = 1024  # OpenCLIP ViT-H/14, the SD 2 text tower: 24 layers, SD 2 reads the 23rd
XL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L in transformers' names
XL_BIGG_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG in OpenCLIP's names
XL_REFINER_PREFIX = "conditioner.embedders.0.model."  # SDXL refiner: bigG alone
SDXL_MICRO_CONDITION_DIM = 256  # sinusoidal features per micro-conditioning number (not in the tensors)

# where each family keeps its text encoders, in the order of ModelConfig.text_encoders: (prefix, layout)
TEXT_LAYOUTS = {
    "sd1": ((SD1_TEXT_PREFIX, "transformers"),),
    "sd2": ((SD2_TEXT_PREFIX, "openclip"),),
    "sdxl": ((XL_CLIP_L_PREFIX, "transformers"), (XL_BIGG_PREFIX, "openclip")),
    "sdxl_refiner": ((XL_REFINER_PREFIX, "openclip"),),
}


def text_layout(family: str) -> tuple[tuple[str, str], ...]:
    return TEXT_LAYOUTS[family]

# (a key prefix or exact key that only this family has, what to call it)
UNSUPPORTED_FAMILIES = [
    ("first_stage_model.quantize.", "a latent diffusion model with a VQ autoencoder (first_stage_model.quantize)"),
    ("control_model.", "a ControlNet"),
    ("depth_model.", "a Stable Diffusion 2 depth-to-image model"),
    ("low_scale_model.", "a Stable Diffusion x4 upscaler"),
    ("embedder.model.", "a Stable Diffusion unCLIP model"),
    ("noise_augmentor.", "a Stable Diffusion unCLIP model"),
    ("model.diffusion_model.joint_blocks.", "a Stable Diffusion 3 model"),
    ("model.diffusion_model.double_blocks.", "a FLUX model"),
    ("joint_blocks.", "a Stable Diffusion 3 model"),
    ("double_blocks.", "a FLUX model"),
]
IN_CHANNEL_FAMILIES = {7: "a Stable Diffusion x4 upscaler", 8: "an InstructPix2Pix model"}
SUPPORTED = "torchsd runs Stable Diffusion 1.x and 2.x (and their inpainting variants) and SDXL for now"
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                "sdxl_refiner": "Stable Diffusion XL refiner"}


def refuse_unsupported(tensors: Mapping[str, torch.Tensor], source: object) -> None:
    """Raise a ``CheckpointError`` naming what the file is, unless it is an SD 1.x / 2.x model."""
    for prefix, name in UNSUPPORTED_FAMILIES:
        if any(k.startswith(prefix) for k in tensors):
            raise CheckpointError(f"{source}: this is {name}; {SUPPORTED}")
    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError(f"{source}: {_what_else(tensors)}")
    if conv_in.ndim != 4:
        raise CheckpointError(f"{source}: {UNET_PREFIX}input_blocks.0.0.weight has shape {tuple(conv_in.shape)}; "
                              f"a convolution weight has 4 dimensions. The file is corrupt or not a checkpoint")
    if conv_in.shape[1] in IN_CHANNEL_FAMILIES:
        raise CheckpointError(f"{source}: this is {IN_CHANNEL_FAMILIES[conv_in.shape[1]]} (a U-Net with "
                              f"{conv_in.shape[1]} input channels); {SUPPORTED}")
    if not any(k.startswith(VAE_PREFIX) for k in tensors):
        raise CheckpointError(f"{source}: holds a U-Net but no autoencoder (first_stage_model.*); torchsd needs a "
                              f"whole model in one file")
    family = text_family(tensors)
    if family is None:
        raise CheckpointError(f"{source}: holds a U-Net but no text encoder (cond_stage_model.transformer.* for "
                              f"SD 1, cond_stage_model.model.* for SD 2, conditioner.embedders.* for SDXL); torchsd "
                              f"needs a whole model in one file")
    has_label_emb = UNET_PREFIX + "label_emb.0.0.weight" in tensors
    if has_label_emb != family.startswith("sdxl"):
        raise CheckpointError(f"{source}: " + ("a U-Net with label_emb (a class-conditioned model) beside an SD 1/2 "
                                               "text encoder, which torchsd does not run" if has_label_emb else
                                               "SDXL text encoders but no label_emb in the U-Net: the file is "
                                               "truncated or not an SDXL model"))


def _what_else(tensors: Mapping[str, torch.Tensor]) -> str:
    """A hint for files that hold no original-layout U-Net."""
    keys = list(tensors)
    if any(k.startswith(("lora_unet_", "lora_te_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "this is a LoRA, not a model checkpoint; load a base model and apply the LoRA to it"
    if "emb_params" in tensors or any(k.startswith("string_to_param") for k in keys):
        return "this is a textual-inversion embedding, not a model checkpoint"
    if any(k.startswith(("encoder.down.", "first_stage_model.encoder.", "encoder.down_blocks.")) for k in keys):
        return "this holds only an autoencoder (a VAE); pass it as the VAE (--vae / vae=) next to a model"
    if any(k.startswith(("down_blocks.", "text_model.", "time_embedding.")) for k in keys):
        return ("this is one component of a diffusers folder (diffusers key names); give the whole folder "
                "(the one with model_index.json) instead")
    return (f"not a Stable Diffusion checkpoint: it has no {UNET_PREFIX}* tensors (first keys: "
            f"{', '.join(keys[:3]) or 'none'})")


def text_family(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The family its text encoders tell: "sdxl" (CLIP-L and bigG under conditioner.embedders.0/1),
    "sdxl_refiner" (bigG under conditioner.embedders.0), "sd2" for the OpenCLIP text tower, "sd1" for OpenAI
    CLIP in transformers' layout, else None."""
    if XL_BIGG_PREFIX + "token_embedding.weight" in tensors:
        return "sdxl"
    if XL_REFINER_PREFIX + "token_embedding.weight" in tensors:
        return "sdxl_refiner"
    if SD2_TEXT_PREFIX + "token_embedding.weight" in tensors:
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in tensors):
        return "sd1"
    return None


def _indices(tensors: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (a regex with one group) over all keys."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in tensors if (m := regex.match(k))})


def _shape(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"the checkpoint lacks {key}, which every SD 1.x/2.x file has: the file is truncated "
                              f"or was stripped of part of the model")
    return tuple(tensors[key].shape)


def unet_config(tensors: Mapping[str, torch.Tensor], family: str) -> UNetConfig:
    p = UNET_PREFIX
    channels, in_channels = _shape(tensors, p + "input_blocks.0.0.weight")[:2]
    downsamplers = _indices(tensors, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    num_blocks = max(_indices(tensors, re.escape(p) + r"input_blocks\.(\d+)\.")) + 1
    levels = len(downsamplers) + 1
    res_blocks, rest = divmod(num_blocks - levels, levels)  # blocks = conv_in + levels*res + (levels-1) downsamplers
    if rest or res_blocks < 1:
        raise CheckpointError(f"the U-Net has {num_blocks} input blocks and {levels - 1} downsamplers, which is no "
                              f"U-Net layout torchsd knows")
    mult, attention, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (res_blocks + 1)
        width = _shape(tensors, p + f"input_blocks.{first}.0.out_layers.3.weight")[0]
        if width % channels:
            raise CheckpointError(f"U-Net level {level} has {width} channels, not a multiple of {channels}")
        mult.append(width // channels)
        attention.append(p + f"input_blocks.{first}.1.proj_in.weight" in tensors)
        blocks = re.escape(p + f"input_blocks.{first}.1.") + r"transformer_blocks\.(\d+)\."
        depths.append(len(_indices(tensors, blocks)) if attention[-1] else 1)
    mid = p + "middle_block.1."
    depth = len(_indices(tensors, re.escape(mid) + r"transformer_blocks\.(\d+)\."))
    heads = {"num_heads": 8, "head_dim": None} if family == "sd1" else {"num_heads": None, "head_dim": 64}
    added = {}
    if family in ("sdxl", "sdxl_refiner"):
        pooled = _shape(tensors, (XL_BIGG_PREFIX if family == "sdxl" else XL_REFINER_PREFIX) + "text_projection")[1]
        rest = _shape(tensors, p + "label_emb.0.0.weight")[1] - pooled
        if rest <= 0 or rest % SDXL_MICRO_CONDITION_DIM:
            raise CheckpointError(f"label_emb takes {rest + pooled} numbers: not the pooled text ({pooled}) plus "
                                  f"{SDXL_MICRO_CONDITION_DIM}-wide micro-conditions")
        added = {"pooled_dim": pooled, "micro_conditions": rest // SDXL_MICRO_CONDITION_DIM,
                 "micro_condition_dim": SDXL_MICRO_CONDITION_DIM}
    return UNetConfig(
        in_channels=in_channels, out_channels=_shape(tensors, p + "out.2.weight")[0], model_channels=channels,
        channel_mult=tuple(mult), num_res_blocks=res_blocks, attention_levels=tuple(attention),
        transformer_depth=tuple(depths), mid_transformer_depth=depth,
        context_dim=_shape(tensors, mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_projection=len(_shape(tensors, mid + "proj_in.weight")) == 2, **heads, **added)


def vae_config(tensors: Mapping[str, torch.Tensor], prefix: str = VAE_PREFIX) -> VAEConfig:
    """The autoencoder's config from original-layout keys under ``prefix``."""
    p = prefix
    base, in_channels = _shape(tensors, p + "encoder.conv_in.weight")[:2]
    levels = len(_indices(tensors, re.escape(p) + r"encoder\.down\.(\d+)\.block\.0\.conv1\.weight"))
    res_blocks = len(_indices(tensors, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.conv1\.weight"))
    if levels < 1 or res_blocks < 1:
        raise CheckpointError(f"the autoencoder under {p!r} has no encoder.down.* blocks")
    mult = [_shape(tensors, p + f"encoder.down.{i}.block.0.conv2.weight")[0] // base for i in range(levels)]
    latent = _shape(tensors, p + "decoder.conv_in.weight")[1]
    moments = _shape(tensors, p + "encoder.conv_out.weight")[0]
    if moments != 2 * latent:
        raise CheckpointError(f"the autoencoder's encoder gives {moments} channels for {latent} latent channels; "
                              f"a KL autoencoder gives 2x (mean and log-variance). This is probably a VQ model, "
                              f"which torchsd does not run")
    return VAEConfig(in_channels=in_channels, latent_channels=latent, base_channels=base, channel_mult=tuple(mult),
                     num_res_blocks=res_blocks)


def openclip_layers_kept(resblocks: int, width: int) -> int:
    """How many of an OpenCLIP tower's layers SD 2 uses: all but the last. Files from Stability hold all
    24 layers of ViT-H; files converted back from diffusers hold only the 23 that are used."""
    if width == OPENCLIP_H_WIDTH and resblocks == 23:
        return 23
    return resblocks - 1


def text_configs(tensors: Mapping[str, torch.Tensor], family: str) -> list[CLIPTextConfig]:
    """One config per text encoder, in the order of ``ModelConfig.text_encoders``."""
    configs = []
    for prefix, layout in TEXT_LAYOUTS[family]:
        if layout == "transformers":
            configs.append(transformers_text_config(tensors, transformers_text_prefix(tensors, prefix)))
        else:
            configs.append(openclip_text_config(tensors, prefix, whole=family != "sd2"))
    return configs


def openclip_text_config(tensors: Mapping[str, torch.Tensor], p: str, whole: bool) -> CLIPTextConfig:
    """``whole``: SDXL's bigG, all layers and the projection used; else SD 2's ViT-H, the last layer unused."""
    vocab, width = _shape(tensors, p + "token_embedding.weight")
    resblocks = len(_indices(tensors, re.escape(p) + r"transformer\.resblocks\.(\d+)\."))
    projection = tensors.get(p + "text_projection") if not whole else tensors[p + "text_projection"]
    return CLIPTextConfig(
        vocab_size=vocab, max_positions=_shape(tensors, p + "positional_embedding")[0], width=width,
        num_layers=resblocks if whole else openclip_layers_kept(resblocks, width), num_heads=width // 64,
        ffn_dim=_shape(tensors, p + "transformer.resblocks.0.mlp.c_fc.weight")[0], activation="gelu",
        projection_dim=projection.shape[1] if projection is not None else width, pad_token_id=0,
        with_projection=whole)


def transformers_text_config(tensors: Mapping[str, torch.Tensor], p: str) -> CLIPTextConfig:
    vocab, width = _shape(tensors, p + "embeddings.token_embedding.weight")
    return CLIPTextConfig(
        vocab_size=vocab, max_positions=_shape(tensors, p + "embeddings.position_embedding.weight")[0], width=width,
        num_layers=len(_indices(tensors, re.escape(p) + r"encoder\.layers\.(\d+)\.")), num_heads=width // 64,
        ffn_dim=_shape(tensors, p + "encoder.layers.0.mlp.fc1.weight")[0], activation="quick_gelu",
        projection_dim=width, pad_token_id=49407)


def sd1_text_prefix(tensors: Mapping[str, torch.Tensor]) -> str:
    return transformers_text_prefix(tensors, SD1_TEXT_PREFIX)


def transformers_text_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> str:
    """Where an SD 1 file's text tower is: under ``text_model.`` (transformers 4's nesting, most files) or
    straight under ``cond_stage_model.transformer.`` (files from before it, and converted from transformers
    5's flat layout; A1111 renames these on load). Decided by the token embedding, not by any key: some
    files keep only the ``position_ids`` buffer under the other prefix."""
    nested = prefix + "text_model."
    return nested if nested + "embeddings.token_embedding.weight" in tensors else prefix


def infer_config(tensors: Mapping[str, torch.Tensor], source: object,
                 prediction_type: PredictionType = PredictionType.EPSILON) -> ModelConfig:
    """The config of an SD 1.x / 2.x file in the original layout (call ``refuse_unsupported`` first)."""
    family = text_family(tensors)
    try:
        schedule = ScheduleConfig(prediction_type=prediction_type)
        # SD 2 at 768 px is the v-prediction model; its base model (and SD 1) work at 512 px; SDXL at 1024
        size = 768 if family == "sd2" and schedule.prediction_type is PredictionType.V_PREDICTION else 512
        texts = text_configs(tensors, family)
        vae = vae_config(tensors)
        if family in ("sdxl", "sdxl_refiner"):
            size, vae = 1024, dataclasses.replace(vae, scaling_factor=0.13025)  # SDXL's VAE scale (not in the tensors)
        return ModelConfig(unet=unet_config(tensors, family), vae=vae, text=texts[0],
                           text_2=texts[1] if len(texts) > 1 else None, schedule=schedule, family=family,
                           sample_size=size)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    except ValueError as err:
        raise CheckpointError(f"{source}: the tensors do not make a {FAMILY_NAMES[family]} model torchsd runs (heads "
                              f"are assumed at their published sizes): {err}") from None
