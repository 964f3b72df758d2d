"""Inpainting and outpainting, as AUTOMATIC1111 does them.

White in the mask is repainted, black is kept. The mask is binarised (> 128), optionally inverted and
blurred (``mask_blur``). Then:

- every model: the denoiser's prediction is pinned to the original latents outside the (latent-size)
  mask at each step, and the final latents are blended once more;
- 9-channel inpainting models also see the mask and the VAE latents of the image with the masked part
  greyed out, as 5 extra input channels;
- after decoding, the result is composited over the original image with the blurred mask (doubled and
  clipped, as AUTOMATIC1111 does), so pixels the mask does not touch come back exactly as they were.

Outpainting is inpainting on a larger canvas (``outpaint_canvas``). An image whose sides are not
multiples of 8 is padded up to them and the result cropped back, so its size never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from .diffusion.denoisers import Denoise

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")  # AUTOMATIC1111's inpainting_fill 0..3


def binary_mask(mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's reading of a mask: the alpha channel of a transparent RGBA image, else luminance;
    then > 128 is white (repaint) and the rest black."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        mask = mask.split()[-1]
    return mask.convert("L").point(lambda v: 255 if v > 128 else 0)


def gaussian_blur_mask(mask: Image.Image, sigma: float) -> Image.Image:
    """Separable Gaussian blur with OpenCV's kernel size for ``sigma`` (2·int(2.5σ+0.5)+1) and its
    mirrored border (reflect-101), which is what AUTOMATIC1111's ``mask_blur`` uses."""
    if sigma <= 0:
        return mask
    size = 2 * int(2.5 * sigma + 0.5) + 1
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    array = np.asarray(mask, dtype=np.float64)
    half = size // 2
    for axis in (1, 0):  # x, then y
        pad = [(0, 0), (0, 0)]
        pad[axis] = (half, half)
        padded = np.pad(array, pad, mode="reflect")
        array = sum(kernel[i] * np.take(padded, np.arange(i, i + array.shape[axis]), axis=axis) for i in range(size))
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def blur_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """AUTOMATIC1111's "fill": paint the masked area with ever finer blurs of the colours around it."""
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def outpaint_canvas(image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
                    ) -> tuple[Image.Image, Image.Image]:
    """A larger canvas with ``image`` inside, its new margins filled with the nearest edge pixels, and the
    mask that repaints exactly those margins."""
    margins = dict(left=left, right=right, top=top, bottom=bottom)
    if any(v < 0 for v in margins.values()) or not any(margins.values()):
        raise ValueError(f"outpainting margins must be >= 0 pixels and at least one > 0; got {margins}")
    array = np.asarray(image.convert("RGB"))
    canvas = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + array.shape[0], left:left + array.shape[1]] = 0
    return Image.fromarray(canvas), Image.fromarray(mask)


