"""The diffusers folder format: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.

torchsd's U-Net and VAE use diffusers' module names except for a few renames, and the text encoder
uses transformers' names without the ``text_model.embeddings/encoder`` nesting. The mapping is a list
of substring rules; loading asserts the exact key set and every shape before anything is copied.

Folders are read as the hubs and the reference libraries leave them: weights in safetensors or pickles
(read with ``weights_only``), one file or shards with an index, plain or as a variant (``fp16``) chosen
per component as diffusers chooses; text encoders in transformers 4's layout (``text_model.`` nesting,
a ``position_ids`` buffer in old files) or 5's (flat); tokenizers in every layout transformers wrote.
Writing emits the layout that old and new versions both read (see ``write_folder``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import CLIPTextConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig
from .io import CheckpointError, has_variant, read_weights, save_safetensors

if TYPE_CHECKING:
    from ..text.tokenizer import CLIPTokenizer

# (ours, diffusers) substring pairs, applied in order
UNET_RULES = [(".to_out.", ".to_out.0."), (".ff.proj_in.", ".ff.net.0.proj."), (".ff.proj_out.", ".ff.net.2.")]
VAE_RULES = [(".to_out.", ".to_out.0.")]
TEXT_RULES = [("token_embedding.", "embeddings.token_embedding."),
              ("position_embedding.", "embeddings.position_embedding."),
              ("layers.", "encoder.layers.")]
TEXT_PREFIX = "text_model."  # transformers 4 nests the text tower under it; 5 saves CLIPTextModel flat
TEXT_POSITION_IDS = "embeddings.position_ids"  # a buffer transformers < 4.31 saved; torchsd computes it
TEXT_PROJECTION = "text_projection.weight"  # CLIPTextModelWithProjection's (both versions: never nested)


def _rename(key: str, rules: list[tuple[str, str]], reverse: bool = False) -> str:
    key = "." + key
    for ours, theirs in rules:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if src in key:
            key = key.replace(src, dst, 1)
    return key[1:]


def to_diffusers_keys(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """torchsd's names -> diffusers' (U-Net, VAE) or transformers 4's (text encoder, ``text_model.`` nested:
    transformers 5 reads that layout too, while 4 cannot read 5's flat one)."""
    if component == "text_encoder":
        return {(k if k == TEXT_PROJECTION else TEXT_PREFIX + _rename(k, TEXT_RULES)): v for k, v in state.items()}
    rules = UNET_RULES if component == "unet" else VAE_RULES
    return {_rename(k, rules): v for k, v in state.items()}


