"""AUTOMATIC1111-style commands: ``torchsd inpaint | outpaint | info``. The generation flags (LoRA,
variation seeds, hires fix, inpainting options …) come from the feature modules (``pipeline/features``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run_info(args: argparse.Namespace) -> int:
    from .flags import read_infotext

    text = read_infotext(args.image)
    if args.json:
        from ..pipeline.infotext import parse_infotext

        print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False))
    else:
        print(text)
    return 0


def run_inpaint(args: argparse.Namespace) -> int:
    from .generate import run_generation

    return run_generation(args, init_image=args.image, mask=args.mask_image)


def run_outpaint(args: argparse.Namespace) -> int:
    from ..images import open_image
    from ..pipeline.features.inpaint import outpaint_canvas
    from .generate import run_generation

    margins = {side: getattr(args, side) if getattr(args, side) is not None else args.pad
               for side in ("left", "right", "top", "bottom")}
    canvas, mask = outpaint_canvas(open_image(args.image, what="image"), **margins)
    return run_generation(args, init_image=canvas, mask=mask)


def add_parser(subparsers) -> None:
    from .flags import add_generation_arguments

    p = subparsers.add_parser("inpaint", help="repaint the white part of MASK in IMAGE")
    p.add_argument("image", type=Path)
    p.add_argument("mask_image", metavar="mask", type=Path,
                   help="white = repaint, black = keep (or a transparent PNG's alpha)")
    add_generation_arguments(p)
    p.set_defaults(handler=run_inpaint)

    p = subparsers.add_parser("outpaint", help="extend IMAGE beyond its borders")
    p.add_argument("image", type=Path)
    add_generation_arguments(p)
    p.add_argument("--pad", type=int, default=64, help="pixels to add on every side not given below")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=None)
    p.set_defaults(handler=run_outpaint, strength=1.0, inpainting_fill="fill")

    p = subparsers.add_parser("info", help="print the generation parameters stored in a PNG")
    p.add_argument("image", type=Path)
    p.add_argument("--json", action="store_true", help="as a JSON object of the parsed keys")
    p.set_defaults(handler=run_info)
