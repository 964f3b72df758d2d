"""Whole SD 3 / 3.5 and FLUX.1 models: every part a flow pipeline needs, from a diffusers folder (as
``StableDiffusion3Pipeline.save_pretrained`` / ``FluxPipeline.save_pretrained`` write them) or from single
files, and back to a diffusers folder.

Single files come in two shapes. SD 3.5's all-in-one files (``sd3.5_medium.safetensors``) hold the MMDiT,
the VAE (``first_stage_model.``) and the text encoders (``text_encoders.clip_l/clip_g/t5xxl.transformer.``).
FLUX.1's files (``flux1-dev.safetensors``, GGUF and fp8 versions) hold the transformer only; the autoencoder
(``ae.safetensors``) and the text encoders (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``) are separate
files. They are given explicitly (``vae=``, ``text_encoders=[...]``: ``--vae``, ``--text-encoder``) or found
beside the model as AUTOMATIC1111 Forge and ComfyUI keep them: in the model's folder, or in a sibling
``VAE``/``vae`` and ``text_encoder``/``text_encoders``/``clip`` folder (what a file holds is read from its
tensor names, never guessed from its file name; of two CLIP towers the narrower is CLIP-L). T5's tokenizer
is not part of any weights file: ``t5_tokenizer=`` (``--t5-tokenizer``) names a ``tokenizer.json`` (or a
folder with one, such as a diffusers folder's ``tokenizer_2/``); without it one is looked for as
``tokenizer.json`` in a ``t5_tokenizer``/``tokenizer_3``/``tokenizer_2`` folder beside the T5 file or the
model. The CLIP tokenizers are CLIP's own vocabulary, which torchsd ships.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ..config import CLIPTextConfig, FlowScheduleConfig, FluxConfig, MMDiTConfig, T5Config, VAEConfig
from .diffusers import (
    TEXT_PROJECTION,
    from_diffusers_keys,
    load_into,
    text_config_from_transformers,
    text_from_transformers_keys,
    vae_config_from_diffusers,
)
from .io import CheckpointError, has_variant, read_weights

FAMILIES = {"sd3": "SD 3 / 3.5", "flux": "FLUX.1"}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".sft")
VAE_FOLDERS = ("VAE", "vae")
TEXT_FOLDERS = ("text_encoder", "text_encoders", "clip", "Text-encoders")
T5_TOKENIZER_FOLDERS = ("t5_tokenizer", "tokenizer_3", "tokenizer_2")
T5_MAX_LENGTH = {"sd3": 256, "dev": 512, "schnell": 256}  # diffusers' and BFL's defaults


@dataclass
class FlowModel:
    """The parts of a flow-matching model, built and loaded (``pipeline.FlowPipeline`` runs them).

    ``text_sources``: "clip_l", "clip_g" (SD 3) and "t5", each a function that reads that encoder from its
    file(s) and builds it, so that a pipeline which frees its encoders after use can read them again. A model
    without "t5" (SD 3 without text_encoder_3, or asked to run without it) conditions on zeros in its place, as
    diffusers does. ``text``: the encoders built at load (T5 is left to the first prompt when ``t5="later"``);
    ``tokenizers``: one per role (T5's None where there is no T5)."""

    family: str  # "sd3" or "flux"
    variant: str  # "dev", "schnell", "sd35_medium", "sd35_large", …
    transformer: nn.Module
    vae: nn.Module
    schedule: FlowScheduleConfig
    text: dict[str, nn.Module]
    tokenizers: dict[str, object]
    name: str
    source: Path | None = None  # the single file, for its hash
    t5_max_length: int = 256
    parts: dict[str, str] = field(default_factory=dict)  # where each part came from (for messages and the server)
    text_sources: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)


T5_WHEN = ("now", "later", "none")


def _check_t5(t5: str, family: str, where: object) -> None:
    if t5 not in T5_WHEN:
        raise ValueError(f"t5 must be one of {', '.join(T5_WHEN)}; got {t5!r}")
    if t5 == "none" and family == "flux":
        raise CheckpointError(f"{where}: FLUX.1's context is T5's tokens, so it cannot run without T5; running "
                              f"without it is for SD 3 / 3.5 (diffusers' text_encoder_3=None)")


def _built(sources: dict[str, Callable[[], nn.Module]], t5: str) -> dict[str, nn.Module]:
    """The encoders built at load: all but T5 when it is left for later."""
    return {role: build() for role, build in sources.items() if role != "t5" or t5 == "now"}


# --- what a path holds ---------------------------------------------------------------------------------------

