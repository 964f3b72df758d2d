"""Loading and saving whole pipelines in every format torchsd reads and writes."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .io import CheckpointError

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..models.clip import CLIP

BUNDLED_MODEL = "torchsd-shapes.safetensors"
BUNDLED_CLIP = "torchsd-shapes-clip.safetensors"  # the joint CLIP whose text tower the bundled model uses
BUNDLED_CONTROLNET = "torchsd-shapes-controlnet.safetensors"  # its ControlNet: the shape's mask as control


def bundled_model_path() -> Path:
    return Path(str(resources.files("torchsd.assets").joinpath(BUNDLED_MODEL)))


def bundled_clip_path() -> Path:
    return Path(str(resources.files("torchsd.assets").joinpath(BUNDLED_CLIP)))


def bundled_controlnet_path() -> Path:
    return Path(str(resources.files("torchsd.assets").joinpath(BUNDLED_CONTROLNET)))


def bundled_clip(text_encoder) -> "CLIP":
    """The bundled joint CLIP. Its file holds the image tower, both projections and the temperature; the
    text tower is the pipeline's own text encoder (the same weights), so it is shipped once."""
    import json

    from ..config import CLIPVisionConfig
    from ..models.clip import CLIP
    from .io import load_state_dict, safetensors_metadata

    path = bundled_clip_path()
    vision = CLIPVisionConfig(**json.loads(safetensors_metadata(path)["torchsd_clip_vision"]))
    clip = CLIP(text_encoder.config, vision)
    clip.text = text_encoder
    state = load_state_dict(path)
    expected = {k: v.shape for k, v in clip.state_dict().items() if not k.startswith("text.")}
    if {k: v.shape for k, v in state.items()} != expected:
        raise CheckpointError(f"{path}: the bundled CLIP does not fit the bundled model; reinstall torchsd")
    clip.load_state_dict(state, strict=False)
    return clip.eval().requires_grad_(False).to(next(text_encoder.parameters()).device)


def write_bundled_clip(clip: "CLIP", path: str | Path) -> None:
    """The counterpart of ``bundled_clip``: everything but the text tower, in fp16."""
    import json

    from .io import save_safetensors

    state = {k: v.half() for k, v in clip.state_dict().items() if not k.startswith("text.")}
    save_safetensors(state, path, metadata={"torchsd_clip_vision": json.dumps(dataclasses.asdict(clip.vision.config))})


def read_checkpoint(path: str | Path | None = None, *, vae: str | Path | None = None, variant: str | None = None,
                    **options):
    """Config, {"unet", "vae", "text_encoder"[, "text_encoder_2"]} state dicts in torchsd's names (tensors as
    stored, memory-mapped), tokenizer and resolved path of a model in any format torchsd reads. ``options`` for single
    files: ``use_ema``, ``prediction_type`` (see ``ldm.read_single_file``). ``vae``: a separate
    autoencoder to use instead of the model's (see ``vae.read_vae``). ``variant`` ("fp16"): a diffusers
    folder's variant weights, as diffusers' ``from_pretrained(variant=...)`` reads them (see
    ``diffusers.component_variants``)."""
    from .diffusers import read_folder

    if path is None:
        path = bundled_model_path()
        if not path.exists():
            raise CheckpointError(f"the bundled model {path} is missing from this installation; "
                                  f"reinstall torchsd or pass a model path")
    path = Path(path)
    if path.is_dir():
        if options:
            raise TypeError(f"unexpected options for a diffusers folder: {', '.join(options)}")
        config, states, tokenizer = read_folder(path, variant=variant)
    elif path.is_file():
        from .ldm import read_single_file

        if variant is not None:
            raise CheckpointError(f"{path}: variant={variant!r} selects files in a diffusers folder; a single file "
                                  f"has none: load it without a variant")
        config, states, tokenizer = read_single_file(path, **options)
    else:
        raise CheckpointError(f"{path}: no such file or folder; give a diffusers folder or a "
                              f".safetensors/.ckpt single file")
    if vae is not None:
        from .vae import read_vae, swap_vae

        vae_config, states["vae"] = read_vae(vae, variant)
        config = dataclasses.replace(config, vae=swap_vae(config.vae, vae_config, vae))
    return config, states, tokenizer, path


