"""``torchsd train vae|clip|unet|lora|controlnet``: flags come from ``TrainConfig``'s fields."""

from __future__ import annotations

import argparse

from .config import TASKS, add_arguments, from_arguments, write_toml


def make_task(config, dist):
    if config.task == "vae":
        from .vae_task import VAETask
        return VAETask(config, dist)
    if config.task == "clip":
        from .clip_task import CLIPTask
        return CLIPTask(config, dist)
    if config.task == "unet":
        from .unet_task import UNetTask
        return UNetTask(config, dist)
    if config.task == "controlnet":
        from .controlnet_task import ControlNetTask
        return ControlNetTask(config, dist)
    from .lora import LoRATask
    return LoRATask(config, dist)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a VAE, CLIP, U-Net, LoRA or ControlNet (torchrun for several "
                                            "processes)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("task", choices=TASKS)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    add_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .loop import run as train

    config = from_arguments(args.task, args)
    if args.write_config is not None:
        write_toml(config, args.write_config)
        print(f"wrote {args.write_config}")
        return 0
    train(config, make_task, device=args.device)
    return 0
