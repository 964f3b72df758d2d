"""Does the bundled ControlNet steer the bundled model? (figures for docs/controlnet.md and MODEL_CARD.md)

    PYTHONPATH=src python benchmarks/bundled_control.py [--controlnet bundled] [--prompts 50] [--sheet PATH]

The control image is the mask of a square at the bottom right (white on black, as the ControlNet was trained
on); the prompts ask for a square of a random colour on a random background *at the top left*. The shapes
reader of the bundled model's benchmark (``torchsd.training.evaluate``) reads each image's grid cell, colour
and background. Printed: how often the square lands where the mask puts it (bottom right) and where the words
put it (top left), with the ControlNet and without it (the same prompts and seeds), and the colour and
background adherence and how often the shape reads as a square. DDIM 30 steps, guidance 5, fp32, CPU.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

import torchsd
from torchsd.pipeline.features.control import ControlUnit
from torchsd.training.data import COLORS, ShapeSpec, render_shape
from torchsd.training.evaluate import read_shape_image
from torchsd.training.loop import save_grid


def prompts(n: int, position: str = "top left") -> list[ShapeSpec]:
    rng = random.Random(2027)
    specs = []
    for _ in range(n):
        color, background = rng.sample(list(COLORS), 2)
        specs.append(ShapeSpec("square", color, position, background))
    return specs


def run(sd, specs: list[ShapeSpec], control: list[ControlUnit], label: str) -> tuple[dict[str, float], list]:
    counts = {"bottom right": 0, "top left": 0, "square": 0, "color": 0, "background": 0}
    images = []
    for i, spec in enumerate(specs):
        image = sd.generate(spec.caption, steps=30, guidance_scale=5.0, sampler="ddim", seed=i,
                            control=control).images[0]
        reading = read_shape_image(image)
        counts["bottom right"] += reading.position == "bottom right"
        counts["top left"] += reading.position == "top left"
        counts["square"] += reading.shape == "square"
        counts["color"] += reading.color == spec.color
        counts["background"] += reading.background == spec.background
        images.append(image)
        if (i + 1) % 10 == 0:
            print(f"  {label}: {i + 1}/{len(specs)}", file=sys.stderr)
    return {k: v / len(specs) for k, v in counts.items()}, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--controlnet", default="bundled", help="default: the bundled ControlNet")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without the ControlNet")
    parser.add_argument("--sheet", type=Path, default=None, help="write the mask and the first 15 images here")
    args = parser.parse_args()
    sd = torchsd.load_pipeline(args.model, dtype=torch.float32)
    mask = render_shape(ShapeSpec("square", "white", "bottom right", "black"), 64, random.Random(0), mask=True)
    specs = prompts(args.prompts)
    unit = ControlUnit(image=mask, model=args.controlnet, weight=args.weight)
    with_control, images = run(sd, specs, [unit], "with the ControlNet")
    without = {} if args.no_baseline else run(sd, specs, [], "without")[0]
    print(f"{args.prompts} prompts 'a <colour> square at the top left on a <colour> background', mask: a square at "
          f"the bottom right; ControlNet {args.controlnet}, weight {args.weight:g}")
    print(f"{'':28} {'bottom right':>12} {'top left':>9} {'a square':>9} {'colour':>7} {'background':>10}")
    rows = [("with the ControlNet", with_control)] + ([("without (prompt alone)", without)] if without else [])
    for label, r in rows:
        print(f"{label:28} {r['bottom right']:12.2f} {r['top left']:9.2f} {r['square']:9.2f} {r['color']:7.2f} "
              f"{r['background']:10.2f}")
    if args.sheet:
        save_grid([mask] + images[:15], args.sheet, columns=8)
        print(f"wrote {args.sheet}")


if __name__ == "__main__":
    main()