@dataclasses.dataclass
class LoadedModel:
    """The networks and tokenizer of a model file or folder, ready to run (``pipeline`` wraps them)."""

    config: "ModelConfig"
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    name: str
    source: Path | None  # the single file, for its hash; None for a folder
    clip: "CLIP | None" = None  # a joint CLIP that comes with the model (the bundled one's)
    text_encoder_2: torch.nn.Module | None = None  # SDXL base's OpenCLIP bigG


def load_model(path: str | Path | None = None, *, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, vae: str | Path | None = None, variant: str | None = None,
               **options) -> LoadedModel:
    """The networks of a model; see ``read_checkpoint`` for ``vae``, ``variant`` and ``options``."""
    from .diffusers import load_into

    config, states, tokenizer, path = read_checkpoint(path, vae=vae, variant=variant, **options)
    # the modules take the (memory-mapped) file tensors themselves: no second copy of the weights
    models = _meta_models(config)
    for key, module in models.items():
        load_into(module, states.pop(key), f"{path} ({key})", dtype=dtype, assign=True)
        module.to(device=device, dtype=dtype)
    text = models["text_encoder"]
    loaded = LoadedModel(config, models["unet"], models["vae"], text, tokenizer,
                         name=path.stem if path.is_file() else path.name, source=path if path.is_file() else None,
                         text_encoder_2=models.get("text_encoder_2"))
    if path == bundled_model_path() and bundled_clip_path().exists():
        loaded.clip = bundled_clip(text)  # the default CLIP for CLIP guidance with this model
    return loaded


TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")  # in the order of ModelConfig.text_encoders


def _meta_models(config: "ModelConfig") -> dict[str, torch.nn.Module]:
    """The networks ``config`` describes, on the meta device, by component name."""
    from ..models.clip import CLIPTextModel
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL

    with torch.device("meta"):
        return {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae)} | \
            {name: CLIPTextModel(text) for name, text in zip(TEXT_COMPONENTS, config.text_encoders)}


def convert_checkpoint(source: str | Path, target: str | Path, *, format: str | None = None,
                       dtype: torch.dtype | None = None, vae: str | Path | None = None, **options) -> "ModelConfig":
    """Rewrite a model in the other format without building it: tensors are renamed, checked against the
    model's key set and shapes, cast to ``dtype`` (default: kept as stored) and written. ``format`` is
    "single-file" or "diffusers" (default: single-file when ``target`` ends in .safetensors)."""
    from .diffusers import check_state

    target = Path(target)
    format = format or ("single-file" if target.suffix in (".safetensors", ".ckpt") else "diffusers")
    if format not in ("diffusers", "single-file"):
        raise ValueError(f"format must be 'diffusers' or 'single-file'; got {format!r}")
    if target.exists() and source is not None and target.resolve() == Path(source).resolve():
        raise CheckpointError(f"{target}: the output would overwrite the input; choose another path")
    config, states, tokenizer, source = read_checkpoint(source, vae=vae, **options)
    for key, module in _meta_models(config).items():
        check_state(module, states[key], f"{source} ({key})")
    states = {name: _cast(state, dtype) for name, state in states.items()}
    _write(target, format, config, states, tokenizer)
    return config


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}


def _write(path: str | Path, format: str, config: "ModelConfig", states: dict[str, dict[str, torch.Tensor]],
           tokenizer) -> None:
    if format == "diffusers":
        from .diffusers import write_folder

        write_folder(path, config, states, tokenizer)
    elif format == "single-file":
        from .ldm import write_single_file

        write_single_file(path, config, states)
    else:
        raise ValueError(f"format must be 'diffusers' or 'single-file'; got {format!r}")


def model_states(sd, dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    states = {"unet": _cast(sd.unet.state_dict(), dtype), "vae": _cast(sd.vae.state_dict(), dtype),
              "text_encoder": _cast(sd.text_encoder.state_dict(), dtype)}
    if getattr(sd, "text_encoder_2", None) is not None:
        states["text_encoder_2"] = _cast(sd.text_encoder_2.state_dict(), dtype)
    return states


def save_pipeline(sd, path: str | Path, *, format: str = "diffusers",
                  dtype: torch.dtype | None = None) -> None:
    """Write ``sd`` (anything with config, unet, vae, text_encoder and tokenizer) in ``format``."""
    _write(path, format, sd.config, model_states(sd, dtype), sd.tokenizer)
