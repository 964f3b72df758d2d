"""``torchsd explain PROMPT [--image IMAGE] [--out report.png|report.html]`` and ``torchsd explain --toy``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..pipeline.features.base import size_argument as parse_size
from ..runtime import add_model_arguments, load_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "explain", help="show every stage of one generation (or, with --toy, diffusion on a 2-D distribution)",
        description="Run one generation and draw what each stage did: the autoencoder, forward noising, the "
                    "sampler's x0 predictions, cross-attention per prompt token (SD 3 / FLUX.1: the joint attention's "
                    "image-to-text part), guidance and the final decode.")
    p.add_argument("prompt", nargs="?", help="the prompt to explain (not used with --toy)")
    p.add_argument("--toy", action="store_true",
                   help="train a small diffusion model on a 2-D age/height distribution and plot what it learned")
    p.add_argument("--out", "-o", type=Path, default=None,
                   help="report path ending in .png or .html (default: explain.png or explain-toy.png)")
    p.add_argument("--image", type=Path, default=None, help="an input image: shows its latents and runs image-to-image")
    p.add_argument("--strength", type=float, default=0.75, help="with --image: 0 keeps the image, 1 ignores it")
    p.add_argument("--negative-prompt", "-n", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", "--guidance-scale", dest="guidance_scale", type=float, default=7.5)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    p.add_argument("--snapshots", type=int, default=6, help="how many sampler steps to decode and show")
    p.add_argument("--words", default=None, metavar="W1,W2",
                   help="the prompt's words whose cross-attention maps to show (default: its first six tokens)")
    p.add_argument("--train-steps", type=int, default=2000, help="with --toy: optimiser steps")
    p.add_argument("--control", type=Path, default=None, metavar="IMAGE",
                   help="a control unit's image (used as given): adds a figure of what the ControlNet's residuals "
                        "or the T2I-Adapter's features add to the U-Net per level")
    p.add_argument("--control-model", default=None, metavar="FILE",
                   help="with --control: the ControlNet or T2I-Adapter file or folder (bundled: the bundled model's "
                        "ControlNet)")
    p.add_argument("--control-weight", type=float, default=1.0)
    add_model_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.toy:
        if args.prompt or args.image:
            raise ValueError("--toy trains its own 2-D model and takes no prompt or --image; drop them or drop --toy")
        return run_toy(args)
    if not args.prompt:
        raise ValueError("give a prompt to explain, e.g. torchsd explain \"a red circle\" (or --toy for the 2-D demo)")
    from ..pipeline import GenerationRequest
    from .report import check_report_path, explanation_sections, write_report
    from .trace import explain

    out = check_report_path(args.out or Path("explain.png"))
    width, height = args.size if args.size else (None, None)
    control = ()
    if args.control is not None or args.control_model is not None:
        from ..pipeline.features.control import ControlUnit

        if args.control is None or args.control_model is None:
            raise ValueError("a control unit needs both --control IMAGE and --control-model FILE")
        control = (ControlUnit(image=args.control, model=args.control_model, weight=args.control_weight),)
    request = GenerationRequest(  # validated before the (slow) model load
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=width, height=height, steps=args.steps,
        guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed, init_image=args.image,
        strength=args.strength, control=control)
    if args.snapshots < 1:
        raise ValueError(f"--snapshots must be at least 1; got {args.snapshots}")
    words = tuple(w.strip() for w in args.words.split(",") if w.strip()) if args.words is not None else None
    if words == ():
        raise ValueError("--words needs at least one of the prompt's words, comma-separated: --words red,blue")
    sd = load_from_args(args)
    start = time.perf_counter()
    if hasattr(sd, "transformer"):  # SD 3 / FLUX.1: joint attention in place of cross-attention
        from .flow_trace import explain_flow

        if control:
            raise ValueError(f"{sd.config.label}: ControlNet units are not available for flow models; drop --control")
        if words:
            raise ValueError(f"{sd.config.label}: --words picks U-Net cross-attention maps; drop it for flow models")
        explanation = explain_flow(sd, request, snapshots=args.snapshots)
    else:
        explanation = explain(sd, request, snapshots=args.snapshots, words=words)
    write_report(explanation_sections(explanation), out, f"torchsd explain: {args.prompt}")
    print(f"{out}  ({sd.name}, seed {explanation.result.seeds[0]}, {time.perf_counter() - start:.1f} s)")
    return 0


def run_toy(args: argparse.Namespace) -> int:
    from .report import check_report_path, write_report
    from .toy import run_toy as train_and_sample
    from .toy_report import toy_sections

    out = check_report_path(args.out or Path("explain-toy.png"))
    if args.train_steps < 1:
        raise ValueError(f"--train-steps must be at least 1; got {args.train_steps}")
    start = time.perf_counter()
    toy = train_and_sample(train_steps=args.train_steps, seed=args.seed)
    truth, samples = toy.distribution.moments(), toy.samples
    print(f"trained {args.train_steps} steps in {time.perf_counter() - start:.1f} s; "
          f"final loss {sum(toy.model.losses[-100:]) / len(toy.model.losses[-100:]):.3f}")
    for i, name in enumerate(("age", "height")):
        print(f"  {name}: mean {samples[:, i].mean():.2f} (truth {truth[f'{name}_mean']:.2f}), "
              f"std {samples[:, i].std():.2f} (truth {truth[f'{name}_std']:.2f})")
    write_report(toy_sections(toy), out, "torchsd explain --toy: diffusion on a 2-D joint distribution")
    print(f"{out}  ({time.perf_counter() - start:.1f} s)")
    return 0