def flow_family(path: str | Path | None) -> str | None:
    """"sd3" or "flux" for a flow model's diffusers folder or transformer file, else None (SD 1/2/XL, or not
    a model). Reads model_index.json or the file's tensor names only."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        try:
            name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            return None
        return "sd3" if name.startswith("StableDiffusion3") else "flux" if name.startswith("Flux") else None
    if not path.is_file():
        return None
    return family_of_keys(tensor_names(path))


def family_of_keys(names) -> str | None:
    from . import bfl, sd3_original

    names = set(names)
    if bfl.MARKER in names or bfl.PREFIX + bfl.MARKER in names:
        return "flux"
    if sd3_original.MARKER in names or sd3_original.PREFIX + sd3_original.MARKER in names:
        return "sd3"
    return None


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a .safetensors or .gguf file, read from its header (no weights loaded)."""
    try:
        if path.suffix == ".gguf":
            import gguf

            return [t.name for t in gguf.GGUFReader(str(path)).tensors]
        if path.suffix in (".safetensors", ".sft"):
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 1 << 28:
                    return []
                return [k for k in json.loads(f.read(size)) if k != "__metadata__"]
    except (OSError, ValueError, ImportError):
        return []
    return []


# --- configs from diffusers' and transformers' config.json ---------------------------------------------------

def mmdit_config_from_diffusers(cfg: dict) -> MMDiTConfig:
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    if cfg.get("caption_projection_dim", heads * head_dim) != heads * head_dim:
        raise CheckpointError(f"transformer: caption_projection_dim {cfg['caption_projection_dim']} differs from the "
                              f"width {heads * head_dim}; every SD 3 model has them equal")
    if cfg.get("qk_norm") not in (None, "rms_norm"):
        raise CheckpointError(f"transformer: qk_norm {cfg['qk_norm']!r} is not supported (None or 'rms_norm')")
    return MMDiTConfig(in_channels=cfg.get("in_channels", 16), out_channels=cfg.get("out_channels") or 16,
                       patch_size=cfg.get("patch_size", 2), num_layers=cfg["num_layers"], num_heads=heads,
                       head_dim=head_dim, context_dim=cfg["joint_attention_dim"],
                       pooled_dim=cfg["pooled_projection_dim"], sample_size=cfg.get("sample_size", 128),
                       pos_embed_max_size=cfg.get("pos_embed_max_size", 96),
                       dual_attention_blocks=tuple(cfg.get("dual_attention_layers") or ()),
                       qk_norm=cfg.get("qk_norm") == "rms_norm")


def flux_config_from_diffusers(cfg: dict) -> FluxConfig:
    in_channels, out_channels = cfg.get("in_channels", 64), cfg.get("out_channels") or cfg.get("in_channels", 64)
    if cfg.get("patch_size", 1) != 1 or out_channels % 4:
        raise CheckpointError(f"transformer: patch_size {cfg.get('patch_size')}, out_channels {out_channels}: not "
                              f"FLUX.1's packed 2x2 latents (patch_size 1, 64 features per token)")
    latent_channels = out_channels // 4
    from .flux import flux_condition_channels

    condition_channels = flux_condition_channels(in_channels, out_channels, "transformer")
    return FluxConfig(latent_channels=latent_channels, condition_channels=condition_channels, patch_size=2,
                      num_double_blocks=cfg["num_layers"],
                      num_single_blocks=cfg["num_single_layers"], num_heads=cfg["num_attention_heads"],
                      head_dim=cfg["attention_head_dim"], context_dim=cfg["joint_attention_dim"],
                      pooled_dim=cfg["pooled_projection_dim"], guidance_embeds=bool(cfg.get("guidance_embeds")),
                      axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))))


def t5_config_from_transformers(cfg: dict) -> T5Config:
    if cfg.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(f"text encoder: T5 feed_forward_proj {cfg['feed_forward_proj']!r}; SD 3.5 and FLUX.1 "
                              f"use T5 v1.1 (gated-gelu)")
    return T5Config(vocab_size=cfg["vocab_size"], width=cfg["d_model"], num_layers=cfg["num_layers"],
                    num_heads=cfg["num_heads"], head_dim=cfg["d_kv"], ffn_dim=cfg["d_ff"],
                    num_buckets=cfg.get("relative_attention_num_buckets", 32),
                    max_distance=cfg.get("relative_attention_max_distance", 128),
                    norm_eps=cfg.get("layer_norm_epsilon", 1e-6))


