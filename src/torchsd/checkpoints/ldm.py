"""The original single-file layout of Stable Diffusion 1.x / 2.x (CompVis ``ldm`` checkpoints).

    model.diffusion_model.*        U-Net: time_embed, input_blocks.N.M, middle_block.K, output_blocks.N.M, out
    first_stage_model.*            VAE: encoder/decoder .{down,mid,up}, quant_conv, post_quant_conv
    cond_stage_model.transformer.text_model.*   SD 1: OpenAI CLIP text model in transformers' names
    cond_stage_model.model.*                    SD 2: OpenCLIP text tower (fused in_proj q/k/v)
    betas, alphas_cumprod, ... , model_ema.*    the training schedule and EMA copies (optional)

The mapping is a table of module prefixes built from the config (``Block``: original prefix, diffusers
prefix, renames inside the module), so original -> diffusers; diffusers' names then become torchsd's by
the rules in ``diffusers.py``. Reading checks the file's key set and every shape against the inferred
model before anything is converted, and names what is missing or unexpected in the file's own names.

SD 2's text tower: OpenCLIP ViT-H has 24 layers and SD 2 conditions on the penultimate one, so torchsd
(like diffusers) keeps 23. Reading drops the 24th. Writing appends an identity 24th layer (all zeros:
with zero LayerNorm weights both residual branches add exactly 0), an identity ``text_projection`` and
``logit_scale`` = ln 100, so the file has the original key set and a tool that reads the last layer gets
the same context as one that reads the penultimate.

Files torchsd writes embed ``ModelConfig.to_dict()`` as JSON under the safetensors metadata key
``torchsd_config``, so what tensors cannot reveal (head counts, v-prediction) survives a round trip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..config import CLIPTextConfig, ModelConfig, PredictionType, UNetConfig, VAEConfig
from . import detect
from .detect import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from .diffusers import TEXT_PROJECTION, from_diffusers_keys, to_diffusers_keys
from .io import CheckpointError, load_state_dict, safetensors_metadata, save_safetensors

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")  # in the order of ModelConfig.text_encoders

METADATA_KEY = "torchsd_config"
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
# tensors a file may or may not hold that torchsd does not use: the schedule (rebuilt from the config),
# EMA copies, the autoencoder's training loss, the learned-variance buffer, a position-id buffer
OPTIONAL_KEYS = set(SCHEDULE_BUFFERS) | {"logvar", "model_ema.decay", "model_ema.num_updates",
                                         SD1_TEXT_PREFIX + "text_model.embeddings.position_ids",
                                         SD1_TEXT_PREFIX + "embeddings.position_ids",
                                         SD2_TEXT_PREFIX + "text_projection", SD2_TEXT_PREFIX + "logit_scale",
                                         SD2_TEXT_PREFIX + "attn_mask"} | {
    prefix + key for prefix in (detect.XL_CLIP_L_PREFIX, detect.XL_CLIP_L_PREFIX + "text_model.")
    for key in ("embeddings.position_ids",)} | {
    prefix + key for prefix in (detect.XL_BIGG_PREFIX, detect.XL_REFINER_PREFIX)
    for key in ("logit_scale", "attn_mask")}
OPTIONAL_PREFIXES = ("model_ema.", VAE_PREFIX + "loss.")


@dataclass(frozen=True)
class Block:
    """One module: its prefix in the original layout, its prefix in diffusers', renames inside it."""

    original: str
    diffusers: str
    renames: tuple[tuple[str, str], ...] = ()


UNET_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
               ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
VAE_ATTENTION = (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                 ("proj_out.", "to_out.0."))
OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                  ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."),
                  ("attn.in_proj_", "self_attn.in_proj_"))  # split into q/k/v_proj afterwards


