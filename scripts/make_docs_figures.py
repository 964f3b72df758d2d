"""Regenerate the figures of docs/how-it-works.md from the real code paths.

    python scripts/make_docs_figures.py                 # the bundled model (a tiny random one until it exists)
    python scripts/make_docs_figures.py --model PATH    # any diffusers folder or single file
    python scripts/make_docs_figures.py --random-tiny   # force the tiny random-weight model

Everything is seeded: the same model and arguments give the same figures. Writes docs/figures/*.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from torchsd import GenerationRequest, StableDiffusion, load_pipeline  # noqa: E402
from torchsd.checkpoints import bundled_model_path  # noqa: E402
from torchsd.config import ModelConfig  # noqa: E402
from torchsd.explain.report import explanation_sections, save_figures  # noqa: E402
from torchsd.explain.toy import run_toy  # noqa: E402
from torchsd.explain.toy_report import toy_sections  # noqa: E402
from torchsd.explain.trace import explain  # noqa: E402

# two objects, so that the cross-attention figure shows each colour word lighting up its own object
PROMPT = "a red circle at the top left and a blue triangle at the bottom right on a yellow background"
WORDS = ("red", "circle", "blue", "triangle", "yellow")  # the tokens whose attention maps are shown


def input_image(size: int) -> Image.Image:
    """The prompt, drawn: the autoencoder figure needs an image, and this one needs no file."""
    image = Image.new("RGB", (size, size), (240, 215, 40))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 16, size // 16, size * 5 // 16, size * 5 // 16), fill=(215, 35, 35))
    draw.polygon([(size * 13 // 16, size * 11 // 16), (size * 15 // 16, size * 15 // 16),
                  (size * 11 // 16, size * 15 // 16)], fill=(40, 70, 190))
    return image


def pick_model(args: argparse.Namespace) -> StableDiffusion:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model is not None:
        return load_pipeline(args.model, device=device, dtype=torch.float32)
    if not args.random_tiny and bundled_model_path().exists():
        return load_pipeline(None, device=device, dtype=torch.float32)
    print(f"note: using a tiny random-weight model ({'asked for' if args.random_tiny else 'no bundled model yet'}): "
          f"the pipeline figures show the mechanics, not a picture", file=sys.stderr)
    return StableDiffusion.from_config(ModelConfig.tiny(), seed=0, name="tiny-random").to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers folder or single file (default: the bundled model)")
    parser.add_argument("--random-tiny", action="store_true", help="use a tiny random-weight model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--toy-train-steps", type=int, default=3000)
    parser.add_argument("--skip-toy", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    if not args.skip_toy:
        toy = run_toy(train_steps=args.toy_train_steps, seed=0)
        for path in save_figures(toy_sections(toy), args.out):
            print(path)
        print(f"toy model: {time.perf_counter() - start:.0f} s")

    sd = pick_model(args)
    size = sd.config.sample_size
    # strength 1: sampling starts from (almost) pure noise, as text-to-image does, while the input image
    # still gives the autoencoder and forward-process figures something to show
    request = GenerationRequest(PROMPT, steps=args.steps, seed=0, width=size, height=size, guidance_scale=7.5,
                                init_image=input_image(size), strength=1.0)
    explanation = explain(sd, request, snapshots=6, words=WORDS)
    for path in save_figures(explanation_sections(explanation), args.out):
        print(path)
    print(f"{sd.name}: done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
