"""Conversions between PIL images and tensors, and reading user-supplied images safely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_PIXELS = 4096 * 4096  # decoding bigger images is refused before their pixels are read


def open_image(source: str | Path | Image.Image, *, what: str = "image",
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file (or pass a PIL image through), refusing huge ones before decoding."""
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{what} {str(path)!r} does not exist; give the path of a PNG or JPEG file")
        try:
            image = Image.open(path)
        except (OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"{what} {str(path)!r} is not a readable image ({err})") from None
    if image.width * image.height > max_pixels:
        raise ValueError(f"{what} is {image.width}x{image.height}, more than the limit of {max_pixels} pixels; "
                         f"resize it first")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{what} could not be decoded ({err})") from None
    return image


def pil_to_tensor(image: Image.Image, width: int | None = None, height: int | None = None) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1], resized (Lanczos) when a size is given."""
    image = image.convert("RGB")
    if width and height and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB images, rounded to the nearest 8-bit value."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]
