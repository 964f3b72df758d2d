"""Test-only: random diffusers / transformers models written in the ORIGINAL single-file layout.

This is deliberately independent of ``torchsd.checkpoints.ldm``: each diffusers key is parsed with a
regex and placed where the CompVis code keeps it. ``test_reference_writer_inverts_diffusers_converters``
checks it against diffusers' own single-file converters, which turn it back key for key.
"""

from __future__ import annotations

import re

import torch

from torchsd.checkpoints.diffusers import text_config_to_transformers, unet_config_to_diffusers, vae_config_to_diffusers
from torchsd.config import ModelConfig


def _private_free(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def diffusers_configs(config: ModelConfig) -> tuple[dict, dict, dict]:
    return (_private_free(unet_config_to_diffusers(config.unet, config.sample_size // config.vae.downscale_factor)),
            _private_free(vae_config_to_diffusers(config.vae, config.sample_size)),
            text_config_to_transformers(config.text))


def random_reference_models(config: ModelConfig, seed: int = 0, extra_text_layers: int = 0):
    """Randomly initialised diffusers U-Net and VAE and transformers CLIP text model for ``config``;
    ``extra_text_layers`` more text layers than the config (OpenCLIP files hold one SD 2 does not use)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = diffusers_configs(config)
    torch.manual_seed(seed)
    unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    text_layers = config.text.num_layers + extra_text_layers
    text = CLIPTextModel(CLIPTextConfig(**(text_cfg | {"num_hidden_layers": text_layers})))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # no parameter left at an initial value (zeros, ones) that hides a mix-up
        for model in (unet, vae, text):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return unet.eval(), vae.eval(), text.eval()


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    module, param = rest.split(".", 1)
    return f"{RESNET[module]}.{param}"


def unet_to_original(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    per = layers_per_block + 1
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        if module in fixed:
            new = f"{fixed[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            slot = 2 if int(m[1]) in up_has_attention else 1
            new = f"output_blocks.{int(m[1]) * per + layers_per_block}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_original(state: dict[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # the original uses 1x1 convolutions here
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
            new = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.{m[2]}"
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor], nested: bool = True) -> dict[str, torch.Tensor]:
    """SD 1: transformers' names under cond_stage_model.transformer.[text_model.]"""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    prefix = "cond_stage_model.transformer." + ("text_model." if nested else "")
    return {prefix + k: v for k, v in state.items() if not k.endswith("position_ids")}


OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}


def openclip_to_original(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """SD 2: the OpenCLIP tower under cond_stage_model.model., q/k/v fused into in_proj."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"],
           "text_projection": torch.randn(width, width, generator=torch.Generator().manual_seed(seed)),
           "logit_scale": torch.tensor(4.6)}
    for key, value in state.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if not m:
            continue
        block = f"transformer.resblocks.{m[1]}."
        if m[2] == "self_attn.q_proj":
            parts = [state[f"encoder.layers.{m[1]}.self_attn.{n}_proj.{m[3]}"] for n in "qkv"]
            out[block + f"attn.in_proj_{m[3]}"] = torch.cat(parts)
        elif m[2] in OPENCLIP:
            out[block + f"{OPENCLIP[m[2]]}.{m[3]}"] = value
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def original_checkpoint(config: ModelConfig, seed: int = 0, nested_text: bool = True):
    """(original-layout state dict, (unet, vae, text) reference models it was written from)."""
    extra = 1 if config.family == "sd2" else 0  # SD 2 files hold all of OpenCLIP's layers
    unet, vae, text = random_reference_models(config, seed, extra_text_layers=extra)
    state = unet_to_original(unet.state_dict(), config.unet.num_res_blocks)
    state |= vae_to_original(vae.state_dict(), len(config.vae.channel_mult))
    text_state = text.state_dict()
    state |= clip_to_original(text_state, nested_text) if config.family == "sd1" else \
        openclip_to_original(text_state, seed)
    return state, (unet, vae, text)


def diffusers_from_original(state: dict[str, torch.Tensor], config: ModelConfig):
    """The reference: diffusers' own single-file converters applied to an original-layout state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = diffusers_configs(config)
    unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_cfg), strict=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_cfg), strict=True)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    if config.family == "sd1":
        converted = convert_ldm_clip_checkpoint(state)
    else:
        converted = convert_open_clip_checkpoint(text, state)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}  # transformers >= 5 is flat
    missing, unexpected = text.load_state_dict(converted, strict=False)
    # SD 2: the OpenCLIP layer SD 2 does not use, and the projection, stay out, as in diffusers' SD 2 loading
    unused_layer = f"encoder.layers.{config.text.num_layers}."
    assert not missing and all(k == "text_projection.weight" or k.startswith(unused_layer)
                               for k in unexpected), (missing, unexpected)
    return unet.eval(), vae.eval(), text.eval()