def schedule_from_diffusers(cfg: dict, family: str) -> FlowScheduleConfig:
    """FlowMatchEulerDiscreteScheduler's config; the step spacing is the pipeline's (SD 3: between the shifted
    training schedule's ends; FLUX.1: uniform)."""
    for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                 "stochastic_sampling"):
        if cfg.get(name):
            raise CheckpointError(f"scheduler: {name}=true is not supported for flow models")
    if cfg.get("shift_terminal") is not None or cfg.get("time_shift_type", "exponential") != "exponential":
        raise CheckpointError("scheduler: shift_terminal / a linear time shift are not supported for flow models")
    return FlowScheduleConfig(num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=cfg.get("shift", 1.0),
                              dynamic_shift=bool(cfg.get("use_dynamic_shifting")),
                              base_shift=cfg.get("base_shift", 0.5), max_shift=cfg.get("max_shift", 1.15),
                              base_image_seq_len=cfg.get("base_image_seq_len", 256),
                              max_image_seq_len=cfg.get("max_image_seq_len", 4096),
                              spacing="training" if family == "sd3" else "uniform")


# --- building parts --------------------------------------------------------------------------------------------

def _build(make, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype | None) -> nn.Module:
    """``make()`` on the meta device, then the tensors assigned (no second copy), every key and shape checked."""
    with torch.device("meta"):
        module = make()
    load_into(module, dict(state), source, dtype=dtype, assign=True)
    return module.eval().requires_grad_(False)


def build_clip(state: Mapping[str, torch.Tensor], config: CLIPTextConfig, projection: bool, source: str,
               dtype: torch.dtype | None) -> nn.Module:
    """A CLIP text tower from transformers-layout tensors (either version's). ``projection``: keep
    ``text_projection`` (SD 3); a CLIP-L without one gets the identity, SD 3's own CLIP-L projection."""
    from ..models.flow_text import CLIPWithProjection

    ours = text_from_transformers_keys(dict(state), source)
    projection_weight = ours.pop(TEXT_PROJECTION, None)
    ours = {"text." + k: v for k, v in ours.items()}
    if projection:
        if projection_weight is None:
            projection_weight = torch.eye(config.width)
            config = dataclasses.replace(config, projection_dim=config.width)
        ours[TEXT_PROJECTION] = projection_weight
    return _build(lambda: CLIPWithProjection(config, projection), ours, source, dtype)


def build_t5(state: Mapping[str, torch.Tensor], config: T5Config, source: str, dtype: torch.dtype | None):
    from ..models.t5 import T5Encoder
    from .quantized import load_quantized
    from .t5 import from_transformers

    try:
        ours = from_transformers(dict(state), config)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None
    return load_quantized(lambda: T5Encoder(config), ours, dtype or torch.float32, source).requires_grad_(False)


def build_vae(state: Mapping[str, torch.Tensor], config: VAEConfig, source: str, dtype: torch.dtype | None):
    from ..models.vae import AutoencoderKL

    return _build(lambda: AutoencoderKL(config), state, source, dtype)


def build_transformer(family: str, config, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype | None):
    from ..models.flux import Flux
    from ..models.mmdit import MMDiT
    from .quantized import load_quantized

    make = (lambda: Flux(config)) if family == "flux" else (lambda: MMDiT(config))
    return load_quantized(make, state, dtype or torch.float32, source).requires_grad_(False)


def flux_variant(config: FluxConfig) -> str:
    return "dev" if config.guidance_embeds else "schnell"


def sd3_variant(config: MMDiTConfig) -> str:
    if config.dual_attention_blocks:
        return "sd35_medium"
    return "sd35_large" if config.num_layers == 38 and config.qk_norm else "sd3" if not config.qk_norm else "sd35"


# --- diffusers folders -------------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing from the diffusers folder") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weights(folder: Path, variant: str | None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return read_weights(folder, variant if variant is not None and has_variant(folder, variant) else None, dtype)


