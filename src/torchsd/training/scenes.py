"""The ``scenes`` dataset: the pictures of ``shapes`` captioned the ways people write them, and pictures of two
objects, each in its own grid cell.

The first bundled model only ever read one caption template ("a red circle at the top left on a blue background"),
so "at the top" fell between "top left" and "top right" and it drew two copies. Here each grid cell has several
names, the sentence has several frames, and one picture in two holds two shapes of different colours. Some
names and frames are kept out of training (``HELD_OUT_CELL_NAMES``, ``HELD_OUT_FRAMES``) so that a benchmark
can ask in words the model never read; ``phrase(..., held_out=True)`` writes those.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ..images import pil_to_tensor
from .shapes import COLORS, POSITIONS, SHAPES, SUPERSAMPLE, ShapeSpec, draw_shape, random_shape_spec, with_article

# where a shape is, as people write it; the first name of each is the original template's
CELL_NAMES: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner", "at the upper left", "in the top left"),
    "top center": ("at the top center", "at the top", "in the top middle", "at the upper middle"),
    "top right": ("at the top right", "in the top right corner", "at the upper right", "in the top right"),
    "center left": ("at the center left", "on the left", "at the left", "at the middle left"),
    "center": ("in the center", "at the center", "in the centre", "at the middle"),
    "center right": ("at the center right", "on the right", "at the right", "at the middle right"),
    "bottom left": ("at the bottom left", "in the bottom left corner", "at the lower left", "in the bottom left"),
    "bottom center": ("at the bottom center", "at the bottom", "in the bottom middle", "at the lower middle"),
    "bottom right": ("at the bottom right", "in the bottom right corner", "at the lower right",
                     "in the bottom right"),
}
# names never trained on: mostly the trained words in other combinations ("side", and "against" in the frames
# below, are new)
HELD_OUT_CELL_NAMES: dict[str, str] = {
    "top left": "in the upper left corner", "top center": "at the top middle", "top right": "in the upper right corner",
    "center left": "on the left side", "center": "in the middle", "center right": "on the right side",
    "bottom left": "in the lower left corner", "bottom center": "at the bottom middle",
    "bottom right": "in the lower right corner",
}
# sentence frames: {objects} ("a red circle at the top left", joined by "and"), {bg} ("a blue")
FRAMES = ("{objects} on {bg} background", "{objects}, {bg} background", "{bg} background with {objects}")
# more frames and word orders for training only (the benchmark's prompts keep the three above): a U-Net trained
# on FRAMES alone missed most held-out captions that put the background first ("on a blue background, ..."), and
# one trained on these without the last swapped the colours of most of them
TRAINING_FRAMES = (*FRAMES, "{objects} in front of {bg} background", "{objects} over {bg} background",
                   "{bg} background behind {objects}", "there is {objects} on {bg} background",
                   "over {bg} background, {objects}")
HELD_OUT_FRAMES = ("on {bg} background, {objects}", "{bg} background, {objects}", "{objects} against {bg} background")
TWO_OBJECT_FRACTION = 0.5
TEMPLATE_FRACTION = 0.3  # single-object captions in the original template, which the model card measures


@dataclass(frozen=True)
class Scene:
    """Shapes on one background, each in its own cell, of colours different from each other and the background."""
    objects: tuple[ShapeSpec, ...]  # their ``background`` is the scene's

    @property
    def background(self) -> str:
        return self.objects[0].background


def random_scene(rng: random.Random, count: int) -> Scene:
    colors = rng.sample(list(COLORS), count + 1)
    cells = rng.sample(POSITIONS, count)
    return Scene(tuple(ShapeSpec(rng.choice(SHAPES), colors[i + 1], cells[i], colors[0]) for i in range(count)))


def phrase(scene: Scene, rng: random.Random, *, held_out: bool = False, frames: tuple[str, ...] = FRAMES) -> str:
    """A caption of ``scene`` in one of ``frames`` with trained cell names, or (``held_out``) with a held-out frame,
    held-out cell names, or both (a third of the captions each)."""
    held_frame, held_names = rng.choice(((True, False), (False, True), (True, True))) if held_out else (False, False)
    frame = rng.choice(HELD_OUT_FRAMES if held_frame else frames)

    def one(spec: ShapeSpec) -> str:
        where = HELD_OUT_CELL_NAMES[spec.position] if held_names else rng.choice(CELL_NAMES[spec.position])
        return f"{with_article(spec.color)} {spec.shape} {where}"

    return frame.format(objects=" and ".join(one(spec) for spec in scene.objects), bg=with_article(scene.background))


def render_scene(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size * SUPERSAMPLE,) * 2, COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for spec in scene.objects:
        draw_shape(draw, spec.shape, spec.position, COLORS[spec.color], rng)
    return image.resize((size, size), Image.LANCZOS)


class ScenesDataset(Dataset):
    """Deterministic from ``seed``: one or two shapes, captioned in the trained phrasings."""

    def __init__(self, size: int = 64, length: int = 100_000, seed: int = 0):
        self.size, self.length, self.seed = size, length, seed

    def __len__(self) -> int:
        return self.length

    def item(self, index: int) -> tuple[Scene, str, random.Random]:
        rng = random.Random(self.seed * 1_000_003 + index + 7_777)
        if rng.random() < TWO_OBJECT_FRACTION:
            scene = random_scene(rng, 2)
            caption = phrase(scene, rng, frames=TRAINING_FRAMES)
        else:
            spec = random_shape_spec(rng)
            scene = Scene((spec,))
            caption = spec.caption if rng.random() < TEMPLATE_FRACTION else phrase(scene, rng, frames=TRAINING_FRAMES)
        return scene, caption, rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene, caption, rng = self.item(index)
        return pil_to_tensor(render_scene(scene, self.size, rng))[0], caption
