"""ControlNet's built-in preprocessors, the ones that need no model: "none", "canny", "scribble", "lineart"
(and "invert"). Written with torch on the CPU, so that no OpenCV is needed; names and threshold meanings
are the AUTOMATIC1111 extension's (``module``, ``threshold_a``, ``threshold_b``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# name -> (threshold_a's meaning and default, threshold_b's meaning and default), as /controlnet/module_list
# describes them (None: the slider is not used)
MODULES: dict[str, tuple] = {
    "none": (None, None),
    "canny": (("Canny Low Threshold", 100.0), ("Canny High Threshold", 200.0)),
    "scribble": (("Canny Low Threshold", 100.0), ("Canny High Threshold", 200.0)),
    "lineart": (("Canny Low Threshold", 100.0), ("Canny High Threshold", 200.0)),
    "invert": (None, None),
}
ALIASES = {"None": "none", "canny": "canny", "scribble_canny": "scribble", "lineart_canny": "lineart",
           "invert (from white bg & black line)": "invert"}


def module_name(name: str | None) -> str:
    key = ALIASES.get(name or "none", (name or "none").strip().lower())
    if key not in MODULES:
        raise ValueError(f"unknown ControlNet preprocessor {name!r}; the built-in ones are {', '.join(MODULES)} "
                         f"(others need their own models: preprocess the image elsewhere and use 'none')")
    return key


def detect(image: Image.Image, module: str, threshold_a: float | None = None,
           threshold_b: float | None = None) -> Image.Image:
    """The control map of ``image``: an RGB picture, white features on black."""
    module = module_name(module)
    if module == "none":
        return image.convert("RGB")
    if module == "invert":
        return Image.fromarray(255 - np.asarray(image.convert("RGB")))
    low = MODULES[module][0][1] if threshold_a is None else threshold_a
    high = MODULES[module][1][1] if threshold_b is None else threshold_b
    edges = canny(image, low, high)
    if module == "scribble":  # thick strokes, as a hand scribble has
        edges = F.max_pool2d(edges[None, None], 5, stride=1, padding=2)[0, 0]
    return Image.fromarray((edges.numpy() * 255).astype(np.uint8)).convert("RGB")


def canny(image: Image.Image, low: float, high: float) -> torch.Tensor:
    """Canny edges (1986) as OpenCV computes them without blur: 3x3 Sobel, L1 magnitude, non-maximum
    suppression along the gradient's direction, then hysteresis: weak edges (>= low) are kept where they
    connect to strong ones (>= high). Thresholds are on the 0-255 scale. Returns (H, W) of 0.0 and 1.0."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high; got low={low}, high={high}")
    gray = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))[None, None]
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, sobel[None, None])[0, 0]
    gy = F.conv2d(padded, sobel.t()[None, None])[0, 0]
    magnitude = gx.abs() + gy.abs()

    # direction in four bins: 0 (horizontal gradient), 45, 90, 135 degrees
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    bins = ((angle + 22.5) // 45).long() % 4
    m = F.pad(magnitude, (1, 1, 1, 1))
    H, W = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return m[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    neighbours = [(shifted(0, -1), shifted(0, 1)), (shifted(-1, -1), shifted(1, 1)),
                  (shifted(-1, 0), shifted(1, 0)), (shifted(-1, 1), shifted(1, -1))]
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for b, (before, after) in enumerate(neighbours):
        keep |= (bins == b) & (magnitude > before) & (magnitude >= after)
    thin = magnitude * keep

    strong = thin >= high
    weak = thin >= low
    edges = strong.float()
    while True:  # grow the strong edges through 8-connected weak pixels until nothing changes
        grown = F.max_pool2d(edges[None, None], 3, stride=1, padding=1)[0, 0] * weak
        if torch.equal(grown, edges):
            return edges
        edges = grown