def _present(folder: Path, index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and entry[0] is not None and (folder / name).is_dir()


def read_flow_folder(folder: str | Path, *, dtype: torch.dtype | None = None, variant: str | None = None,
                     t5: str = "now") -> FlowModel:
    """An SD 3 / 3.5 or FLUX.1 diffusers folder. Text encoders in transformers 4's or 5's layout; SD 3
    without text_encoder_3 runs without T5 (zeros), as diffusers does. ``t5``: build T5 "now", "later" (on
    first use) or not at all, "none" (SD 3 only: as diffusers' ``text_encoder_3=None``)."""
    from ..text.t5_tokenizer import T5Tokenizer
    from ..text.tokenizer import CLIPTokenizer

    folder = Path(folder)
    index = _json(folder / "model_index.json")
    family = flow_family(folder)
    if family is None:
        raise CheckpointError(f"{folder}: model_index.json names {index.get('_class_name')!r}, not an SD 3 or FLUX.1 "
                              f"pipeline")
    _check_t5(t5, family, folder)
    cfg = _json(folder / "transformer" / "config.json")
    try:
        config = mmdit_config_from_diffusers(cfg) if family == "sd3" else flux_config_from_diffusers(cfg)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'transformer' / 'config.json'}: not an SD 3/FLUX.1 transformer config: "
                              f"{err}") from None
    from . import flux as flux_keys
    from . import mmdit as mmdit_keys

    keys = mmdit_keys if family == "sd3" else flux_keys
    try:
        state = keys.from_diffusers(_weights(folder / "transformer", variant), config)
    except ValueError as err:
        raise CheckpointError(f"{folder / 'transformer'}: {err}") from None
    transformer = build_transformer(family, config, state, f"{folder} (transformer)", dtype)

    vae_config = vae_config_from_diffusers(_json(folder / "vae" / "config.json"))
    vae = build_vae(from_diffusers_keys(_weights(folder / "vae", variant), "vae"), vae_config, f"{folder} (vae)", dtype)

    def clip(name: str, tokenizer_name: str, projection: bool):
        tokenizer = CLIPTokenizer.from_pretrained(folder / tokenizer_name)
        text_config = text_config_from_transformers(_json(folder / name / "config.json"), tokenizer.pad_token_id,
                                                    tokenizer.bos_token_id, tokenizer.eos_token_id)

        def build() -> nn.Module:
            state = _weights(folder / name, variant, dtype)
            if not projection:
                state.pop(TEXT_PROJECTION, None)
            return build_clip(state, text_config, projection, f"{folder} ({name})", dtype)

        return build, tokenizer

    sources, tokenizers = {}, {}
    t5_name = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    if family == "sd3":
        sources["clip_l"], tokenizers["clip_l"] = clip("text_encoder", "tokenizer", True)
        sources["clip_g"], tokenizers["clip_g"] = clip("text_encoder_2", "tokenizer_2", True)
        variant_name = sd3_variant(config)
    else:
        sources["clip_l"], tokenizers["clip_l"] = clip("text_encoder", "tokenizer", False)
        variant_name = flux_variant(config)
    max_length = T5_MAX_LENGTH["sd3" if family == "sd3" else variant_name]
    tokenizers["t5"] = None
    if _present(folder, index, t5_name) and t5 != "none":
        t5_config = t5_config_from_transformers(_json(folder / t5_name / "config.json"))
        sources["t5"] = lambda: build_t5(_weights(folder / t5_name, variant, dtype), t5_config,
                                         f"{folder} ({t5_name})", dtype)
        tokenizers["t5"] = T5Tokenizer(folder / t5_name.replace("text_encoder", "tokenizer"), max_length)
    elif family == "flux":
        raise CheckpointError(f"{folder}: FLUX.1 needs its T5 encoder ({t5_name}/ and tokenizer_2/)")
    schedule = schedule_from_diffusers(_json(folder / "scheduler" / "scheduler_config.json"), family)
    return FlowModel(family, variant_name, transformer, vae, schedule, _built(sources, t5), tokenizers,
                     name=folder.name, t5_max_length=max_length, parts={"model": str(folder)}, text_sources=sources)


# --- single files ----------------------------------------------------------------------------------------------

