"""Inpainting and outpainting, as AUTOMATIC1111 does them.

White in the mask is repainted, black is kept. The mask is binarised (> 128), optionally inverted and
blurred (``mask_blur``). Then:

- every model: the denoiser's prediction is pinned to the original latents outside the (latent-size)
  mask at each step, and the final latents are blended once more;
- 9-channel inpainting models also see the mask and the VAE latents of the image with the masked part
  greyed out, as 5 extra input channels; FLUX.1 Fill sees the same two as 80 (``fill_condition``);
- after decoding, the result is composited over the original image with the blurred mask (doubled and
  clipped, as AUTOMATIC1111 does), so pixels the mask does not touch come back exactly as they were.

Outpainting is inpainting on a larger canvas (``outpaint_canvas``). An image whose sides are not
multiples of 8 is padded up to them and the result cropped back, so its size never changes.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from ...diffusion.denoisers import Denoise
from ...images import open_image
from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion, number, parse_number
from .img2img import fit_image, resize_mode_of

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
                       explicit_size: bool, mask_blur: float, invert: bool, fill: str, multiple: int = 8
                       ) -> Inpainting:
    """``width``×``height`` is the generation size; when the caller gave no size and the image's sides are
    not multiples of ``multiple`` (8, the VAE's; 16 for SD 3 / FLUX.1, whose latents are cut in 2x2 patches),
    the canvas is the image padded on the right and bottom instead of a resized image."""
    image = init_image.convert("RGB")
    mask = binary_mask(mask)
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    mask = gaussian_blur_mask(mask, mask_blur)
    crop = None
    if explicit_size and image.size != (width, height):
        image, mask = image.resize((width, height), Image.LANCZOS), mask.resize((width, height), Image.LANCZOS)
    elif not explicit_size and (image.width % multiple or image.height % multiple):
        crop = image.size
        width, height = -(-image.width // multiple) * multiple, -(-image.height // multiple) * multiple
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


def fill_condition(pipe, image: torch.Tensor, mask: torch.Tensor, generators) -> torch.Tensor:
    """FLUX.1 Fill's 80 condition channels, as diffusers' FluxFillPipeline makes them: the latents of the image
    with the masked part set to 0 (mid-grey), drawn from the per-image generators after the start's noise, then
    the binarised pixel mask unshuffled into 8x8 = 64 channels at the latent size.

    ``image`` (B, 3, H, W) in [-1, 1] and ``mask`` (B, 1, H, W) in [0, 1] at pixel size."""
    mask = (mask >= 0.5).float()  # diffusers' mask processor binarises at 0.5
    latents = pipe.encode_image(image * (1.0 - mask), generators)
    unshuffled = F.pixel_unshuffle(mask, pipe.config.vae.downscale_factor)  # (B, 64, h, w): offset (i, j) -> 8i + j
    return torch.cat([latents, unshuffled.to(latents.device)], dim=1)


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


# --- the feature ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InpaintOptions:
    mask: Image.Image | str | Path | None = None  # white = repaint; needs init_image
    mask_blur: float = 4.0  # pixels
    mask_invert: bool = False  # repaint the black part instead (A1111: inpainting_mask_invert)
    inpainting_fill: str = "original"  # FILL_MODES, or A1111's index 0-3


class Inpaint(Feature):
    name = "inpaint"
    Options = InpaintOptions
    binary_names = ("mask",)

    def validate(self, options: InpaintOptions, request: GenerationRequest) -> InpaintOptions:
        mask = options.mask
        if mask is not None:
            if request.init_image is None:
                raise ValueError("a mask needs init_image: the picture whose masked (white) part is repainted")
            mask = open_image(mask, what="mask")
        if not (math.isfinite(options.mask_blur) and 0 <= options.mask_blur <= 256):
            raise ValueError(f"mask_blur must be between 0 and 256 pixels; got {options.mask_blur}")
        fill = options.inpainting_fill
        fill = FILL_MODES[fill] if isinstance(fill, int) and 0 <= fill < len(FILL_MODES) else str(fill).lower()
        if fill not in FILL_MODES:
            raise ValueError(f"inpainting_fill must be one of {', '.join(FILL_MODES)} (or 0-3); "
                             f"got {options.inpainting_fill!r}")
        return InpaintOptions(mask, options.mask_blur, bool(options.mask_invert), fill)

    def active(self, options: InpaintOptions) -> bool:
        return options.mask is not None

    # --- the run ---------------------------------------------------------------------------------------------
    def prepare(self, sd, request, run: Run) -> None:
        """The canvas: the init image and mask at the generation size (or padded up to multiples of 8)."""
        inpainting = prepare_inpainting(
            request.init_image, request.mask, run.width, run.height,
            explicit_size=bool(request.width or request.height),
            mask_blur=request.mask_blur, invert=request.mask_invert, fill=request.inpainting_fill,
            multiple=getattr(sd.config, "multiple", 8))  # a flow model's sides: multiples of 16 (2x2 patches)
        run.state[self.name] = inpainting
        run.width, run.height = inpainting.size

    def source_image(self, run: Run) -> Image.Image | None:
        inpainting = run.state.get(self.name)
        return inpainting.image if inpainting is not None else None

    def on_start(self, init_latents: torch.Tensor, noise: torch.Tensor, sd: StableDiffusion, run: Run
                 ) -> torch.Tensor:
        """The starting latents with the masked part filled as asked, and an inpainting model's extra input."""
        inpainting = run.state[self.name]
        latent_mask = inpainting.latent_mask(run.shape, sd.device)
        init_latents = inpainting.fill_latents(init_latents, noise, latent_mask)
        run.state["latent_mask"], run.state["init_latents"] = latent_mask, init_latents
        if sd.config.is_inpainting:  # FLUX.1 Fill, or a 9-channel U-Net
            mask = mask_tensor(inpainting, run.batch_size)
            run.concat = (fill_condition(sd, run.state["image"], mask, run.generators)
                          if getattr(sd, "family", None) == "flux" else
                          inpainting_concat(sd, run.state["image"], mask, run.shape))
        return init_latents

    def wrap_denoiser(self, denoise, sd, request, run: Run):
        if "latent_mask" not in run.state:
            return denoise
        return pin_unmasked(denoise, run.state["init_latents"], run.state["latent_mask"])

    def after_sampling(self, latents, sd, request, run: Run, **_) -> torch.Tensor:
        if "latent_mask" not in run.state:
            return latents
        latent_mask = run.state["latent_mask"]
        return run.state["init_latents"] * (1 - latent_mask) + latents * latent_mask

    def finish_images(self, pictures: list, run: Run) -> list:
        inpainting = run.state[self.name]
        pictures = [inpainting.composite(picture) for picture in pictures]  # untouched pixels come back as they were
        if inpainting.crop is not None:
            run.width, run.height = inpainting.crop  # the size of the pictures returned
        return pictures

    # --- interfaces ---------------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run, index) -> dict:
        return {"Mask blur": number(request.mask_blur)}

    def from_infotext(self, params: dict[str, str]) -> dict:
        return {"mask_blur": parse_number(params, "Mask blur", float)} if "Mask blur" in params else {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--mask", type=Path, default=None, help="with --init-image: white = repaint, black = "
                                                                    "keep (or a transparent PNG's alpha)")
        parser.add_argument("--mask-blur", type=float, default=4.0, help="Gaussian blur of the mask, in pixels")
        parser.add_argument("--invert-mask", dest="mask_invert", action="store_true",
                            help="repaint the black part instead")
        parser.add_argument("--fill", dest="inpainting_fill", default="original", choices=FILL_MODES,
                            help="what the masked area starts from")

    def from_a1111(self, fields: A1111Fields) -> dict:
        if not (fields.img2img and fields.get("mask")):
            return {}
        mask = fields.decode_image(fields.get("mask"), "mask")
        mask = fit_image(mask, fields.width, fields.height, resize_mode_of(fields)).convert("L")
        blur = fields.int("mask_blur", None)
        return {"mask": mask, "mask_blur": blur if blur is not None else fields.int("mask_blur_x", 4),
                "inpainting_fill": fields.int("inpainting_fill", 0),
                "mask_invert": bool(fields.int("inpainting_mask_invert", 0))}


INPAINT = Inpaint()
