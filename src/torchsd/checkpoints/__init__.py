"""Loading and saving whole pipelines in every format torchsd reads and writes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .io import CheckpointError

if TYPE_CHECKING:
    from ..pipeline import StableDiffusion

BUNDLED_MODEL = "torchsd-shapes.safetensors"
BUNDLED_CLIP = "torchsd-shapes-clip.safetensors"  # the joint CLIP whose text tower the bundled model uses


def bundled_model_path() -> Path:
    return Path(str(resources.files("torchsd.assets").joinpath(BUNDLED_MODEL)))


def bundled_clip_path() -> Path:
    return Path(str(resources.files("torchsd.assets").joinpath(BUNDLED_CLIP)))


def load_pipeline(path: str | Path | None = None, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, **options) -> "StableDiffusion":
    from ..models.clip import CLIPTextModel
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL
    from ..pipeline import StableDiffusion
    from .diffusers import load_into, read_folder

    if path is None:
        path = bundled_model_path()
        if not path.exists():
            raise CheckpointError(f"the bundled model {path} is missing from this installation; "
                                  f"reinstall torchsd or pass a model path")
    path = Path(path)
    if path.is_dir():
        if options:
            raise TypeError(f"unexpected options for a diffusers folder: {', '.join(options)}")
        config, states, tokenizer = read_folder(path)
        name = path.name
    elif path.is_file():
        from .ldm import read_single_file

        config, states, tokenizer = read_single_file(path, **options)
        name = path.stem
    else:
        raise CheckpointError(f"{path}: no such file or folder; give a diffusers folder or a "
                              f".safetensors/.ckpt single file")

    with torch.device("meta"):
        unet, vae, text = UNet(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text)
    for module, key in ((unet, "unet"), (vae, "vae"), (text, "text_encoder")):
        module.to_empty(device="cpu")
        load_into(module, states.pop(key), f"{path} ({key})")
    sd = StableDiffusion(config, unet, vae, text, tokenizer, name=name, source=path if path.is_file() else None)
    return sd.to(device=device, dtype=dtype)


def model_states(sd: "StableDiffusion", dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    def cast(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}

    return {"unet": cast(sd.unet.state_dict()), "vae": cast(sd.vae.state_dict()),
            "text_encoder": cast(sd.text_encoder.state_dict())}


def save_pipeline(sd: "StableDiffusion", path: str | Path, *, format: str = "diffusers",
                  dtype: torch.dtype | None = None) -> None:
    if format == "diffusers":
        from .diffusers import write_folder

        write_folder(path, sd.config, model_states(sd, dtype), sd.tokenizer)
    elif format == "single-file":
        from .ldm import write_single_file

        write_single_file(path, sd.config, model_states(sd, dtype))
    else:
        raise ValueError(f"format must be 'diffusers' or 'single-file'; got {format!r}")
