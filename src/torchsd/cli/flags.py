"""The generation flags every drawing command takes (the core ones here, each feature's from its module in
``pipeline/features``), ``--from IMAGE``, and the request and model they give."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..pipeline.features import FEATURES
from ..pipeline.features.base import size_argument
from ..runtime import add_model_arguments, load_from_args

CORE_FLAGS = ("prompt", "negative_prompt", "steps", "guidance_scale", "sampler", "scheduler", "eta", "seed",
              "batch_size", "clip_skip")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The core flags, every feature's flags (their ``dest`` is the request keyword), and ``--from``."""
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
    p.add_argument("--size", type=size_argument, default=None,
                   help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    p.add_argument("--batch", type=int, default=1, dest="batch_size")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--output", "-o", type=Path, default=None, help="PNG path (batches add -1, -2 …)")
    p.add_argument("--from", dest="from_image", type=Path, default=None, metavar="IMAGE",
                   help="take the prompt and settings from a PNG's infotext; flags set to other than their "
                        "defaults override them")
    add_model_arguments(p)
    for feature in FEATURES:
        feature.add_arguments(p.add_argument_group(f"{feature.name} ({type(feature).__module__.rsplit('.', 1)[-1]}"
                                                   f".py)"))
    p.set_defaults(generation_parser=p)


def load_model(args: argparse.Namespace):
    sd = load_from_args(args)
    for feature in FEATURES:
        feature.configure_model(sd, args)  # LoRA and embedding folders
    wanted = getattr(args, "from_model_hash", None)
    if wanted and sd.model_hash and wanted != sd.model_hash:
        print(f"torchsd: warning: {args.from_image} was made with model hash {wanted}, this model is "
              f"{sd.model_hash}; the picture will differ", file=sys.stderr)
    return sd


def request_from_args(args: argparse.Namespace, **extra):
    """The request of the flags (and of ``--from IMAGE``'s infotext, for what the flags leave at their
    defaults); ``extra``: keywords a command sets itself (an img2img command's image)."""
    from ..pipeline import GenerationRequest

    width, height = args.size if args.size else (None, None)
    fields = {name: getattr(args, name) for name in CORE_FLAGS}
    fields.update(width=width, height=height)
    for feature in FEATURES:
        fields.update(feature.from_arguments(args))
    fields.update(extra)
    if getattr(args, "from_image", None) is not None:
        fields.update(_from_infotext(args, extra))
    elif fields.get("prompt") is None:
        raise ValueError("give a PROMPT, or --from IMAGE to take it from a PNG's infotext")
    return GenerationRequest(**fields)


def _from_infotext(args: argparse.Namespace, extra: dict) -> dict:
    """The infotext's fields that no flag (nor the command) set to other than its default."""
    from ..pipeline.infotext import parse_infotext, request_fields

    text = read_infotext(args.from_image)
    stored = request_fields(text)
    args.from_model_hash = parse_infotext(text).get("Model hash")
    parser = args.generation_parser
    taken = {}
    for name, value in stored.items():
        if name in ("width", "height"):
            given = args.size is not None
        else:
            given = name in extra or (hasattr(args, name) and getattr(args, name) != parser.get_default(name))
        if not given:
            taken[name] = value
    return taken


def read_infotext(path: Path) -> str:
    from ..images import open_image
    from ..pipeline.infotext import read_png_infotext

    open_image(path, what="image")  # a clear error for a missing or unreadable file
    text = read_png_infotext(path)
    if not text:
        raise ValueError(f"{path} holds no generation parameters (no 'parameters' text chunk); "
                         f"it was not made by torchsd or AUTOMATIC1111, or its metadata was stripped")
    return text
