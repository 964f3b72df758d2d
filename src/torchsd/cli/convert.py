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
    p.add_argument("--text-encoder", dest="text_encoders", type=Path, action="append", default=[], metavar="FILE",
                   help="SD 3 / FLUX.1 single files: a text encoder file the model lacks (repeat the flag)")
    p.add_argument("--t5-tokenizer", type=Path, default=None, metavar="PATH",
                   help="SD 3 / FLUX.1 single files: T5's tokenizer.json (or a folder with one)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoints import convert_checkpoint
    from ..checkpoints.flow_pipeline import flow_family

    if flow_family(args.input) is not None:
        return convert_flow(args)
    if args.text_encoders or args.t5_tokenizer is not None:
        raise ValueError("--text-encoder and --t5-tokenizer are for SD 3 / FLUX.1 single files")

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


def convert_flow(args: argparse.Namespace) -> int:
    """An SD 3 / 3.5 or FLUX.1 model (single files, fp8 and GGUF dequantized) -> a diffusers folder."""
    import torch

    from ..pipeline.flow_model import load_flow_pipeline

    if args.format == "single-file" or (args.format is None and args.output.suffix in (".safetensors", ".ckpt")):
        raise ValueError(f"{args.input}: SD 3 / FLUX.1 models are written as diffusers folders; give a folder as "
                         f"OUTPUT (or --to diffusers)")
    if args.prediction_type is not None or args.use_ema:
        raise ValueError("--prediction-type and --use-ema are for SD 1/2 single files")
    if args.output.exists() and args.output.resolve() == args.input.resolve():
        raise ValueError(f"{args.output}: the output would overwrite the input; choose another path")
    # bfloat16 unless --dtype: what these models are published in (float32 would double a 12 B model)
    pipe = load_flow_pipeline(args.input, device="cpu", dtype=args.dtype or torch.bfloat16, variant=args.variant,
                              vae=args.vae, text_encoders=args.text_encoders, t5_tokenizer=args.t5_tokenizer)
    pipe.save(args.output, dtype=args.dtype)
    print(f"{args.output}  ({pipe.config.label}, diffusers folder)")
    return 0
