"""The procedural shapes every built-in shapes dataset draws: a circle, square or triangle of one of 8 colours in
one of 9 grid cells, and its caption in the original template. ``data.ShapesDataset`` (one shape) and
``scenes.ScenesDataset`` (one or two, many phrasings) both draw with these."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 60),
    "blue": (35, 70, 220), "purple": (140, 50, 180), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top center", "top right", "center left", "center", "center right",
             "bottom left", "bottom center", "bottom right")


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"{with_article(self.color)} {self.shape} {where} on {with_article(self.background)} background"


def random_shape_spec(rng: random.Random) -> ShapeSpec:
    color, background = rng.sample(list(COLORS), 2)
    return ShapeSpec(rng.choice(SHAPES), color, rng.choice(POSITIONS), background)


def render_shape(spec: ShapeSpec, size: int = 64, rng: random.Random | None = None, mask: bool = False) -> Image.Image:
    """Draw at 4x and downsample, for smooth edges. Small seeded jitter in size and placement. ``mask``: the
    shape white on black instead of in its colours (the same jitter for the same ``rng`` state)."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), (0, 0, 0) if mask else COLORS[spec.background])
    draw_shape(ImageDraw.Draw(image), spec.shape, spec.position, (255, 255, 255) if mask else COLORS[spec.color],
               rng)
    return image.resize((size, size), Image.LANCZOS)


SUPERSAMPLE = 4


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, position: str, fill: tuple[int, int, int],
               rng: random.Random) -> None:
    """One shape in its grid cell of the (supersampled) canvas: radius 0.30-0.38 of a cell, its centre within
    0.06 of a cell of the cell's, so a shape never leaves its cell (two in different cells never touch)."""
    S = draw.im.size[0]
    row, col = divmod(POSITIONS.index(position), 3)
    cell = S / 3
    radius = cell * rng.uniform(0.30, 0.38)
    cx = cell * (col + 0.5) + rng.uniform(-0.06, 0.06) * cell
    cy = cell * (row + 0.5) + rng.uniform(-0.06, 0.06) * cell
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        r = radius * 0.88
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - radius), (cx - radius * 1.05, cy + radius * 0.8),
                      (cx + radius * 1.05, cy + radius * 0.8)], fill=fill)