def unet_blocks(c: UNetConfig) -> list[Block]:
    """input_blocks: conv_in, then per level ``num_res_blocks`` x (ResBlock[, transformer]) and a downsampler;
    output_blocks: per level (lowest resolution first) ``num_res_blocks + 1`` x (ResBlock[, transformer]
    [, upsampler after the last])."""
    levels, per_level = len(c.channel_mult), c.num_res_blocks + 1
    blocks = [Block("time_embed.0.", "time_embedding.linear_1."), Block("time_embed.2.", "time_embedding.linear_2."),
              Block("input_blocks.0.0.", "conv_in."), Block("out.0.", "conv_norm_out."), Block("out.2.", "conv_out."),
              Block("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET),
              Block("middle_block.1.", "mid_block.attentions.0."),
              Block("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)]
    if c.added_embed_dim:  # SDXL: label_emb = Sequential(Sequential(Linear, SiLU, Linear))
        blocks += [Block("label_emb.0.0.", "add_embedding.linear_1."),
                   Block("label_emb.0.2.", "add_embedding.linear_2.")]
    for level in range(levels):
        for j in range(c.num_res_blocks):
            n = 1 + level * per_level + j
            blocks.append(Block(f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", UNET_RESNET))
            if c.attention_levels[level]:
                blocks.append(Block(f"input_blocks.{n}.1.", f"down_blocks.{level}.attentions.{j}."))
        if level < levels - 1:
            blocks.append(Block(f"input_blocks.{(level + 1) * per_level}.0.op.",
                                f"down_blocks.{level}.downsamplers.0.conv."))
    for up in range(levels):
        level = levels - 1 - up
        for j in range(per_level):
            n = up * per_level + j
            blocks.append(Block(f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{j}.", UNET_RESNET))
            if c.attention_levels[level]:
                blocks.append(Block(f"output_blocks.{n}.1.", f"up_blocks.{up}.attentions.{j}."))
            if level > 0 and j == per_level - 1:
                index = 2 if c.attention_levels[level] else 1
                blocks.append(Block(f"output_blocks.{n}.{index}.conv.", f"up_blocks.{up}.upsamplers.0.conv."))
    return blocks


def vae_blocks(c: VAEConfig) -> list[Block]:
    """The decoder's ``up.i`` counts from the highest resolution, diffusers' ``up_blocks`` from the lowest."""
    levels = len(c.channel_mult)
    blocks = [Block("quant_conv.", "quant_conv."), Block("post_quant_conv.", "post_quant_conv.")]
    for part in ("encoder", "decoder"):
        blocks += [Block(f"{part}.conv_in.", f"{part}.conv_in."), Block(f"{part}.conv_out.", f"{part}.conv_out."),
                   Block(f"{part}.norm_out.", f"{part}.conv_norm_out."),
                   Block(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", VAE_RESNET),
                   Block(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", VAE_RESNET),
                   Block(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", VAE_ATTENTION)]
    for level in range(levels):
        for j in range(c.num_res_blocks):
            blocks.append(Block(f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}.",
                                VAE_RESNET))
        if level < levels - 1:
            blocks.append(Block(f"encoder.down.{level}.downsample.conv.",
                                f"encoder.down_blocks.{level}.downsamplers.0.conv."))
    for up in range(levels):
        level = levels - 1 - up
        for j in range(c.num_res_blocks + 1):
            blocks.append(Block(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", VAE_RESNET))
        if level > 0:
            blocks.append(Block(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv."))
    return blocks


def openclip_blocks(num_layers: int) -> list[Block]:
    layer = "text_model.encoder.layers"
    return [Block("token_embedding.", "text_model.embeddings.token_embedding."),
            Block("positional_embedding", "text_model.embeddings.position_embedding.weight"),
            Block("ln_final.", "text_model.final_layer_norm.")] + \
        [Block(f"transformer.resblocks.{i}.", f"{layer}.{i}.", OPENCLIP_LAYER) for i in range(num_layers)]


def rename(state: Mapping[str, torch.Tensor], blocks: list[Block], *, to_diffusers: bool,
           what: str) -> dict[str, torch.Tensor]:
    """Rename every key by the block whose prefix it starts with (original -> diffusers or back)."""
    out = {}
    for key, value in state.items():
        for block in blocks:
            src, dst = (block.original, block.diffusers) if to_diffusers else (block.diffusers, block.original)
            if key.startswith(src):
                rest = key[len(src):]
                for a, b in block.renames:
                    a, b = (a, b) if to_diffusers else (b, a)
                    if rest.startswith(a):
                        rest = b + rest[len(a):]
                        break
                out[dst + rest] = value
                break
        else:
            raise CheckpointError(f"{what}: no rule maps the key {key!r}")
    return out


# --- original -> torchsd -------------------------------------------------------------------------------

def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def vae_from_original(state: Mapping[str, torch.Tensor], c: VAEConfig) -> dict[str, torch.Tensor]:
    """Original-layout autoencoder keys (without ``first_stage_model.``) -> torchsd's."""
    out = rename(state, vae_blocks(c), to_diffusers=True, what="autoencoder")
    for key, value in out.items():  # the mid-block attention is 1x1 convolutions in the original
        if ".attentions.0.to_" in key and key.endswith(".weight") and value.ndim == 4:
            out[key] = value.flatten(1)
    return from_diffusers_keys(out, "vae")


def text_from_original(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The text encoder(s) of an original file: {"text_encoder"[, "text_encoder_2"]} in torchsd's names."""
    out = {}
    for name, (prefix, layout), text in zip(TEXT_COMPONENTS, detect.text_layout(config.family), config.text_encoders):
        if layout == "transformers":
            state = _strip(tensors, detect.transformers_text_prefix(tensors, prefix))
            # the position_ids buffer (under either prefix, see OPTIONAL_KEYS) is not a weight
            out[name] = from_diffusers_keys({k: v for k, v in state.items() if not k.endswith("position_ids")},
                                            "text_encoder")
        else:
            out[name] = openclip_from_original(_strip(tensors, prefix), text)
    return out


def openclip_from_original(state: Mapping[str, torch.Tensor], text: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower (keys without their prefix) -> torchsd's. SD 2's drops the last layer and
    the projection; SDXL's bigG keeps both (``text_projection`` is an (in, out) matrix used as x @ P)."""
    tower = {k: v for k, v in state.items() if k not in ("text_projection", "logit_scale", "attn_mask")
             and not k.startswith(f"transformer.resblocks.{text.num_layers}.")}  # SD 2's unused last layer
    out = rename(tower, openclip_blocks(text.num_layers), to_diffusers=True, what="text encoder")
    for key in [k for k in out if ".in_proj_" in k]:
        fused = out.pop(key)
        head, kind = key.split(".in_proj_")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0)):
            out[f"{head}.{name}.{kind}"] = part
    out = from_diffusers_keys(out, "text_encoder")
    if text.with_projection:
        out[TEXT_PROJECTION] = state["text_projection"].T  # nn.Linear keeps (out, in)
    return out


def from_original(tensors: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """A whole original-layout state dict -> {"unet", "vae", "text_encoder"} in torchsd's names."""
    unet = rename(_strip(tensors, UNET_PREFIX), unet_blocks(config.unet), to_diffusers=True, what="U-Net")
    return {"unet": from_diffusers_keys(unet, "unet"),
            "vae": vae_from_original(_strip(tensors, VAE_PREFIX), config.vae)} | text_from_original(tensors, config)


# --- torchsd -> original -------------------------------------------------------------------------------

def vae_to_original(state: Mapping[str, torch.Tensor], c: VAEConfig) -> dict[str, torch.Tensor]:
    out = rename(to_diffusers_keys(dict(state), "vae"), vae_blocks(c), to_diffusers=False, what="autoencoder")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def text_to_original(states: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for name, (prefix, layout), text in zip(TEXT_COMPONENTS, detect.text_layout(config.family), config.text_encoders):
        diffusers_state = to_diffusers_keys(dict(states[name]), "text_encoder")
        if layout == "transformers":
            positions = torch.arange(text.max_positions, dtype=torch.int64)[None]
            out |= {prefix + k: v for k, v in diffusers_state.items()} | \
                {prefix + "text_model.embeddings.position_ids": positions}
        else:
            out |= {prefix + k: v for k, v in openclip_to_original(diffusers_state, text).items()}
    return out


def openclip_to_original(diffusers_state: dict[str, torch.Tensor], text: CLIPTextConfig) -> dict[str, torch.Tensor]:
    """transformers-named text tower -> OpenCLIP's names. SD 2 (no projection: torchsd keeps 23 of 24 layers)
    gets the layers it lacks as an identity; SDXL's bigG is whole and has its own projection."""
    projection = diffusers_state.pop(TEXT_PROJECTION, None)
    fused = {}
    for key in [k for k in diffusers_state if ".self_attn.q_proj." in k]:
        head, kind = key.split(".q_proj.")
        parts = [diffusers_state.pop(f"{head}.{name}.{kind}") for name in ("q_proj", "k_proj", "v_proj")]
        fused[f"{head}.in_proj_{kind}"] = torch.cat(parts, dim=0)
    out = rename(diffusers_state | fused, openclip_blocks(text.num_layers), to_diffusers=False,
                 what="text encoder")
    like = out["token_embedding.weight"]
    logit_scale = {"logit_scale": torch.tensor(math.log(100.0), dtype=like.dtype, device=like.device)}
    if projection is not None:
        return out | {"text_projection": projection.T.contiguous()} | logit_scale
    last = text.num_layers - 1
    identity_layer = {k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.", 1): torch.zeros_like(v)
                      for k, v in out.items() if k.startswith(f"transformer.resblocks.{last}.")}
    extras = {"text_projection": torch.eye(text.width, text.projection_dim, dtype=like.dtype, device=like.device)}
    return out | identity_layer | extras | logit_scale


def schedule_buffers(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The DDPM buffers original checkpoints carry (float32, as ``ldm`` registers them)."""
    from ..diffusion.schedules import betas as make_betas

    betas = make_betas(config.schedule)
    alphas = 1.0 - betas
    alpha_bar = torch.cumprod(alphas, dim=0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
    values = {
        "betas": betas, "alphas_cumprod": alpha_bar, "alphas_cumprod_prev": alpha_bar_prev,
        "sqrt_alphas_cumprod": alpha_bar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alpha_bar).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alpha_bar).log(), "sqrt_recip_alphas_cumprod": (1 / alpha_bar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alpha_bar - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
        "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
    }
    return {k: v.float() for k, v in values.items()}


def to_original(states: Mapping[str, Mapping[str, torch.Tensor]], config: ModelConfig) -> dict[str, torch.Tensor]:
    """torchsd state dicts -> one original-layout state dict (networks only, no schedule buffers)."""
    unet = rename(to_diffusers_keys(dict(states["unet"]), "unet"), unet_blocks(config.unet), to_diffusers=False,
                  what="U-Net")
    return ({UNET_PREFIX + k: v for k, v in unet.items()}
            | {VAE_PREFIX + k: v for k, v in vae_to_original(states["vae"], config.vae).items()}
            | text_to_original(states, config))


def single_file_tensors(config: ModelConfig,
                        states: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Everything a written single file holds: the networks and the schedule buffers."""
    return to_original(states, config) | schedule_buffers(config)


def write_single_file(path: str | Path, config: ModelConfig, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: single files are written as .safetensors (pickled .ckpt files can run code "
                              f"when opened by other tools); name the output {path.with_suffix('.safetensors').name}")
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config.to_dict())}
    save_safetensors(single_file_tensors(config, states), path, metadata=metadata)


# --- reading -------------------------------------------------------------------------------------------

def model_states_on_meta(config: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the models ``config`` describes, with shapes and no memory."""
    from ..models.clip import CLIPTextModel
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL

    with torch.device("meta"):
        return {"unet": UNet(config.unet).state_dict(), "vae": AutoencoderKL(config.vae).state_dict()} | \
            {name: CLIPTextModel(text).state_dict() for name, text in zip(TEXT_COMPONENTS, config.text_encoders)}


def _optional(key: str) -> bool:
    return key in OPTIONAL_KEYS or key.startswith(OPTIONAL_PREFIXES)


def compare_keys(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: object,
                 what: str, may_lack=lambda key: False, may_have=lambda key: False) -> None:
    """The exact key set and every shape, reported in the file's own key names."""
    missing = [k for k in expected if k not in tensors and not may_lack(k)]
    unexpected = [k for k in tensors if k not in expected and not may_have(k)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])}) — the file is truncated, "
                         f"was pruned of part of the model, or its config differs from the one inferred")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])}) — the file holds a "
                         f"variant of the architecture that torchsd does not run, or extra modules")
        raise CheckpointError(f"{source}: the tensors do not match {what}: {'; '.join(parts)}")
    for key, value in expected.items():
        if key in tensors and tuple(tensors[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensors[key].shape)} but the model needs "
                                  f"{tuple(value.shape)}: the file's config does not match its weights, or the "
                                  f"file is corrupt")


def check_keys(tensors: Mapping[str, torch.Tensor], config: ModelConfig, source: object) -> None:
    """The file's keys and shapes must be exactly those of the model ``config`` describes."""
    expected = to_original(model_states_on_meta(config), config)
    for prefix, layout in detect.text_layout(config.family):
        if layout == "transformers" and detect.transformers_text_prefix(tensors, prefix) == prefix:
            expected = {k.replace(prefix + "text_model.", prefix, 1): v for k, v in expected.items()}
    dropped_layer = f"{SD2_TEXT_PREFIX}transformer.resblocks.{config.text.num_layers}."
    compare_keys(tensors, expected, source, f"a {config.family.upper()} model",
                 may_lack=lambda k: _optional(k) or k.startswith(dropped_layer), may_have=_optional)


def check_vae_keys(state: Mapping[str, torch.Tensor], config: VAEConfig, source: object) -> None:
    """Original-layout autoencoder keys (without ``first_stage_model.``)."""
    from ..models.vae import AutoencoderKL

    with torch.device("meta"):
        expected = vae_to_original(AutoencoderKL(config).state_dict(), config)
    compare_keys(state, expected, source, "an autoencoder")


def ema_key(key: str) -> str:
    """``model.diffusion_model.a.b`` -> ``model_ema.diffusion_modelab`` (ldm's LitEma drops the dots)."""
    return "model_ema." + key[len("model."):].replace(".", "")


def use_ema_weights(tensors: dict[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
    unet_keys = [k for k in tensors if k.startswith(UNET_PREFIX)]
    missing = [k for k in unet_keys if ema_key(k) not in tensors]
    if missing:
        raise CheckpointError(f"{source}: use_ema=True but the file holds no EMA copy of {missing[0]} "
                              f"({ema_key(missing[0])}); most released files already store the EMA weights as "
                              f"their main weights: load without use_ema")
    return tensors | {k: tensors[ema_key(k)] for k in unet_keys}


def parse_prediction_type(value: str | PredictionType) -> PredictionType:
    aliases = {"eps": "epsilon", "v": "v_prediction", "v-prediction": "v_prediction"}
    try:
        return PredictionType(aliases.get(str(getattr(value, "value", value)).lower(), value))
    except ValueError:
        raise CheckpointError(f"prediction_type must be 'epsilon' (or 'eps') or 'v_prediction' (or 'v'); "
                              f"got {value!r}") from None


def sidecar_prediction_type(path: Path) -> PredictionType | None:
    """``parameterization: "v"`` in a ``.yaml`` beside the file, as the original configs and other tools
    have it. One key is all torchsd reads, so a regex does instead of a YAML parser."""
    for yaml in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if yaml.is_file():
            match = re.search(r"^\s*parameterization:\s*[\"']?([\w-]+)", yaml.read_text(errors="replace"), re.MULTILINE)
            return parse_prediction_type(match.group(1)) if match else PredictionType.EPSILON
    return None


def read_config(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str],
                prediction_type: str | PredictionType | None) -> ModelConfig:
    """From the embedded torchsd config, else inferred from the tensors; then the prediction type:
    the argument, else a sidecar .yaml, else what the file says (epsilon when it says nothing)."""
    chosen = parse_prediction_type(prediction_type) if prediction_type is not None else sidecar_prediction_type(path)
    if METADATA_KEY in metadata:
        try:
            config = ModelConfig.from_dict(json.loads(metadata[METADATA_KEY]))
        except (ValueError, TypeError, KeyError) as err:
            raise CheckpointError(f"{path}: the embedded {METADATA_KEY} is not a valid torchsd config: {err}") from None
        if chosen is not None:
            config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, prediction_type=chosen))
        return config
    return detect.infer_config(tensors, path, chosen or PredictionType.EPSILON)


def read_single_file(path: str | Path, *, use_ema: bool = False,
                     prediction_type: str | PredictionType | None = None):
    """Config, {"unet", "vae", "text_encoder"} state dicts in torchsd's names, and the tokenizer of an
    original-layout ``.safetensors`` / ``.ckpt``. Tensors stay memory-mapped and in the file's dtype."""
    from ..text.tokenizer import CLIPTokenizer

    path = Path(path)
    tensors = load_state_dict(path)
    metadata = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    detect.refuse_unsupported(tensors, path)
    if use_ema:
        tensors = use_ema_weights(tensors, path)
    config = read_config(tensors, path, metadata, prediction_type)
    family = detect.text_family(tensors)
    if family != config.family:
        raise CheckpointError(f"{path}: the text encoder is {family.upper()}'s but the embedded config says "
                              f"{config.family!r}")
    check_keys(tensors, config, path)
    states = from_original(tensors, config)
    return config, states, CLIPTokenizer(pad_token_id=config.text.pad_token_id)