@dataclass
class Inpainting:
    """What a masked run needs, prepared once from the request."""

    original: Image.Image  # the init image on the generation canvas (RGB), before any fill
    image: Image.Image  # what the VAE encodes: ``original``, or it with the masked area filled
    mask: Image.Image  # binarised, inverted if asked, blurred: "L" on the canvas
    overlay_mask: Image.Image  # min(2·mask, 255): how much of the generated image shows in the result
    fill: str
    crop: tuple[int, int] | None  # the image's own size when the canvas was padded up to multiples of 8

    @property
    def size(self) -> tuple[int, int]:
        return self.original.size

    def latent_mask(self, latent_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """(1, 1, h, w) in {0, 1}: the mask resized to the latents (bicubic, as PIL does by default), rounded."""
        h, w = latent_shape[-2:]
        small = np.asarray(self.mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255
        return torch.from_numpy(np.around(small))[None, None].to(device)

    def fill_latents(self, init_latents: torch.Tensor, noise: torch.Tensor, latent_mask: torch.Tensor) -> torch.Tensor:
        """"latent noise" replaces the masked latents by unit noise, "latent nothing" by zeros."""
        if self.fill == "latent noise":
            return init_latents * (1 - latent_mask) + noise * latent_mask
        if self.fill == "latent nothing":
            return init_latents * (1 - latent_mask)
        return init_latents

    def composite(self, generated: Image.Image) -> Image.Image:
        """Original pixels where ``overlay_mask`` is 0, generated ones where it is 255, blended between."""
        result = Image.composite(generated.convert("RGB"), self.original, self.overlay_mask)
        return result.crop((0, 0, *self.crop)) if self.crop is not None else result


def prepare_inpainting(init_image: Image.Image, mask: Image.Image, width: int, height: int, *,
                       explicit_size: bool, mask_blur: float, invert: bool, fill: str) -> Inpainting:
    """``width``×``height`` is the generation size; when the caller gave no size and the image's sides are
    not multiples of 8, the canvas is the image padded on the right and bottom instead of a resized image."""
    image = init_image.convert("RGB")
    mask = binary_mask(mask)
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    mask = gaussian_blur_mask(mask, mask_blur)
    crop = None
    if image.size != (width, height):
        if explicit_size:
            image, mask = image.resize((width, height), Image.LANCZOS), mask.resize((width, height), Image.LANCZOS)
        else:
            crop = image.size
            width, height = -(-image.width // 8) * 8, -(-image.height // 8) * 8
            image = _pad_edge(image, width, height)
            padded_mask = Image.new("L", (width, height), 0)
            padded_mask.paste(mask, (0, 0))
            mask = padded_mask
    overlay = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    to_encode = image if fill == "original" else blur_fill(image, mask)
    return Inpainting(image, to_encode, mask, overlay, fill, crop)


def _pad_edge(image: Image.Image, width: int, height: int) -> Image.Image:
    array = np.asarray(image)
    return Image.fromarray(np.pad(array, ((0, height - image.height), (0, width - image.width), (0, 0)), mode="edge"))


def inpainting_concat(sd, image: torch.Tensor | None, mask: torch.Tensor | None, latent_shape: tuple[int, ...]
                      ) -> torch.Tensor:
    """The 5 extra channels of a 9-channel inpainting U-Net: [mask, latents of the masked image].

    ``image`` (B, 3, H, W) in [-1, 1] and ``mask`` (B, 1, H, W) in [0, 1] at pixel size; without them
    (text-to-image with an inpainting model) the whole picture counts as masked and the image is grey."""
    B, _, h, w = latent_shape
    f = sd.config.vae.downscale_factor
    if image is None:
        image = torch.zeros(B, 3, h * f, w * f)
        mask = torch.ones(B, 1, h * f, w * f)
    mask = mask.round()
    masked = image * (1.0 - mask)
    with torch.no_grad():
        posterior = sd.vae.encode(masked.to(sd.device, sd.dtype))
    # the posterior mean: a fixed conditioning that draws nothing from the per-image generators
    masked_latents = posterior.mode().float() * sd.config.vae.scaling_factor
    small_mask = F.interpolate(mask.float(), size=(h, w)).to(masked_latents.device)  # nearest, as AUTOMATIC1111
    return torch.cat([small_mask, masked_latents], dim=1)


def pin_unmasked(denoise: Denoise, init_latents: torch.Tensor, latent_mask: torch.Tensor) -> Denoise:
    """Outside the mask, predict the original latents: the sampler then keeps them (x0 = init there)."""
    keep = 1.0 - latent_mask

    def denoise_masked(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return init_latents * keep + denoise(x, sigma) * latent_mask

    return denoise_masked


def mask_tensor(inpainting: Inpainting, batch: int) -> torch.Tensor:
    """The blurred mask as (B, 1, H, W) in [0, 1] at pixel size."""
    mask = torch.from_numpy(np.asarray(inpainting.mask, dtype=np.float32) / 255)
    return mask[None, None].expand(batch, -1, -1, -1)
