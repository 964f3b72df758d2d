"""A deterministic reader for ``shapes`` images: background colour, shape colour, shape kind, grid cell.

It measures prompt adherence of a text-to-image model trained on ``shapes``: generate from a caption,
read the picture back, compare the four attributes. On the dataset's own renders it is exact (a test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .data import COLORS, POSITIONS, SHAPES, ShapeSpec

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)


def nearest_color(rgb: np.ndarray, exclude: str | None = None) -> str:
    distances = np.linalg.norm(_PALETTE - rgb[None].astype(np.float32), axis=1)
    if exclude is not None:
        distances[_PALETTE_NAMES.index(exclude)] = np.inf
    return _PALETTE_NAMES[int(distances.argmin())]


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None
    shape: str | None
    position: str | None

    def matches(self, spec: ShapeSpec) -> dict[str, bool]:
        return {"background": self.background == spec.background, "color": self.color == spec.color,
                "shape": self.shape == spec.shape, "position": self.position == spec.position}


def read_shape_image(image: Image.Image, threshold: float = 60.0) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    H, W, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    to_background = np.linalg.norm(pixels - np.array(COLORS[background], dtype=np.float32), axis=2)
    candidate = to_background > threshold
    if candidate.sum() < 6:  # nothing drawn
        return Reading(background, None, None, None)
    color = nearest_color(np.median(pixels[candidate], axis=0), exclude=background)
    # coverage of each pixel by the shape: its position between the background and shape colours, so
    # anti-aliased edges count fractionally and the area is right even when the two colours are close
    bg, fg = np.array(COLORS[background], dtype=np.float32), np.array(COLORS[color], dtype=np.float32)
    alpha = np.clip(((pixels - bg) @ (fg - bg)) / max(float((fg - bg) @ (fg - bg)), 1.0), 0.0, 1.0)
    if (alpha > 0.5).sum() < 4:
        return Reading(background, color, None, None)
    cx = (alpha * np.arange(W)[None]).sum() / alpha.sum() / W
    cy = (alpha * np.arange(H)[:, None]).sum() / alpha.sum() / H
    col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
    shape = max(SHAPES, key=lambda kind: overlap(alpha, template(kind, alpha, W * cx, H * cy)))
    return Reading(background, color, shape, POSITIONS[row * 3 + col])


def template(kind: str, alpha: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """Coverage of an ideal ``kind`` with the same area and centroid as ``alpha``, drawn as the dataset draws."""
    H, W = alpha.shape
    area, scale = float(alpha.sum()), 4
    canvas = Image.new("L", (W * scale, H * scale), 0)
    draw = ImageDraw.Draw(canvas)
    x, y = cx * scale + scale / 2 - 0.5 * 0, cy * scale + scale / 2
    if kind == "circle":
        r = (area / np.pi) ** 0.5 * scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    elif kind == "square":
        r = area ** 0.5 / 2 * scale
        draw.rectangle([x - r, y - r, x + r, y + r], fill=255)
    else:  # the dataset's triangle: apex up, base 2.1 R wide, 1.8 R tall; its centroid is 0.2 R below centre
        R = (area / 1.89) ** 0.5 * scale
        y -= 0.2 * R
        draw.polygon([(x, y - R), (x - 1.05 * R, y + 0.8 * R), (x + 1.05 * R, y + 0.8 * R)], fill=255)
    return np.asarray(canvas.resize((W, H), Image.BOX), dtype=np.float32) / 255


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Soft intersection over union."""
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


# --- scenes: several shapes in one picture ----------------------------------------------------------------------

MIN_OBJECT_PIXELS = 12  # a blob smaller than this (of 64x64) is a speck, not an object; a drawn shape has 100+


@dataclass(frozen=True)
class SceneReading:
    background: str
    objects: tuple[Reading, ...]  # one per blob of one colour, largest first

    def matches(self, specs) -> bool:
        """Every asked-for shape is there with its colour, kind and cell, the background is right, and nothing
        else is drawn."""
        wanted = sorted((s.color, s.shape, s.position) for s in specs)
        found = sorted((o.color, o.shape, o.position) for o in self.objects)
        return self.background == specs[0].background and wanted == found


def read_scene_image(image: Image.Image, threshold: float = 60.0) -> SceneReading:
    """The background, then every object: each pixel that differs from the background goes to the palette
    colour whose line from the background passes nearest to it (so anti-aliased edges, which lie on that line,
    go to their shape's colour), and each 8-connected blob of one colour is one object, read as
    ``read_shape_image`` reads a single shape."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    H, W, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = nearest_color(np.median(border, axis=0))
    bg = np.array(COLORS[background], dtype=np.float32)
    drawn = np.linalg.norm(pixels - bg, axis=2) > threshold
    names = [n for n in _PALETTE_NAMES if n != background]
    alphas, distances = [], []
    for name in names:
        direction = np.array(COLORS[name], dtype=np.float32) - bg
        alpha = np.clip(((pixels - bg) @ direction) / float(direction @ direction), 0.0, 1.0)
        alphas.append(alpha)
        distances.append(np.linalg.norm(pixels - (bg + alpha[..., None] * direction), axis=2))
    owner = np.argmin(np.stack(distances), axis=0)
    objects = []
    for k, name in enumerate(names):
        for blob in connected_blobs(drawn & (owner == k)):
            if blob.sum() < MIN_OBJECT_PIXELS:
                continue
            alpha = np.where(dilate(blob), alphas[k], 0.0)  # the blob and its soft edge, nothing else
            cx = (alpha * np.arange(W)[None]).sum() / alpha.sum() / W
            cy = (alpha * np.arange(H)[:, None]).sum() / alpha.sum() / H
            col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
            shape = max(SHAPES, key=lambda kind: overlap(alpha, template(kind, alpha, W * cx, H * cy)))
            objects.append((float(alpha.sum()), Reading(background, name, shape, POSITIONS[row * 3 + col])))
    return SceneReading(background, tuple(r for _, r in sorted(objects, key=lambda o: -o[0])))


def connected_blobs(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of ``mask``, each as a mask (a flood fill; pictures here are 64x64)."""
    seen = np.zeros_like(mask, dtype=bool)
    blobs = []
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        blob = np.zeros_like(seen)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            blob[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        blobs.append(blob)
    return blobs


def dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in the 8 directions (not across the picture's edges)."""
    padded = np.pad(mask, 1)
    H, W = mask.shape
    return np.logical_or.reduce([padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
                                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