TEXT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                 "t5": "text_encoders.t5xxl.transformer."}
VAE_PREFIXES = ("first_stage_model.", "vae.")


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def text_kind(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """"clip" or "t5" for a text encoder's tensors in transformers' layout (either version's), else None."""
    if any(k.startswith(("encoder.block.0.layer.0.SelfAttention", "shared.")) for k in tensors):
        return "t5"
    if any(k.endswith("embeddings.token_embedding.weight") for k in tensors):
        return "clip"
    return None


def clip_config_of(tensors: Mapping[str, torch.Tensor], role: str, source: object) -> CLIPTextConfig:
    """A CLIP text tower's config from its tensors. Not stored, and taken from the published towers: 64-wide
    heads, CLIP-L's quick-GELU and bigG's GELU; bigG's tokenizer pads with "!" (id 0), CLIP-L's with the end
    token."""
    ours = text_from_transformers_keys(dict(tensors), str(source))
    try:
        vocab, width = ours["token_embedding.weight"].shape
        layers = len({k.split(".")[1] for k in ours if k.startswith("layers.")})
        projection = ours.get(TEXT_PROJECTION)
        return CLIPTextConfig(vocab_size=vocab, max_positions=ours["position_embedding.weight"].shape[0], width=width,
                              num_layers=layers, num_heads=max(1, width // 64),
                              ffn_dim=ours["layers.0.mlp.fc1.weight"].shape[0],
                              activation="gelu" if role == "clip_g" else "quick_gelu",
                              projection_dim=projection.shape[0] if projection is not None else width,
                              pad_token_id=0 if role == "clip_g" else 49407)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: not a CLIP text tower torchsd reads ({err})") from None


def t5_config_of(tensors: Mapping[str, torch.Tensor], source: object) -> T5Config:
    """T5 v1.1's config from its tensors (the bucket distance, not stored, is T5's 128)."""
    try:
        shared = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
        bias = tensors["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        heads = bias.shape[1]
        return T5Config(vocab_size=shared.shape[0], width=shared.shape[1],
                        num_layers=len({k.split(".")[2] for k in tensors if k.startswith("encoder.block.")}),
                        num_heads=heads,
                        head_dim=tensors["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
                        ffn_dim=tensors["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                        num_buckets=bias.shape[0])
    except (KeyError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{source}: not a T5 v1.1 encoder in transformers' layout ({err})") from None


def _beside(model: Path, folders: tuple[str, ...]) -> list[Path]:
    """Weight files in the model's own folder and in sibling folders of these names (Forge's models/VAE,
    models/text_encoder; ComfyUI's models/vae, models/clip), one level up too."""
    places = [model.parent] + [base / name for base in (model.parent, model.parent.parent) for name in folders]
    files: list[Path] = []
    for place in dict.fromkeys(places):
        if place.is_dir():
            files += sorted(p for p in place.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file() and p != model)
    return files


def _is_vae(names: list[str]) -> bool:
    return any(n.endswith("decoder.conv_in.weight") for n in names) and not family_of_keys(names)


def _read_vae(path: Path, family: str, dtype: torch.dtype | None, tensors: Mapping | None = None) -> nn.Module:
    """A 16-channel autoencoder: a diffusers vae/ folder, or a file in LDM names (ae.safetensors), bare or under
    ``first_stage_model.``/``vae.`` (``tensors``: the file's, when already read)."""
    from . import bfl, detect
    from .quantized import read_quantized

    preset = VAEConfig.sd3() if family == "sd3" else VAEConfig.flux()
    if path.is_dir():
        config = vae_config_from_diffusers(_json(path / "config.json"))
        return build_vae(from_diffusers_keys(read_weights(path), "vae"), config, str(path), dtype)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such VAE file or folder")
    tensors = read_quantized(path) if tensors is None else tensors
    prefix = next((p for p in VAE_PREFIXES if p + "decoder.conv_in.weight" in tensors), "")
    tensors = {k: _plain(v) for k, v in tensors.items() if k.startswith(prefix)}
    if prefix + "decoder.conv_in.weight" not in tensors:
        raise CheckpointError(f"{path}: not an autoencoder (no decoder.conv_in.weight)")
    config = dataclasses.replace(detect.vae_config(tensors, prefix), scaling_factor=preset.scaling_factor,
                                 shift_factor=preset.shift_factor, use_quant_conv=False)
    if config.latent_channels != 16:
        raise CheckpointError(f"{path}: an autoencoder with {config.latent_channels} latent channels; "
                              f"{FAMILIES[family]} needs its 16-channel one (FLUX.1: ae.safetensors)")
    return build_vae(bfl.vae_from_original(tensors, config, path), config, str(path), dtype)


def _plain(value):
    """A QuantizedTensor dequantized (small parts: VAE, CLIP); tensors as they are."""
    return value.dequantize() if hasattr(value, "dequantize") else value


def _t5_tokenizer(path: Path | None, near: list[Path], max_length: int):
    from ..text.t5_tokenizer import T5Tokenizer

    if path is not None:
        return T5Tokenizer(path, max_length)
    for place in near:
        for name in T5_TOKENIZER_FOLDERS:
            if (place / name / "tokenizer.json").is_file():
                return T5Tokenizer(place / name, max_length)
    return None


def read_flow_file(path: str | Path, *, dtype: torch.dtype | None = None, vae: str | Path | None = None,
                   text_encoders: list[str | Path] | tuple = (), t5_tokenizer: str | Path | None = None,
                   t5: str = "now") -> FlowModel:
    """A FLUX.1 or SD 3 / 3.5 single file (plain, fp8 or GGUF; transformer-only or all-in-one), with the
    parts it lacks from ``vae``, ``text_encoders`` or beside it (see the module doc). ``t5``: as for
    ``read_flow_folder``. The text encoders of an all-in-one file are read by themselves, part by part."""
    from ..text.tokenizer import CLIPTokenizer
    from . import bfl, sd3_original
    from .flow_files import detect
    from .quantized import read_quantized

    path = Path(path)
    file_names = tensor_names(path)
    tensors = read_quantized(path, keep=lambda k: not k.startswith(tuple(TEXT_PREFIXES.values())), dtype=dtype)
    found = detect(tensors, path)
    family, parts = found.family, {"model": str(path)}
    _check_t5(t5, family, path)
    if family == "flux":
        state = bfl.from_bfl(tensors, found.config, path)
    else:
        state = sd3_original.from_original(tensors, found.config, path)
    transformer = build_transformer(family, found.config, state, str(path), dtype)
    variant = flux_variant(found.config) if family == "flux" else sd3_variant(found.config)
    max_length = T5_MAX_LENGTH["sd3" if family == "sd3" else variant]

    # the parts: inside the file, then given, then beside it
    def plain(values: Mapping) -> dict[str, torch.Tensor]:
        return {k: _plain(v) for k, v in values.items()}

    # role -> (a function reading the encoder's tensors, where they are)
    text_tensors: dict[str, tuple[Callable[[], Mapping], str]] = {}
    for role, prefix in TEXT_PREFIXES.items():
        if any(n.startswith(prefix) for n in file_names):
            text_tensors[role] = ((lambda prefix=prefix: _strip(read_quantized(
                path, keep=lambda k: k.startswith(prefix), dtype=dtype), prefix)), f"{path} ({prefix[:-1]})")
    vae_module = None
    if any(p + "decoder.conv_in.weight" in tensors for p in VAE_PREFIXES):
        vae_module = _read_vae(path, family, dtype, tensors)
        parts["vae"] = str(path)
    elif vae is not None:
        vae_module = _read_vae(Path(vae), family, dtype)
        parts["vae"] = str(vae)
    else:
        candidates = [p for p in _beside(path, VAE_FOLDERS) if _is_vae(tensor_names(p))]
        if len(candidates) > 1:
            raise CheckpointError(f"{path}: several autoencoders beside the model ({', '.join(map(str, candidates))}); "
                                  f"name one with --vae (vae=)")
        if not candidates:
            name = "ae.safetensors" if family == "flux" else "its 16-channel VAE"
            raise CheckpointError(f"{path}: this {FAMILIES[family]} file holds the transformer only and no autoencoder "
                                  f"was found beside it; give {name} with --vae FILE (vae=), or put it in a VAE/ "
                                  f"folder next to the model's folder")
        vae_module = _read_vae(candidates[0], family, dtype)
        parts["vae"] = str(candidates[0])

    given = [Path(p) for p in text_encoders]
    found_files = given or [p for p in _beside(path, TEXT_FOLDERS) if p not in (Path(parts["vae"]),)]
    clips, t5s = [], []
    for file in found_files:
        if not file.is_file():
            raise CheckpointError(f"{file}: no such text encoder file")
        names = tensor_names(file)
        if family_of_keys(names) or _is_vae(names):
            if given:
                what = "an autoencoder (give it with --vae)" if _is_vae(names) else "a transformer (the model itself)"
                raise CheckpointError(f"{file}: given as a text encoder, but it is {what}; not a CLIP or T5 encoder")
            continue
        kind = text_kind(dict.fromkeys(names))
        if kind is None:
            if given:
                raise CheckpointError(f"{file}: not a CLIP or T5 text encoder in transformers' layout (first keys: "
                                      f"{', '.join(names[:3]) or 'none'})")
            continue
        (clips if kind == "clip" else t5s).append(file)
    if "t5" not in text_tensors and t5s and t5 != "none":
        if len(t5s) > 1:
            raise CheckpointError(f"several T5 encoders found ({', '.join(map(str, t5s))}); name one with "
                                  f"--text-encoder (text_encoders=)")
        text_tensors["t5"] = (lambda: read_quantized(t5s[0], dtype=dtype), str(t5s[0]))  # an fp8 T5 stays fp8
    wanted = ["clip_l", "clip_g"] if family == "sd3" else ["clip_l"]
    missing_clips = [r for r in wanted if r not in text_tensors]
    if missing_clips:
        widths = sorted(((_clip_width(f), f) for f in clips), key=lambda item: item[0])
        if family == "sd3" and len(widths) == 2 and missing_clips == ["clip_l", "clip_g"]:
            roles = dict(zip(["clip_l", "clip_g"], [f for _, f in widths]))
        elif len(widths) == 1 and len(missing_clips) == 1:
            roles = {missing_clips[0]: widths[0][1]}
        elif family == "flux" and widths:
            roles = {"clip_l": widths[0][1]}
        else:
            roles = {}
        for role, file in roles.items():
            text_tensors[role] = ((lambda file=file: read_quantized(file, dtype=dtype)), str(file))
    still = [r for r in wanted if r not in text_tensors]
    if still:
        names = {"clip_l": "CLIP-L (clip_l.safetensors)", "clip_g": "OpenCLIP-bigG (clip_g.safetensors)"}
        raise CheckpointError(f"{path}: {FAMILIES[family]} needs {' and '.join(names[r] for r in still)}; give "
                              f"the files with --text-encoder FILE (text_encoders=[...]) or put them in a "
                              f"text_encoder/ folder next to the model's folder")
    if family == "flux" and "t5" not in text_tensors:
        raise CheckpointError(f"{path}: FLUX.1 needs the T5-XXL encoder (t5xxl_fp16.safetensors or an fp8 one); give "
                              f"it with --text-encoder FILE (text_encoders=[...]) or put it in a text_encoder/ "
                              f"folder next to the model's folder")

    def clip(role: str, read: Callable[[], Mapping], source: str) -> nn.Module:
        tensors_of = read()
        config = clip_config_of(tensors_of, role, source)
        state = dict(tensors_of)
        if family == "flux":
            state.pop(TEXT_PROJECTION, None)
            state.pop("text_model." + TEXT_PROJECTION, None)
        return build_clip(plain(state), config, family == "sd3", source, dtype)

    def t5_encoder(read: Callable[[], Mapping], source: str) -> nn.Module:
        t5_state = read()
        return build_t5(t5_state, t5_config_of(t5_state, source), source, dtype)

    sources: dict[str, Callable[[], nn.Module]] = {}
    tokenizers: dict[str, object] = {}
    for role in wanted:
        read, source = text_tensors[role]
        sources[role] = lambda role=role, read=read, source=source: clip(role, read, source)
        parts[role] = source
    tokenizers["t5"] = None
    if "t5" in text_tensors and t5 != "none":
        read, source = text_tensors["t5"]
        near = [Path(source.split(" (")[0]).parent, path.parent, path.parent.parent]
        tokenizer = _t5_tokenizer(Path(t5_tokenizer) if t5_tokenizer is not None else None,
                                  [*near, *(p / n for p in near for n in TEXT_FOLDERS)], max_length)
        if tokenizer is None:
            raise CheckpointError(f"{path}: T5's tokenizer is not in any weights file; give its tokenizer.json with "
                                  f"--t5-tokenizer PATH (t5_tokenizer=): google/t5-v1_1-xxl's, or the tokenizer_2/ "
                                  f"(FLUX.1) or tokenizer_3/ (SD 3.5) folder of a diffusers download; or put it in "
                                  f"t5_tokenizer/ beside the T5 file")
        sources["t5"] = lambda: t5_encoder(read, source)
        tokenizers["t5"] = tokenizer
        parts["t5"] = source
    text = _built(sources, t5)
    for role in wanted:
        tokenizers[role] = CLIPTokenizer(pad_token_id=text[role].config.pad_token_id)
    schedule = (FlowScheduleConfig.sd3() if family == "sd3" else FlowScheduleConfig.flux_dev() if variant == "dev"
                else FlowScheduleConfig.flux_schnell())
    return FlowModel(family, variant, transformer, vae_module, schedule, text, tokenizers, name=path.stem,
                     source=path, t5_max_length=max_length, parts=parts, text_sources=sources)


def _clip_width(path: Path) -> int:
    from .io import load_state_dict

    state = load_state_dict(path)
    return next(v.shape[1] for k, v in state.items() if k.endswith("token_embedding.weight"))


# --- writing a diffusers folder ---------------------------------------------------------------------------------

def float_state(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A module's state dict with quantized linear weights dequantized (to ``dtype``, default float32)."""
    from ..models.quantized import QuantizedLinear

    state = {}
    quantized = {name: m for name, m in module.named_modules() if isinstance(m, QuantizedLinear)}
    for key, value in module.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized:
            if leaf == "data":
                state[f"{owner}.weight"] = quantized[owner].quantized_weight().dequantize(dtype or torch.float32)
            elif leaf == "bias":
                state[key] = value.to(dtype) if dtype is not None else value
            continue
        state[key] = value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return {k: v.contiguous() for k, v in state.items()}


def write_flow_folder(pipe, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """A ``FlowPipeline`` as the diffusers folder ``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained``
    read (quantized weights written dequantized)."""
    from . import flux as flux_keys
    from . import mmdit as mmdit_keys
    from .diffusers import text_config_to_transformers, to_diffusers_keys, vae_config_to_diffusers
    from .io import save_safetensors
    from .t5 import config_to_transformers as t5_config_to_transformers
    from .t5 import to_transformers as t5_to_transformers

    folder = Path(folder)
    config, family = pipe.config, pipe.family
    keys = mmdit_keys if family == "sd3" else flux_keys
    components: dict[str, list] = {}

    def write(name: str, cfg: dict, tensors: dict, filename: str, library: str, cls: str) -> None:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg, indent=2))
        save_safetensors(tensors, folder / name / filename, metadata={"format": "pt"})
        components[name] = [library, cls]

    transformer_cfg = {"_class_name": "SD3Transformer2DModel" if family == "sd3" else "FluxTransformer2DModel",
                       **keys.config_to_diffusers(config.transformer)}
    if family == "sd3":
        transformer_cfg["dual_attention_layers"] = list(config.transformer.dual_attention_blocks)
    write("transformer", transformer_cfg, keys.to_diffusers(float_state(pipe.transformer, dtype), config.transformer),
          "diffusion_pytorch_model.safetensors", "diffusers", transformer_cfg["_class_name"])
    write("vae", vae_config_to_diffusers(config.vae, config.sample_size),
          to_diffusers_keys(float_state(pipe.vae, dtype), "vae"), "diffusion_pytorch_model.safetensors",
          "diffusers", "AutoencoderKL")
    roles = ["clip_l", "clip_g"] if family == "sd3" else ["clip_l"]
    t5_index = 3 if family == "sd3" else 2
    for i, role in enumerate(roles):
        name = "text_encoder" if i == 0 else "text_encoder_2"
        encoder = pipe.text_encoder(role)
        state = float_state(encoder, dtype)
        projection = state.pop(TEXT_PROJECTION, None)
        tensors = to_diffusers_keys({k.removeprefix("text."): v for k, v in state.items()}, "text_encoder")
        cls = "CLIPTextModelWithProjection" if projection is not None else "CLIPTextModel"
        if projection is not None:
            tensors[TEXT_PROJECTION] = projection
        text_cfg = {**text_config_to_transformers(encoder.config), "architectures": [cls],
                    "projection_dim": projection.shape[0] if projection is not None else encoder.config.projection_dim}
        write(name, text_cfg, tensors, "model.safetensors", "transformers", cls)
        pipe.tokenizers[role].save_pretrained(folder / name.replace("text_encoder", "tokenizer"))
        components[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    t5_name, t5_tokenizer_name = f"text_encoder_{t5_index}", f"tokenizer_{t5_index}"
    t5 = pipe.text_encoder("t5")
    if t5 is not None:
        t5_cfg = {"architectures": ["T5EncoderModel"], "model_type": "t5", **t5_config_to_transformers(t5.config)}
        write(t5_name, t5_cfg, t5_to_transformers(float_state(t5, dtype), t5.config), "model.safetensors",
              "transformers", "T5EncoderModel")
        (folder / t5_tokenizer_name).mkdir(exist_ok=True)
        pipe.tokenizers["t5"].backend.save(str(folder / t5_tokenizer_name / "tokenizer.json"))
        (folder / t5_tokenizer_name / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "extra_ids": 0, "model_max_length": config.t5_max_length}, indent=2))
        components[t5_tokenizer_name] = ["transformers", "T5Tokenizer"]
    else:
        components[t5_name] = components[t5_tokenizer_name] = [None, None]
    schedule = config.schedule
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": schedule.num_train_timesteps,
        "shift": schedule.shift, "use_dynamic_shifting": schedule.dynamic_shift, "base_shift": schedule.base_shift,
        "max_shift": schedule.max_shift, "base_image_seq_len": schedule.base_image_seq_len,
        "max_image_seq_len": schedule.max_image_seq_len}, indent=2))
    components["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    components.update({"image_encoder": [None, None], "feature_extractor": [None, None]})
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline",
        "_diffusers_version": "0.42.1", **dict(sorted(components.items()))}, indent=2))
