"""AUTOMATIC1111-style commands and flags: ``torchsd inpaint | outpaint | info``, and for every generation
command ``--lora``, ``--lora-dir``, ``--embeddings-dir``, variation seeds, hires fix and ``--from IMAGE``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# request field -> the generation flag's dest, for the fields a --from infotext may set
FLAG_OF_FIELD = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "guidance_scale": "guidance_scale",
    "sampler": "sampler", "eta": "eta", "seed": "seed", "clip_skip": "clip_skip", "subseed": "subseed",
    "subseed_strength": "subseed_strength", "seed_resize_from": "seed_resize_from", "hires": "hires",
    "hires_scale": "hires_scale", "hires_size": "hires_size", "hires_upscaler": "hires_upscaler",
    "hires_steps": "hires_steps", "hires_strength": "hires_strength", "strength": "strength",
    "mask_blur": "mask_blur",
}


def parse_lora(text: str) -> tuple[str, float]:
    """NAME_OR_PATH[:SCALE]; a path may itself hold colons, so only a numeric last part is a scale."""
    head, _, tail = text.rpartition(":")
    if head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def add_generation_extras(p: argparse.ArgumentParser) -> None:
    from .cli import parse_size

    g = p.add_argument_group("AUTOMATIC1111 features")
    g.add_argument("--from", dest="from_image", type=Path, default=None, metavar="IMAGE",
                   help="take the prompt and settings from a PNG's infotext; flags set to other than their "
                        "defaults override them")
    g.add_argument("--lora", action="append", default=[], type=parse_lora, metavar="NAME_OR_PATH[:SCALE]",
                   help="apply a LoRA (repeatable); <lora:name:scale> in the prompt works too")
    g.add_argument("--lora-dir", action="append", default=[], type=Path, help="folder of LoRA files (repeatable)")
    g.add_argument("--embeddings-dir", action="append", default=[], type=Path,
                   help="folder of textual-inversion embeddings, used by file name in prompts (repeatable)")
    g.add_argument("--subseed", type=int, default=None, help="variation seed (default: random when strength > 0)")
    g.add_argument("--subseed-strength", type=float, default=0.0, help="0 = the seed alone, 1 = the subseed alone")
    g.add_argument("--seed-resize-from", type=parse_size, default=None, metavar="WxH",
                   help="draw the seed's noise at this size and centre it, keeping a seed's layout across sizes")
    g.add_argument("--hires", action="store_true", help="hires fix: upscale and run a second pass")
    g.add_argument("--hires-scale", type=float, default=2.0)
    g.add_argument("--hires-size", type=parse_size, default=None, metavar="WxH", help="instead of --hires-scale")
    g.add_argument("--hires-upscaler", default="Latent", help="Latent, 'Latent (bicubic)', Lanczos, Nearest …")
    g.add_argument("--hires-steps", type=int, default=None, help="default: --steps")
    g.add_argument("--hires-strength", type=float, default=0.7, help="denoising strength of the second pass")
    p.set_defaults(generation_parser=p)


def extra_request_fields(args: argparse.Namespace, fields: dict) -> dict:
    """``fields`` (from the common flags) completed with this module's flags and ``--from``'s infotext."""
    for folder in args.lora_dir + args.embeddings_dir:  # fail before the (slow) model load
        if not folder.is_dir():
            raise ValueError(f"folder {str(folder)!r} does not exist (--lora-dir / --embeddings-dir)")
    fields = dict(fields)
    fields.update(loras=tuple(args.lora), subseed=args.subseed, subseed_strength=args.subseed_strength,
                  seed_resize_from=args.seed_resize_from, hires=args.hires, hires_scale=args.hires_scale,
                  hires_size=args.hires_size, hires_upscaler=args.hires_upscaler, hires_steps=args.hires_steps,
                  hires_strength=args.hires_strength)
    if args.from_image is None:
        if fields.get("prompt") is None:
            raise ValueError("give a PROMPT, or --from IMAGE to take it from a PNG's infotext")
        return fields
    from .infotext import parse_infotext, request_fields

    text = read_infotext(args.from_image)
    stored = request_fields(text)
    args.from_model_hash = parse_infotext(text).get("Model hash")
    parser = args.generation_parser
    for name, value in stored.items():
        dest = FLAG_OF_FIELD.get(name)
        given = dest is not None and getattr(args, dest, None) != parser.get_default(dest)
        if not given:
            fields[name] = value
    if "width" in stored and args.size is None:
        fields["width"], fields["height"] = stored["width"], stored["height"]
    return fields


def configure_model(sd, args: argparse.Namespace) -> None:
    for folder in getattr(args, "lora_dir", []):
        sd.loras.add_dir(folder)
    for folder in getattr(args, "embeddings_dir", []):
        sd.embeddings.add_dir(folder)
    wanted = getattr(args, "from_model_hash", None)
    if wanted and sd.model_hash and wanted != sd.model_hash:
        print(f"torchsd: warning: {args.from_image} was made with model hash {wanted}, this model is "
              f"{sd.model_hash}; the picture will differ", file=sys.stderr)


def read_infotext(path: Path) -> str:
    from .images import open_image
    from .infotext import read_png_infotext

    open_image(path, what="image")  # a clear error for a missing or unreadable file
    text = read_png_infotext(path)
    if not text:
        raise ValueError(f"{path} holds no generation parameters (no 'parameters' text chunk); "
                         f"it was not made by torchsd or AUTOMATIC1111, or its metadata was stripped")
    return text


# --- commands ----------------------------------------------------------------------------------------

def run_info(args: argparse.Namespace) -> int:
    text = read_infotext(args.image)
    if args.json:
        from .infotext import parse_infotext

        print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False))
    else:
        print(text)
    return 0


def run_inpaint(args: argparse.Namespace) -> int:
    from .cli import run_generation

    return run_generation(args, init_image=args.image, mask=args.mask, strength=args.strength,
                          mask_blur=args.mask_blur, mask_invert=args.invert_mask, inpainting_fill=args.fill)


def run_outpaint(args: argparse.Namespace) -> int:
    from .cli import run_generation
    from .images import open_image
    from .inpainting import outpaint_canvas

    margins = {side: getattr(args, side) if getattr(args, side) is not None else args.pad
               for side in ("left", "right", "top", "bottom")}
    canvas, mask = outpaint_canvas(open_image(args.image, what="image"), **margins)
    return run_generation(args, init_image=canvas, mask=mask, strength=args.strength, mask_blur=args.mask_blur,
                          inpainting_fill=args.fill)


def add_parser(subparsers) -> None:
    from .cli import add_generation_arguments
    from .inpainting import FILL_MODES

    def inpainting_flags(p: argparse.ArgumentParser, strength: float, fill: str) -> None:
        p.add_argument("--strength", type=float, default=strength, help="0 keeps the image, 1 ignores it")
        p.add_argument("--mask-blur", type=float, default=4.0, help="Gaussian blur of the mask, in pixels")
        p.add_argument("--fill", default=fill, choices=FILL_MODES, help="what the masked area starts from")

    p = subparsers.add_parser("inpaint", help="repaint the white part of MASK in IMAGE")
    p.add_argument("image", type=Path)
    p.add_argument("mask", type=Path, help="white = repaint, black = keep (or a transparent PNG's alpha)")
    add_generation_arguments(p)
    inpainting_flags(p, strength=0.75, fill="original")
    p.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    p.set_defaults(handler=run_inpaint)

    p = subparsers.add_parser("outpaint", help="extend IMAGE beyond its borders")
    p.add_argument("image", type=Path)
    add_generation_arguments(p)
    p.add_argument("--pad", type=int, default=64, help="pixels to add on every side not given below")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=None)
    inpainting_flags(p, strength=1.0, fill="fill")
    p.set_defaults(handler=run_outpaint)

    p = subparsers.add_parser("info", help="print the generation parameters stored in a PNG")
    p.add_argument("image", type=Path)
    p.add_argument("--json", action="store_true", help="as a JSON object of the parsed keys")
    p.set_defaults(handler=run_info)

