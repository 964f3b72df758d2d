"""``torchsd generate`` and ``torchsd img2img``, and the generation flags every drawing command takes:
the core ones here, each feature's from its module (``pipeline/features``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .flags import add_generation_arguments, load_model, request_from_args


def output_paths(output: Path | None, seeds: list[int]) -> list[Path]:
    if output is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return [Path("outputs") / f"{stamp}-{seed}.png" for seed in seeds]
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}") for i in range(len(seeds))]


def save_result(result, output: Path | None) -> list[Path]:
    from ..pipeline.infotext import save_png

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
    from .prompts_file import run_prompts_file

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
    from .prompts_file import add_prompts_arguments

    p = subparsers.add_parser("generate", help="text to image (one prompt, or many with --prompts FILE)")
    add_generation_arguments(p)
    add_prompts_arguments(p)
    p.set_defaults(handler=run_generate)

    p = subparsers.add_parser("img2img", help="image to image")
    p.add_argument("image", type=Path)
    add_generation_arguments(p)
    p.set_defaults(handler=lambda args: run_generation(args, init_image=args.image))
