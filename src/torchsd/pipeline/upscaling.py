"""Resizing pictures by name, as AUTOMATIC1111's upscaler menus name them: "None", "Lanczos", "Nearest", or an
ESRGAN-family network found in the pipeline's upscaler folders by its file stem ("R-ESRGAN 4x+").

Used by hires fix (an image-space upscale between the passes), image-to-image resizing and the
``extra-single-image`` / ``extra-batch-images`` endpoints. A network is run as often as needed to reach the
target size (at most 3 times, as A1111 does), then Lanczos makes the exact size.
"""

from __future__ import annotations

from PIL import Image

from ..checkpoints.upscalers import UpscalerLibrary
from ..images import pil_to_tensor, tensor_to_pil
from ..models.upscalers import upscale_pixels

RESAMPLERS = {"None": None, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
MAX_PASSES = 3


def upscaler_names(library: UpscalerLibrary | None) -> list[str]:
    return list(RESAMPLERS) + (sorted(library.files()) if library is not None else [])


def canonical_name(name: str, library: UpscalerLibrary | None) -> str | None:
    """The listed name of upscaler ``name`` (any case), or None if there is none."""
    for plain in RESAMPLERS:
        if plain.lower() == name.lower():
            return plain
    path = library.find(name) if library is not None else None
    return path.stem if path is not None else None


def resize(image: Image.Image, width: int, height: int, name: str, library: UpscalerLibrary | None,
           device="cpu") -> Image.Image:
    """``image`` at ``width``×``height`` through upscaler ``name``."""
    label = canonical_name(name, library)
    if label is None:
        raise ValueError(f"unknown upscaler {name!r}; choose one of {', '.join(upscaler_names(library))} (networks "
                         f"are found by file name in the ESRGAN folder: --upscalers-dir, or <models-dir>/ESRGAN)")
    if label in RESAMPLERS:
        if label == "None" or image.size == (width, height):
            return image
        return image.resize((width, height), RESAMPLERS[label])
    model = library.load(label)
    mode = image.mode
    for _ in range(MAX_PASSES):
        if image.width >= width and image.height >= height:
            break
        pixels = (pil_to_tensor(image.convert("RGB")) + 1) / 2  # [-1, 1] -> [0, 1]
        model.to(device)
        out = upscale_pixels(model, pixels.to(device))
        image = tensor_to_pil(out * 2 - 1)[0]
    image = image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)
    return image.convert(mode) if mode in ("RGB", "RGBA", "L") and image.mode != mode else image
