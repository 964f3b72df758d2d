"""``TrainConfig``: every training option in one frozen dataclass.

The command-line flags and the TOML file are both generated from the fields below, so an option is
declared once. ``torchsd train unet --write-config run.toml`` writes a complete file to edit;
``torchsd train unet --config run.toml --steps 500`` reads it, flags taking precedence.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_type_hints

TASKS = ("vae", "clip", "unet", "lora", "controlnet")
PRESETS = ("bundled", "tiny")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "unet"
    data: str = "shapes"  # shapes, emoji, shapes+emoji, a folder, a .jsonl/.csv manifest or .tar shards
    dataset_size: int = 20000  # items drawn from procedural datasets (and cached as latents)
    resolution: int = 64
    output: str = "runs/train"
    preset: str = "bundled"  # network sizes for models trained from scratch
    steps: int = 2000
    batch_size: int = 32  # global batch (split across DDP ranks)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay_steps: int = 0  # the lr falls linearly to 0 over the last N steps (warmup-stable-decay); 0: constant
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # "no" or "bf16" (autocast)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard weights, gradients and optimizer state across processes (FSDP2) instead of DDP
    checkpoint_every: int = 500
    sample_every: int = 500  # 0: no sample grids
    log_every: int = 10
    resume: bool = False
    # frozen parts and starting points
    # a pipeline (folder or single file, "bundled": the bundled model): its VAE and text encoder (unet, lora),
    # LoRA's base, the model a ControlNet steers
    model: str = ""
    vae: str = ""  # a VAE trained by `torchsd train vae` (for unet from scratch)
    clip: str = ""  # a CLIP trained by `torchsd train clip` (unet from scratch; clip: the one to fine-tune, or bundled)
    # U-Net
    prediction_type: str = "epsilon"
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # 0 disables min-SNR weighting
    ema_decay: float = 0.999  # 0 disables EMA
    text_encoder_lr: float = 0.0  # > 0: the text encoder is fine-tuned too, with this lr (the same schedule)
    cache_latents: bool = True
    # VAE
    kl_weight: float = 1e-6
    disc_start: int = 0  # step at which the patch discriminator joins; 0 = never
    disc_weight: float = 0.1
    decoder_only: bool = False  # fine-tune only the decoder of --vae (the latent space stays as it is)
    # LoRA
    lora_rank: int = 4
    lora_alpha: float = 4.0
    # ControlNet
    position_noise: float = 0.0  # shapes: the fraction of captions naming a random cell (the control decides where)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}")
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be a number of steps, or 0 for no sample grids; "
                             f"got {self.sample_every}")
        for name in ("steps", "batch_size", "grad_accum", "resolution", "checkpoint_every",
                     "log_every", "dataset_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8; got {self.resolution}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16'; got {self.mixed_precision!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction'; got {self.prediction_type!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1); got {self.caption_dropout}")
        if not 0 <= self.position_noise <= 1:
            raise ValueError(f"position_noise must be in [0, 1]; got {self.position_noise}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if not 0 <= self.decay_steps <= self.steps:
            raise ValueError(f"decay_steps must be between 0 and steps ({self.steps}); got {self.decay_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive; got {self.lr}")
        if self.text_encoder_lr < 0:
            raise ValueError(f"text_encoder_lr must be 0 (the text encoder stays frozen) or positive; "
                             f"got {self.text_encoder_lr}")
        if self.text_encoder_lr and self.task != "unet":
            raise ValueError(f"--text-encoder-lr fine-tunes the text encoder beside the U-Net (task unet); the "
                             f"{self.task} task keeps it frozen: drop the flag")
        if self.text_encoder_lr and self.fsdp:
            raise ValueError("--text-encoder-lr trains with DDP: drop --fsdp")
        if self.decoder_only and not self.vae:
            raise ValueError("--decoder-only fine-tunes an existing autoencoder: give it with --vae PATH")
        if self.fsdp and self.task not in ("unet", "lora"):
            raise ValueError(f"--fsdp shards a U-Net (tasks unet and lora); the {self.task} task trains with DDP: "
                             f"drop --fsdp")
        if self.task == "lora" and not self.model:
            raise ValueError("LoRA training needs a base model: --model PATH")
        if self.task == "controlnet" and not self.model:
            raise ValueError("ControlNet training needs the model it steers: --model PATH (bundled: the bundled "
                             "model)")
        if self.task == "unet" and not self.model and not (self.vae and self.clip):
            raise ValueError("U-Net training needs a frozen VAE and text encoder: --model PIPELINE, or "
                             "--vae VAE.safetensors --clip CLIP.safetensors from `torchsd train vae|clip`")

    @property
    def output_dir(self) -> Path:
        return Path(self.output)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--min-snr-gamma``); booleans as ``--flag/--no-flag``. Defaults are None so
    that only flags given on the command line override a TOML file."""
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "task":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=kind, default=None, help=f"default: {f.default!r}")
    parser.add_argument("--config", type=Path, default=None, help="a TOML file of these options")
    parser.add_argument("--write-config", type=Path, default=None, help="write the resolved options as TOML and exit")


def from_arguments(task: str, args: argparse.Namespace) -> TrainConfig:
    values: dict = {}
    if args.config is not None:
        values.update(read_toml(args.config))
    values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig)
                   if f.name != "task" and getattr(args, f.name, None) is not None})
    values["task"] = task
    return TrainConfig(**values)


def read_toml(path: Path) -> dict:
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"cannot read training config {path}: {err}") from None
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown options {', '.join(unknown)}")
    return data


def write_toml(config: TrainConfig, path: Path) -> None:
    lines = []
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            lines.append(f"{key} = {_toml_string(str(value))}")
    Path(path).write_text("\n".join(lines) + "\n")


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
