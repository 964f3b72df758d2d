"""``torchsd <command>``: each command is a module with ``add_parser(subparsers)`` and ``run(args)``.

Errors a user can fix (bad sizes, unknown samplers, unreadable files) print one line and exit with 2;
no output file is written unless the whole run succeeded.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from .runtime import add_runtime_arguments

# command modules, in the order `torchsd --help` lists them
COMMANDS = ["torchsd.cli"]
EXTRA_COMMANDS: list[str] = [
    "torchsd.checkpoints.cli",
    "torchsd.training.cli",
    "torchsd.cli_a1111",
    "torchsd.server.cli",
    "torchsd.explain.cli",
]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (WIDTHxHEIGHT); got {text!r}") from None
    return width, height


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype must be one of fp32, fp16, bf16; got {text!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="diffusers folder or .safetensors/.ckpt file (default: bundled model)")
    p.add_argument("--variant", default=None, help="diffusers folder weights variant: fp16 reads *.fp16.safetensors")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps … (default: cuda if available)")
    p.add_argument("--dtype", type=parse_dtype, default=None,
                   help="fp32, fp16 or bf16 (default: fp16 on GPU; bf16 on CPUs with native bf16, else fp32)")
    p.add_argument("--vae", type=Path, default=None, help="use this VAE instead of the model's (file or diffusers folder)")
    add_runtime_arguments(p)


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="(optional with --from IMAGE or --prompts FILE)")
    p.add_argument("--negative-prompt", "-n", default="")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", "--guidance-scale", dest="guidance_scale", type=float, default=7.5)
    p.add_argument("--sampler", default="ddim", help="e.g. ddim, euler_a, dpmpp_2m, 'DPM++ 2M Karras'")
    p.add_argument("--scheduler", default="automatic",
                   help="schedule type: automatic (the sampler's own), normal, karras, exponential, sgm_uniform, "
                        "lcm, leading, trailing, linspace")
    p.add_argument("--eta", type=float, default=None, help="noise of DDIM and the ancestral/SDE samplers "
                                                           "(default: 0 for DDIM, 1 for the others)")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    p.add_argument("--batch", type=int, default=1, dest="batch_size")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--clip-guidance-scale", type=float, default=0.0, help="CLIP guidance strength, e.g. 100 (0: off)")
    p.add_argument("--clip-model", default=None, help="CLIP for guidance: transformers CLIPModel folder, OpenCLIP "
                                                      "state dict or torchsd CLIP file (default: the model's own)")
    p.add_argument("--clip-cutouts", type=int, default=4, help="random crops CLIP sees per step (0: whole image)")
    p.add_argument("--clip-decoder", default="vae", choices=["vae", "linear"],
                   help="latents to pixels for guidance: the VAE decoder, or a fitted linear map (faster, coarser)")
    p.add_argument("--output", "-o", type=Path, default=None, help="PNG path (batches add -1, -2 …)")
    add_model_arguments(p)
    from .cli_a1111 import add_generation_extras

    add_generation_extras(p)


def load_model(args: argparse.Namespace):
    from .pipeline import load_pipeline
    from .runtime import apply_runtime, default_device, default_dtype, runtime_options_from_args

    options = runtime_options_from_args(args)  # validate before the (slow) load
    device = torch.device(args.device) if args.device else default_device()
    dtype = args.dtype or default_dtype(device)
    sd = apply_runtime(load_pipeline(args.model, device="cpu", dtype=dtype, vae=getattr(args, "vae", None),
                                     variant=args.variant),
                       options, device, dtype)
    from .cli_a1111 import configure_model

    configure_model(sd, args)  # LoRA and embedding folders
    return sd


def request_from_args(args: argparse.Namespace, **extra):
    from .pipeline import GenerationRequest

    from .cli_a1111 import extra_request_fields

    width, height = args.size if args.size else (None, None)
    fields = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=width, height=height, steps=args.steps,
        guidance_scale=args.guidance_scale, sampler=args.sampler, scheduler=args.scheduler, eta=args.eta,
        seed=args.seed, batch_size=args.batch_size, clip_skip=args.clip_skip, clip_guidance_scale=args.clip_guidance_scale,
        clip_model=args.clip_model, clip_cutouts=args.clip_cutouts, clip_decoder=args.clip_decoder, **extra)
    return GenerationRequest(**extra_request_fields(args, fields))


def output_paths(output: Path | None, seeds: list[int]) -> list[Path]:
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return [Path("outputs") / f"{stamp}-{seed}.png" for seed in seeds]
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}") for i in range(len(seeds))]


def save_result(result, output: Path | None) -> list[Path]:
    from .infotext import save_png

    paths = output_paths(output, result.seeds)
    for image, infotext, path in zip(result.images, result.infotexts, paths):
        save_png(image, path, infotext)
    return paths


def run_generation(args: argparse.Namespace, **extra) -> int:
    request = request_from_args(args, **extra)  # validate before the (slow) model load
    sd = load_model(args)
    result = sd.generate(request, progress=True)
    for path, seed in zip(save_result(result, args.output), result.seeds):
        print(f"{path}  (seed {seed})")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .batch import run_prompts_file

    if args.prompts is not None:
        if args.prompt is not None:
            raise ValueError("give either a prompt or --prompts FILE, not both")
        return run_prompts_file(args)
    if args.prompt is None and getattr(args, "from_image", None) is None:
        raise ValueError("give a PROMPT, or --from IMAGE to take it from a PNG's infotext, or --prompts FILE "
                         "(e.g. torchsd generate \"a red circle\")")
    return run_generation(args)


# --- the commands defined here ----------------------------------------------------------------------

def add_parser(subparsers) -> None:
    from .batch import add_prompts_arguments

    p = subparsers.add_parser("generate", help="text to image (one prompt, or many with --prompts FILE)")
    add_generation_arguments(p)
    add_prompts_arguments(p)
    p.set_defaults(handler=run_generate)

    p = subparsers.add_parser("img2img", help="image to image")
    p.add_argument("image", type=Path)
    add_generation_arguments(p)
    p.add_argument("--strength", type=float, default=0.75, help="0 keeps the image, 1 ignores it")
    p.set_defaults(handler=lambda args: run_generation(args, init_image=args.image, strength=args.strength))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchsd", description="Stable Diffusion from scratch on PyTorch")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS + EXTRA_COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"torchsd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("torchsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
