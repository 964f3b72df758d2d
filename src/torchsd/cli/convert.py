"""``torchsd convert IN OUT --to single-file|diffusers [--dtype fp16]``: between a diffusers folder and an
original-layout single file, either way, without building the models."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    from ..runtime import parse_dtype

    p = subparsers.add_parser("convert", help="convert between a diffusers folder and a single .safetensors file",
                              description="Rewrite a model as a diffusers folder or as one .safetensors file in "
                                          "the original Stable Diffusion layout (which other tools load).")
    p.add_argument("input", type=Path, help="diffusers folder, or .safetensors/.ckpt single file")
    p.add_argument("output", type=Path, help="folder (diffusers) or .safetensors file (single-file)")
    p.add_argument("--to", dest="format", choices=["single-file", "diffusers"], default=None,
                   help="output format (default: single-file when OUTPUT ends in .safetensors, else diffusers)")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="fp32, fp16 or bf16 (default: keep the input's)")
    p.add_argument("--vae", type=Path, default=None, help="replace the model's VAE with this one (file or folder)")
    p.add_argument("--variant", default=None, help="diffusers folder weights variant: fp16 reads *.fp16.safetensors")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "eps", "v_prediction", "v"],
                   help="for single files whose type the tensors cannot reveal (SD 2 768 px models: v)")
    p.add_argument("--use-ema", action="store_true", help="take the U-Net's EMA weights (model_ema.*) from the input")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import convert_checkpoint

    options = {}
    if args.prediction_type is not None:
        options["prediction_type"] = args.prediction_type
    if args.use_ema:
        options["use_ema"] = True
    if args.input.is_dir() and options:
        raise ValueError("--prediction-type and --use-ema apply to single-file inputs; a diffusers folder "
                         "states its prediction type in scheduler/scheduler_config.json")
    config = convert_checkpoint(args.input, args.output, format=args.format, dtype=args.dtype, vae=args.vae,
                                variant=args.variant, **options)
    print(f"{args.output}  ({config.family.upper()}, {config.schedule.prediction_type.value})")
    return 0
