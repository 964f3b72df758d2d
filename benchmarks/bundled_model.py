"""Measure what the bundled model can do (numbers for MODEL_CARD.md).

    .venv/bin/python benchmarks/bundled_model.py [--model PATH] [--clip PATH] [--prompts 200]
        [--sheet docs/contact-sheet.png]

1. Prompt adherence, DDIM 30 steps, guidance 5, on three sets of random prompts: the `shapes` caption
   template, plain phrasing never trained on, and two-object scenes; a deterministic reader
   (torchsd.training.evaluate) finds the background colour and each object's colour, kind and grid cell, and
   counts objects.
2. Reconstruction: VAE PSNR on held-out shapes and emoji.
3. Emoji: top-1 CLIP retrieval of the prompt among 100 captions, for generated images.
4. A contact sheet of 64 prompts (shapes in each of the three sets, then emoji).
5. Speed: one 64x64 image at 30 steps from the command line, end to end.
"""

from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

import torchsd
from torchsd.checkpoints.clip import load_clip
from torchsd.training.data import EmojiDataset, ShapesDataset, random_shape_spec
from torchsd.training.evaluate import read_scene_image, read_shape_image
from torchsd.training.loop import save_grid
from torchsd.training.losses import psnr
from torchsd.training.scenes import Scene, phrase, random_scene


def prompt_sets(n: int) -> dict[str, list[tuple[str, tuple]]]:
    """(caption, the shapes it asks for) of each measured set: the original template, plain phrasing that
    training never used (``scenes.HELD_OUT_*``), and two-object scenes in the trained phrasings."""
    rng = random.Random(2026)
    template = [(spec.caption, (spec,)) for spec in (random_shape_spec(rng) for _ in range(n))]
    plain, two = [], []
    for _ in range(n):
        scene = Scene((random_shape_spec(rng),))
        plain.append((phrase(scene, rng, held_out=True), scene.objects))
    for _ in range(n):
        scene = random_scene(rng, 2)
        two.append((phrase(scene, rng), scene.objects))
    return {"own template": template, "plain phrasing (held out)": plain, "two objects": two}


def adherence(sd, name: str, prompts: list[tuple[str, tuple]]) -> dict[str, float]:
    """Per set: all attributes right (every object's colour, kind and cell, the background, nothing extra);
    per attribute for one-object sets; and how often more objects are drawn than were asked for."""
    counts = collections.Counter()
    for i, (caption, specs) in enumerate(prompts):
        image = sd.generate(caption, steps=30, guidance_scale=5.0, sampler="ddim", seed=i).images[0]
        reading = read_scene_image(image)
        counts["all right"] += reading.matches(specs)
        counts["more objects than asked"] += len(reading.objects) > len(specs)
        if len(specs) == 1:
            single = read_shape_image(image).matches(specs[0])
            counts.update({k: int(v) for k, v in single.items()})
        if (i + 1) % 50 == 0:
            print(f"  {name}: {i + 1}/{len(prompts)}", file=sys.stderr)
    return {f"{name}: {k}": v / len(prompts) for k, v in counts.items()}


@torch.no_grad()
def reconstruction(sd) -> dict[str, float]:
    out = {}
    for name, dataset in (("shapes", ShapesDataset(64, length=128, seed=10_001)),
                          ("emoji", EmojiDataset(64, length=128, seed=10_001))):
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        recon = sd.vae.decode(sd.vae.encode(images.to(sd.dtype)).mean).float()
        out[f"vae psnr {name}"] = psnr(recon, images)
    return out


@torch.no_grad()
def emoji_retrieval(sd, clip, n: int = 100) -> float:
    dataset = EmojiDataset(64, length=n, seed=10_002)
    captions = [dataset[i][1] for i in range(n)]
    images = torch.cat([torchsd.images.pil_to_tensor(sd.generate(c, steps=30, guidance_scale=5.0, seed=i).images[0])
                        for i, c in enumerate(captions)])
    ids = sd.tokenizer(captions)
    image = torch.nn.functional.normalize(clip.encode_image(clip.preprocess(images)), dim=-1)
    text = torch.nn.functional.normalize(clip.encode_text(ids), dim=-1)
    best = (image @ text.T).argmax(dim=1)
    return sum(captions[int(j)] == captions[i] for i, j in enumerate(best)) / n


def contact_sheet(sd, path: Path) -> None:
    """Rows of 8: the own template, plain phrasing (held out), two rows of two-object scenes, four of emoji."""
    rng = random.Random(64)
    emoji = EmojiDataset(64, length=32, seed=10_003)
    prompts = ([random_shape_spec(rng).caption for _ in range(8)]
               + [phrase(Scene((random_shape_spec(rng),)), rng, held_out=True) for _ in range(8)]
               + [phrase(random_scene(rng, 2), rng) for _ in range(16)] + [emoji[i][1] for i in range(32)])
    images = [sd.generate(p, steps=30, guidance_scale=5.0, seed=i).images[0] for i, p in enumerate(prompts)]
    save_grid(images, path, columns=8)
    (path.with_suffix(".txt")).write_text("\n".join(prompts) + "\n")


def cli_seconds(model: str | None) -> float:
    cmd = [sys.executable, "-m", "torchsd", "generate", "a red circle at the top left on a blue background",
           "--steps", "30", "--seed", "1", "--output", "/tmp/torchsd-bench.png"]
    if model:
        cmd += ["--model", model]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--clip", default=None, help="default: the bundled CLIP")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--sheet", type=Path, default=Path("docs/contact-sheet.png"))
    args = parser.parse_args()
    sd = torchsd.load_pipeline(args.model, dtype=torch.float32)
    clip = load_clip(args.clip) if args.clip else sd.clip  # the bundled model carries its CLIP
    if clip is None:
        parser.error("this model has no CLIP of its own: pass --clip PATH")
    results = {}
    t0 = time.perf_counter()
    for name, prompts in prompt_sets(args.prompts).items():
        results.update(adherence(sd, name, prompts))
    results["adherence seconds"] = time.perf_counter() - t0
    results.update(reconstruction(sd))
    results["emoji top-1 retrieval (100 captions)"] = emoji_retrieval(sd, clip)
    contact_sheet(sd, args.sheet)
    results["cli seconds, one 64x64 image, 30 steps"] = cli_seconds(args.model)
    for key, value in results.items():
        print(f"{key:55s} {value:.3f}")


if __name__ == "__main__":
    main()
