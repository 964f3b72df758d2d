"""Image-to-image: start from an image's latents with noise at the level ``strength`` picks (SDEdit).

The image is encoded by the VAE (a posterior sample drawn from the per-image generators, before the
noise), and the run covers the last ``strength`` of the schedule's levels. At strength 1 (start 0) it is
text-to-image, unless a mask asks to keep part of the image (``inpaint.py``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ...images import open_image, pil_to_tensor
from ..upscaling import resize
from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion, parse_number


@dataclass(frozen=True)
class Img2ImgOptions:
    init_image: Image.Image | str | Path | None = None
    strength: float = 0.75  # 0 keeps the image, 1 ignores it
    # how an init image of another size is brought to the run's: Lanczos, or an upscaler network's name
    # (A1111's "upscaler_for_img2img" setting)
    img2img_upscaler: str = "Lanczos"


class Img2Img(Feature):
    name = "img2img"
    Options = Img2ImgOptions
    binary_names = ("init_image",)

    def validate(self, options: Img2ImgOptions, request: GenerationRequest) -> Img2ImgOptions:
        if not 0.0 <= options.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1 (0 keeps the image, 1 ignores it); "
                             f"got {options.strength}")
        if not isinstance(options.img2img_upscaler, str) or not options.img2img_upscaler.strip():
            raise ValueError(f"img2img_upscaler must be an upscaler's name (Lanczos, Nearest or a network in the "
                             f"upscaler folder); got {options.img2img_upscaler!r}")
        if options.init_image is not None and not isinstance(options.init_image, Image.Image):
            options = Img2ImgOptions(open_image(options.init_image, what="init image"), options.strength,
                                     options.img2img_upscaler)
        return options

    def active(self, options: Img2ImgOptions) -> bool:
        return options.init_image is not None

    # --- the run: the starting latents -----------------------------------------------------------------
    def start_latents(self, sd: StableDiffusion, request: GenerationRequest, run: Run,
                      source: Image.Image | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(init latents, unit noise) for an image-to-image run, with ``run.sigmas`` cut to its levels; None
        when the run starts from noise alone. ``source``: the image to encode (inpainting's filled canvas)."""
        start = run.img2img_start(request.steps, request.strength)  # the model family's count
        if start == 0 and source is None:
            return None
        picture = source or request.init_image
        upscaler = request.options(self).img2img_upscaler
        if picture.size != (run.width, run.height) and upscaler.lower() != "lanczos":
            picture = resize(picture.convert("RGB"), run.width, run.height, upscaler, sd.upscalers, sd.device)
        image = pil_to_tensor(picture, run.width, run.height).expand(run.batch_size, -1, -1, -1)
        run.state["image"] = image
        init_latents = sd.encode_image(image, run.generators)  # draws from the generators before the noise
        run.sigmas = run.sigmas[start:]
        return init_latents, run.noise()

    # --- interfaces -----------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run, index) -> dict:
        return {"Denoising strength": request.strength} if request.init_image is not None else {}

    def from_infotext(self, params: dict[str, str]) -> dict:
        hires = any(k.startswith("Hires ") for k in params)
        if "Denoising strength" in params and not hires:
            return {"strength": parse_number(params, "Denoising strength", float)}
        return {}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--init-image", type=Path, default=None, metavar="IMAGE",
                            help="start from this image (image-to-image; also the first argument of img2img)")
        parser.add_argument("--strength", type=float, default=0.75,
                            help="with an init image: 0 keeps the image, 1 ignores it")
        parser.add_argument("--img2img-upscaler", default="Lanczos",
                            help="resizes an init image of another size: Lanczos, Nearest, or a network in "
                                 "--upscalers-dir")

    def from_a1111(self, fields: A1111Fields) -> dict:
        if not fields.img2img:
            return {}
        images = fields.get("init_images")
        if not images or not isinstance(images, list):
            raise fields.error("img2img needs init_images: a list holding one base64-encoded image")
        resize_mode = resize_mode_of(fields)
        overrides = fields.get("override_settings", {})
        upscaler = (overrides.get("upscaler_for_img2img") if isinstance(overrides, dict) else None) or "Lanczos"
        if not isinstance(upscaler, str):
            raise fields.error(f"override_settings.upscaler_for_img2img must be an upscaler's name; got {upscaler!r}")
        # with a network, only the crop is done here; the run resizes with it (it knows the upscaler folder)
        init = fit_image(fields.decode_image(images[0], "init_images[0]"), fields.width, fields.height, resize_mode,
                         resample=upscaler.lower() in ("lanczos", "none"))
        return {"init_image": init, "strength": fields.float("denoising_strength", 0.75),
                "img2img_upscaler": "Lanczos" if upscaler.lower() == "none" else upscaler}

    def a1111_info(self, request, subseeds) -> dict:
        return {"denoising_strength": request.strength if request.init_image is not None else None}


def resize_mode_of(fields: A1111Fields) -> int:
    """A1111's resize_mode: 0 just resize, 1 crop and resize (3, "resize latent", is read as 0)."""
    resize_mode = fields.int("resize_mode", 0)
    if resize_mode not in (0, 1, 3):
        raise fields.error(f"resize_mode {resize_mode} is not supported; use 0 (just resize) or 1 (crop and resize)")
    return 1 if resize_mode == 1 else 0


def fit_image(image: Image.Image, width: int, height: int, resize_mode: int, *, resample: bool = True
              ) -> Image.Image:
    """A1111's resize modes 0 (just resize) and 1 (crop and resize: cover, then centre-crop). ``resample``
    False: only crop to the target's aspect ratio, leaving the resize to an upscaler."""
    image = image.convert("RGB")
    if not resample:
        if resize_mode != 1:
            return image
        scale = max(width / image.width, height / image.height)
        w, h = round(width / scale), round(height / scale)  # the box, in the image's own pixels
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return image.crop((left, top, left + w, top + h))
    if resize_mode == 1:
        scale = max(width / image.width, height / image.height)
        w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
        image = image.resize((w, h), Image.LANCZOS)
        left, top = (w - width) // 2, (h - height) // 2
        return image.crop((left, top, left + width, top + height))
    return image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image


IMG2IMG = Img2Img()