def from_diffusers_keys(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    if component == "text_encoder":
        return text_from_transformers_keys(state)
    rules = UNET_RULES if component == "unet" else VAE_RULES
    return {_rename(k, rules, reverse=True): v for k, v in state.items()}


def text_from_transformers_keys(state: dict[str, torch.Tensor],
                                source: str = "text encoder") -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel / CLIPTextModelWithProjection keys -> torchsd's, in either version's
    layout. ``text_projection.weight`` keeps its name (SD 1/2 do not use it; SDXL's second encoder does);
    the ``position_ids`` buffer is dropped. Unknown keys pass through so that ``load_into`` names them."""
    tower = [k for k in state if k != TEXT_PROJECTION]
    nested = [k for k in tower if k.startswith(TEXT_PREFIX)]
    if nested and len(nested) != len(tower):
        flat = next(k for k in tower if not k.startswith(TEXT_PREFIX))
        raise CheckpointError(f"{source}: mixes keys with and without the {TEXT_PREFIX!r} prefix ({nested[0]!r} and "
                              f"{flat!r}); a text encoder is saved in one layout or the other")
    out = {}
    for key, value in state.items():
        if key != TEXT_PROJECTION:
            key = key.removeprefix(TEXT_PREFIX) if nested else key
            if key == TEXT_POSITION_IDS:
                continue
            key = _rename(key, TEXT_RULES, reverse=True)
        out[key] = value
    return out


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str, *, dtype: torch.dtype | None = None,
              assign: bool = False) -> None:
    """Copy ``state`` into ``module`` after checking the exact key set and every shape. ``assign`` makes the
    module hold the given tensors (cast to ``dtype``, default the module's) instead of copying them, so a
    module built on the meta device is loaded without a second copy of the weights."""
    check_state(module, state, source)
    expected = module.state_dict()
    module.load_state_dict({k: v.to(dtype or expected[k].dtype) for k, v in state.items()}, strict=True,
                           assign=assign)
    on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{source}: {', '.join(on_meta[:3])} got no values (not in the state dict)")


def check_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``state`` must have exactly the keys of ``module`` and every shape (works on the meta device)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: keys do not match the model: {'; '.join(parts)}. The file is probably "
                              f"for a different architecture or config than the one it was loaded as.")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(expected[key].shape)}: the config does not match the weights")


# --- configs -------------------------------------------------------------------------------------

def unet_config_from_diffusers(cfg: dict, pooled_dim: int = 0) -> UNetConfig:
    """``pooled_dim``: the width of the pooled text vector (the second text encoder's projection) for a
    U-Net with SDXL's "text_time" added embedding; the rest of its input is micro-conditioning."""
    unsupported = {
        "class_embed_type": None, "encoder_hid_dim": None,
        "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "center_input_sample": False,
        "dual_cross_attention": False, "only_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    }
    for key, default in unsupported.items():
        value = cfg.get(key, default)
        if any(v != default for v in (value if isinstance(value, list) else [value])):
            raise CheckpointError(f"unet: {key}={cfg[key]!r} is not supported (SD 1.x, 2.x and XL are)")
    added = cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise CheckpointError(f"unet: addition_embed_type={added!r} is not supported (SDXL's 'text_time' is)")
    micro = {}
    if added == "text_time":
        dim = cfg.get("addition_time_embed_dim") or 256
        rest = cfg["projection_class_embeddings_input_dim"] - pooled_dim
        if pooled_dim <= 0 or rest <= 0 or rest % dim:
            raise CheckpointError(f"unet: projection_class_embeddings_input_dim "
                                  f"{cfg['projection_class_embeddings_input_dim']} is not the pooled text width "
                                  f"{pooled_dim} plus a whole number of {dim}-wide micro-conditions")
        micro = {"pooled_dim": pooled_dim, "micro_conditions": rest // dim, "micro_condition_dim": dim}
    widths = list(cfg["block_out_channels"])
    base = widths[0]
    if any(w % base for w in widths):
        raise CheckpointError(f"unet: block_out_channels {widths} are not multiples of the first")
    levels = len(widths)
    attention_levels = tuple(t.startswith("CrossAttn") for t in cfg["down_block_types"])
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers' historical naming
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = (depth,) * levels if isinstance(depth, int) else tuple(depth)
    if any(not isinstance(d, int) for d in depth):  # diffusers' per-block lists (SDXL-derived models)
        raise CheckpointError(f"unet: transformer_layers_per_block {depth} per block is not supported")
    # a level without attention has no transformer: diffusers' lists still hold a number there
    depth = tuple(d if a else 1 for d, a in zip(depth, attention_levels))
    # levels without attention do not tell the head width (SDXL lists 5 heads of 64 at its first, bare level)
    attended = [(w, h) for w, h, a in zip(widths, heads, attention_levels) if a] or list(zip(widths, heads))
    head_dims = {w // h for w, h in attended}
    if len(set(heads)) == 1:
        num_heads, head_dim = heads[0], None
    elif len(head_dims) == 1:
        num_heads, head_dim = None, head_dims.pop()
    else:
        raise CheckpointError(f"unet: head counts {heads} are neither fixed nor a fixed head width")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=cfg.get("layers_per_block", 2),
        attention_levels=attention_levels, num_heads=num_heads, head_dim=head_dim, transformer_depth=depth,
        mid_transformer_depth=_mid_depth(cfg),
        context_dim=cfg.get("cross_attention_dim", 768), use_linear_projection=cfg.get("use_linear_projection", False),
        norm_groups=cfg.get("norm_num_groups", 32), **micro)


def _mid_depth(cfg: dict) -> int:
    """diffusers builds the middle block with the last entry of transformer_layers_per_block."""
    given = cfg.get("transformer_layers_per_block", 1)
    return given if isinstance(given, int) else given[-1]


def unet_config_to_diffusers(c: UNetConfig, sample_size: int) -> dict:
    widths = [c.model_channels * m for m in c.channel_mult]
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": c.in_channels,
        "out_channels": c.out_channels, "block_out_channels": widths, "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": c.num_heads if c.num_heads is not None else [w // c.head_dim for w in widths],
        "cross_attention_dim": c.context_dim, "use_linear_projection": c.use_linear_projection,
        "norm_num_groups": c.norm_groups, "norm_eps": 1e-5,
        "transformer_layers_per_block": _diffusers_depth(c),
        "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "dual_cross_attention": False,
        "upcast_attention": False, "only_cross_attention": False, "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        **({"addition_embed_type": "text_time", "addition_time_embed_dim": c.micro_condition_dim,
            "projection_class_embeddings_input_dim": c.added_embed_dim} if c.added_embed_dim else {}),
    }


def _diffusers_depth(c: UNetConfig) -> int | list[int]:
    """One number where the levels with attention and the middle agree (SD 1/2, SDXL's refiner), else a list
    whose last entry diffusers also gives the middle block. Levels without attention take the middle's
    number: diffusers lists one for them but builds no transformer there."""
    depth = [d if a else c.mid_transformer_depth for d, a in zip(c.transformer_depth, c.attention_levels)]
    if len(set(depth)) == 1:
        return depth[0]
    if depth[-1] != c.mid_transformer_depth:
        raise CheckpointError(f"unet: diffusers gives the middle block the last level's transformer depth; "
                              f"this config has {c.mid_transformer_depth} against {depth[-1]}")
    return depth


def vae_config_from_diffusers(cfg: dict) -> VAEConfig:
    widths = list(cfg["block_out_channels"])
    base = widths[0]
    return VAEConfig(in_channels=cfg.get("in_channels", 3), latent_channels=cfg.get("latent_channels", 4),
                     base_channels=base, channel_mult=tuple(w // base for w in widths),
                     num_res_blocks=cfg.get("layers_per_block", 2), norm_groups=cfg.get("norm_num_groups", 32),
                     scaling_factor=cfg.get("scaling_factor", 0.18215),
                     shift_factor=cfg.get("shift_factor") or 0.0, use_quant_conv=_quant_conv(cfg))


def _quant_conv(cfg: dict) -> bool:
    both = (cfg.get("use_quant_conv", True), cfg.get("use_post_quant_conv", True))
    if both[0] != both[1]:
        raise CheckpointError(f"vae: use_quant_conv={both[0]} with use_post_quant_conv={both[1]} is not "
                              "supported (SD 1/2/XL have both convs, SD 3 and FLUX.1 neither)")
    return both[0]


def vae_config_to_diffusers(c: VAEConfig, sample_size: int) -> dict:
    n = len(c.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.in_channels,
        "latent_channels": c.latent_channels, "block_out_channels": [c.base_channels * m for m in c.channel_mult],
        "layers_per_block": c.num_res_blocks, "norm_num_groups": c.norm_groups, "scaling_factor": c.scaling_factor,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu", "sample_size": sample_size,
        **({} if c.use_quant_conv and not c.shift_factor else
           {"shift_factor": c.shift_factor, "use_quant_conv": c.use_quant_conv,
            "use_post_quant_conv": c.use_quant_conv}),
    }


def text_config_from_transformers(cfg: dict, pad_token_id: int, bos_token_id: int = 49406,
                                  eos_token_id: int = 49407) -> CLIPTextConfig:
    """The token ids come from the tokenizer's files: config.json's are often wrong (transformers 5 writes
    pad 1; old CLIP configs say bos 0, eos 2)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"text_encoder: activation {act!r} is not supported (quick_gelu or gelu)")
    return CLIPTextConfig(vocab_size=cfg.get("vocab_size", 49408), max_positions=cfg.get("max_position_embeddings", 77),
                          width=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                          num_heads=cfg["num_attention_heads"], ffn_dim=cfg["intermediate_size"], activation=act,
                          projection_dim=cfg.get("projection_dim", cfg["hidden_size"]), pad_token_id=pad_token_id,
                          bos_token_id=bos_token_id, eos_token_id=eos_token_id)


def text_config_to_transformers(c: CLIPTextConfig) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if c.with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_positions, "hidden_size": c.width, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "intermediate_size": c.ffn_dim, "hidden_act": c.activation,
        "projection_dim": c.projection_dim, "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0, "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": "float32",
    }


def schedule_config_from_diffusers(cfg: dict) -> ScheduleConfig:
    if cfg.get("trained_betas") is not None:
        raise CheckpointError("scheduler: trained_betas are not supported")
    return ScheduleConfig(
        num_train_timesteps=cfg.get("num_train_timesteps", 1000), beta_start=cfg.get("beta_start", 0.00085),
        beta_end=cfg.get("beta_end", 0.012), beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
        prediction_type=cfg.get("prediction_type", "epsilon"),
        timestep_spacing=cfg.get("timestep_spacing", "leading"), steps_offset=cfg.get("steps_offset", 0),
        set_alpha_to_one=cfg.get("set_alpha_to_one", True))


def schedule_config_to_diffusers(c: ScheduleConfig) -> dict:
    return {
        "_class_name": "DDIMScheduler", "num_train_timesteps": c.num_train_timesteps, "beta_start": c.beta_start,
        "beta_end": c.beta_end, "beta_schedule": c.beta_schedule.value, "prediction_type": c.prediction_type.value,
        "timestep_spacing": c.timestep_spacing.value, "steps_offset": c.steps_offset,
        "set_alpha_to_one": c.set_alpha_to_one, "clip_sample": False, "trained_betas": None,
    }


# --- whole folders -------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a diffusers folder needs model_index.json, unet/, vae/, "
                              f"text_encoder/, tokenizer/ and scheduler/") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


MODEL_COMPONENTS = ("unet", "vae", "text_encoder")  # the folders that hold weights (SD 1/2)


def folder_components(family: str) -> dict[str, str]:
    """torchsd's component -> the folder that holds it. SDXL's refiner keeps its one encoder, bigG, in
    ``text_encoder_2/`` (diffusers leaves ``text_encoder`` empty), as the base keeps its bigG."""
    return {"sd1": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"},
            "sd2": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"},
            "sdxl": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"},
            "sdxl_refiner": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder_2"}}[family]


def folder_family(index: dict) -> str:
    """sd1/sd2 are told apart later, by the text encoder; an SDXL pipeline names text_encoder_2, and the
    refiner names no first text encoder (``[null, null]`` or absent)."""
    def named(key: str) -> bool:
        value = index.get(key)
        return isinstance(value, list) and bool(value) and value[0] is not None

    if named("text_encoder_2"):
        return "sdxl" if named("text_encoder") else "sdxl_refiner"
    return "sd"


def component_variants(folder: Path, variant: str | None,
                       components: tuple[str, ...] = MODEL_COMPONENTS) -> dict[str, str | None]:
    """The variant to read each component folder in, as diffusers' ``from_pretrained(variant=...)`` decides:
    a component whose folder has files of the variant reads them, the others read their plain weights; when
    no component has it, that is an error. Without a variant every component reads its plain weights."""
    if variant is None:
        return dict.fromkeys(components)
    chosen = {name: variant if has_variant(folder / name, variant) else None for name in components}
    if not any(chosen.values()):
        raise CheckpointError(f"{folder}: no component has {variant!r} weights (such as unet/"
                              f"diffusion_pytorch_model.{variant}.safetensors); load it without a variant, or "
                              f"download the {variant} files")
    return chosen


def read_tokenizer(folder: Path) -> "CLIPTokenizer":
    from ..text.tokenizer import CLIPTokenizer as Tokenizer  # text/ is imported on use: loading stays light

    try:
        return Tokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(str(err)) from None


def read_folder(folder: str | Path, *, variant: str | None = None
                ) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], "CLIPTokenizer"]:
    """Config, per-component state dicts in torchsd's names, and the tokenizer of a diffusers folder.
    ``variant`` ("fp16"): read the weights files of that variant where a component has them."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    if "unet" not in index:
        raise CheckpointError(f"{folder}: model_index.json names no unet (is this a pipeline of another family? "
                              f"class {index.get('_class_name')!r})")
    kind = folder_family(index)
    # the refiner has only tokenizer_2; SDXL's tokenizers share one vocabulary and differ in the pad token,
    # which each text encoder's config records
    tokenizer = read_tokenizer(folder / ("tokenizer_2" if kind == "sdxl_refiner" else "tokenizer"))
    config = read_config(folder, tokenizer, kind)
    components = folder_components(config.family)
    variants = component_variants(folder, variant, tuple(components.values()))
    states = {name: from_diffusers_keys(read_weights(folder / sub, variants[sub]), "text_encoder"
                                        if name.startswith("text_encoder") else name)
              for name, sub in components.items()}
    for name, text in zip(("text_encoder", "text_encoder_2"), config.text_encoders):
        if not text.with_projection:  # SD 1/2 condition on hidden states: a saved projection is unused
            states[name].pop(TEXT_PROJECTION, None)
    return config, states, tokenizer


def read_config(folder: Path, tokenizer: "CLIPTokenizer", kind: str = "sd") -> ModelConfig:
    family = kind if kind != "sd" else None
    texts = {"sd": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
             "sdxl_refiner": ["text_encoder_2"]}[kind]
    paths = {name: folder / name / "config.json" for name in ["unet", "vae", *texts]}
    paths["scheduler"] = folder / "scheduler" / "scheduler_config.json"
    cfg = {name: _read_json(path) for name, path in paths.items()}
    text_configs = []
    for name in texts:
        pad = tokenizer.pad_token_id
        if name == "text_encoder_2":  # SDXL's tokenizer_2 pads with "!" (id 0), tokenizer with the end token
            pad = read_tokenizer(folder / "tokenizer_2").pad_token_id if (folder / "tokenizer_2").is_dir() else 0
        text = _parsed(paths[name], text_config_from_transformers, cfg[name], pad, tokenizer.bos_token_id,
                       tokenizer.eos_token_id)
        if name == "text_encoder_2":
            text = dataclasses.replace(text, with_projection=True)  # SDXL reads its pooled, projected output
        text_configs.append(text)
    pooled = text_configs[-1].projection_dim if family else 0
    unet = _parsed(paths["unet"], unet_config_from_diffusers, cfg["unet"], pooled)
    vae = _parsed(paths["vae"], vae_config_from_diffusers, cfg["vae"])
    schedule = _parsed(paths["scheduler"], schedule_config_from_diffusers, cfg["scheduler"])
    family = family or ("sd2" if text_configs[0].activation == "gelu" else "sd1")
    try:
        return ModelConfig(unet=unet, vae=vae, text=text_configs[0],
                           text_2=text_configs[1] if len(text_configs) > 1 else None, schedule=schedule,
                           family=family,
                           sample_size=int(cfg["unet"].get("sample_size", 64)) * 2 ** (len(vae.channel_mult) - 1))
    except ValueError as err:
        raise CheckpointError(f"{folder}: the components' configs do not make one model: {err}") from None


def _parsed(path: Path, parse, *args):
    """``parse(*args)``, with a missing or malformed entry reported against the config file it came from."""
    try:
        return parse(*args)
    except CheckpointError:
        raise
    except KeyError as err:
        raise CheckpointError(f"{path}: lacks the entry {err}, which every such config has") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a config torchsd can use: {err}") from None


def write_folder(folder: str | Path, config: ModelConfig, states: dict[str, dict[str, torch.Tensor]],
                 tokenizer: "CLIPTokenizer") -> None:
    """The folder diffusers' StableDiffusionPipeline (SD 1/2) or StableDiffusionXL(Img2Img)Pipeline would
    save: SDXL's second tokenizer is the same vocabulary padded as the second encoder's config says."""
    folder = Path(folder)
    latent_size = config.sample_size // config.vae.downscale_factor
    components = folder_components(config.family)
    configs = {"unet": unet_config_to_diffusers(config.unet, latent_size),
               "vae": vae_config_to_diffusers(config.vae, config.sample_size)}
    for name, text in zip(("text_encoder", "text_encoder_2"), config.text_encoders):
        configs[name] = text_config_to_transformers(text)
    for name, cfg in configs.items():
        sub = folder / components[name]
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "config.json").write_text(json.dumps(cfg, indent=2))
        text = name.startswith("text_encoder")
        filename = "model.safetensors" if text else "diffusion_pytorch_model.safetensors"
        save_safetensors(to_diffusers_keys(states[name], "text_encoder" if text else name), sub / filename,
                         metadata={"format": "pt"})
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(schedule_config_to_diffusers(config.schedule), indent=2))
    tokenizers = {"tokenizer": config.text.pad_token_id} if config.family in ("sd1", "sd2") else \
        {f"tokenizer{'_2' if sub == 'text_encoder_2' else ''}": text.pad_token_id
         for sub, text in zip([components[n] for n in ("text_encoder", "text_encoder_2") if n in components],
                              config.text_encoders)}
    for name, pad in tokenizers.items():
        _with_pad(tokenizer, pad).save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps(_model_index(config, components), indent=2))


def _with_pad(tokenizer: "CLIPTokenizer", pad_token_id: int) -> "CLIPTokenizer":
    import copy

    if tokenizer.pad_token_id == pad_token_id:
        return tokenizer
    other = copy.copy(tokenizer)
    other.pad_token_id = pad_token_id
    return other


def _model_index(config: ModelConfig, components: dict[str, str]) -> dict:
    if config.family in ("sd1", "sd2"):
        return {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False,
        }
    base = config.family == "sdxl"
    index = {
        # the refiner is an image-to-image model: diffusers loads it with the Img2Img pipeline
        "_class_name": "StableDiffusionXLPipeline" if base else "StableDiffusionXLImg2ImgPipeline",
        "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"] if base else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if base else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "feature_extractor": [None, None],
        "image_encoder": [None, None], "force_zeros_for_empty_prompt": base,
    }
    if not base:
        index["requires_aesthetics_score"] = True
    return index
