"""A separate autoencoder to swap in (``--vae`` / ``vae=``), as people swap VAEs: an original-layout file
(``vae-ft-mse-840000-ema-pruned.safetensors``, or a whole SD checkpoint, whose ``first_stage_model`` is
taken), a diffusers VAE folder (``config.json`` + weights), a whole diffusers pipeline folder (its
``vae/``), or a single file in diffusers' key names."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Mapping

import torch

from ..config import VAEConfig
from . import detect
from .diffusers import _read_json, from_diffusers_keys, vae_config_from_diffusers
from .io import CheckpointError, has_variant, load_state_dict, read_weights, safetensors_metadata

# diffusers' VAE attention names before 0.14, still in many published VAE files
LEGACY_ATTENTION = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))
IGNORED_PREFIXES = ("loss.", "model_ema.")


def _modern_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, new in LEGACY_ATTENTION:
            if f".attentions.0.{old}" in key:
                key = key.replace(f".attentions.0.{old}", f".attentions.0.{new}", 1)
                if value.ndim == 4:  # some files kept 1x1 convolutions here
                    value = value.flatten(1)
        out[key] = value
    return out


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in state if (m := regex.match(k))})


def config_from_diffusers_names(state: Mapping[str, torch.Tensor]) -> VAEConfig:
    """The config of a diffusers-named autoencoder that came without its config.json."""
    base, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = _count(state, r"encoder\.down_blocks\.(\d+)\.")
    mult = tuple(state[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] // base for i in range(levels))
    return VAEConfig(in_channels=in_channels, latent_channels=state["decoder.conv_in.weight"].shape[1],
                     base_channels=base, channel_mult=mult,
                     num_res_blocks=_count(state, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))


def read_vae(path: str | Path, variant: str | None = None) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """The autoencoder's config and state dict in torchsd's names. ``variant`` ("fp16") picks a diffusers
    folder's variant weights where it has them."""
    from .ldm import check_vae_keys, vae_from_original

    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "model_index.json").exists() else path
        config = vae_config_from_diffusers(_read_json(folder / "config.json"))
        # the rule of a pipeline's components: the variant's files where the folder has them, else the plain ones
        state = read_weights(folder, variant if variant is not None and has_variant(folder, variant) else None)
        return config, from_diffusers_keys(_modern_names(state), "vae")
    if path.suffix == ".safetensors" and safetensors_metadata(path).get("torchsd_component") == "vae":
        from .components import read_component

        (config,), state = read_component(path, "vae")  # written by `torchsd train vae`: config included
        return config, state
    tensors = load_state_dict(path)
    for prefix in (detect.VAE_PREFIX, "vae.", ""):
        state = {k[len(prefix):]: v for k, v in tensors.items()
                 if k.startswith(prefix) and not k[len(prefix):].startswith(IGNORED_PREFIXES)}
        if "encoder.conv_in.weight" in state:
            break
    else:
        raise CheckpointError(f"{path}: holds no autoencoder (no encoder.conv_in.weight, with or without a "
                              f"first_stage_model. prefix); give a VAE file or folder")
    vae_prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    state = {k: v for k, v in state.items() if k.startswith(vae_prefixes)}
    try:
        if any(k.startswith("encoder.down.") for k in state):
            config = detect.vae_config(state, prefix="")
            check_vae_keys(state, config, path)
            return config, vae_from_original(state, config)
        state = _modern_names(state)
        return config_from_diffusers_names(state), from_diffusers_keys(state, "vae")
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: not a KL autoencoder torchsd can read: {err}") from None


def swap_vae(model_vae: VAEConfig, new: VAEConfig, source: object) -> VAEConfig:
    """The swapped-in VAE must make the same latent space; the model's latent scale is kept."""
    if (new.latent_channels, new.downscale_factor) != (model_vae.latent_channels, model_vae.downscale_factor):
        raise CheckpointError(
            f"{source}: this VAE makes {new.latent_channels}-channel latents at 1/{new.downscale_factor} scale; the "
            f"model needs {model_vae.latent_channels} channels at 1/{model_vae.downscale_factor}. It belongs to a "
            f"different model family")
    return dataclasses.replace(new, scaling_factor=model_vae.scaling_factor)
