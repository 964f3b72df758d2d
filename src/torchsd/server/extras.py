"""AUTOMATIC1111's "Extras" upscaling: ``/sdapi/v1/extra-single-image``, ``/extra-batch-images`` and the
``/upscalers`` list, with A1111's field names and defaults (``upscaling_resize`` 2, ``resize_mode`` 0 = by
factor, 1 = to ``upscaling_resize_w``×``_h``, cropped to fill when ``upscaling_crop``; a second upscaler
blended in by ``extras_upscaler_2_visibility``). Face restoration is refused: torchsd has none."""

from __future__ import annotations

import math

from PIL import Image

from ..checkpoints.upscalers import UpscalerLibrary
from ..pipeline.upscaling import RESAMPLERS, canonical_name, resize, upscaler_names
from .config import ServerConfig
from .schema import RequestError, _float, _get, _int, _str, decode_image, png_base64

MAX_SCALE = 8.0


def upscalers_list(library: UpscalerLibrary) -> list[dict]:
    """A1111's /upscalers items: name, model_name, model_path, model_url, scale."""
    items = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0 if name != "None"
              else 1.0} for name in RESAMPLERS]
    for name, path in sorted(library.files().items()):
        items.append({"name": name, "model_name": "ESRGAN", "model_path": str(path), "model_url": None,
                      "scale": 4.0})
    return items


def _options(body: dict, library: UpscalerLibrary, config: ServerConfig) -> dict:
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if (_float(body, name, 0.0) or 0.0) > 0:
            raise RequestError(f"{name}: face restoration is not supported; set it to 0")
    options = {"mode": _int(body, "resize_mode", 0), "scale": _float(body, "upscaling_resize", 2.0),
               "width": _int(body, "upscaling_resize_w", 512), "height": _int(body, "upscaling_resize_h", 512),
               "crop": bool(_get(body, "upscaling_crop", True)),
               "first": _str(body, "upscaler_1", "None") or "None",
               "second": _str(body, "upscaler_2", "None") or "None",
               "visibility": _float(body, "extras_upscaler_2_visibility", 0.0)}
    if options["mode"] not in (0, 1):
        raise RequestError(f"resize_mode must be 0 (scale by upscaling_resize) or 1 (to upscaling_resize_w/h); "
                           f"got {options['mode']}")
    if not 0 < options["scale"] <= MAX_SCALE:
        raise RequestError(f"upscaling_resize must be above 0 and at most {MAX_SCALE:g}; got {options['scale']}")
    if not 0.0 <= options["visibility"] <= 1.0:
        raise RequestError(f"extras_upscaler_2_visibility must be between 0 and 1; got {options['visibility']}")
    for key in ("first", "second"):
        if canonical_name(options[key], library) is None:
            raise RequestError(f"unknown upscaler {options[key]!r}; choose one of "
                               f"{', '.join(upscaler_names(library))}")
    return options


def _target(image: Image.Image, options: dict, config: ServerConfig) -> tuple[int, int, bool]:
    if options["mode"] == 0:
        size = (round(image.width * options["scale"]), round(image.height * options["scale"]))
        crop = False
    else:
        size, crop = (options["width"], options["height"]), options["crop"]
    if min(size) < 1 or max(size) > config.max_side * 4:
        raise RequestError(f"the upscaled image would be {size[0]}x{size[1]}; this server makes at most "
                           f"{config.max_side * 4} px a side")
    return size[0], size[1], crop


def upscale_one(image: Image.Image, options: dict, library: UpscalerLibrary, config: ServerConfig,
                device="cpu") -> Image.Image:
    width, height, crop = _target(image, options, config)
    if crop:  # scale to cover the box, then cut the middle (A1111's upscaling_crop)
        ratio = max(width / image.width, height / image.height)
        cover = (math.ceil(image.width * ratio), math.ceil(image.height * ratio))
    else:
        cover = (width, height)
    out = resize(image, *cover, options["first"], library, device)
    if options["second"] != "None" and options["visibility"] > 0:
        second = resize(image, *cover, options["second"], library, device)
        out = Image.blend(out.convert("RGB"), second.convert("RGB"), options["visibility"])
    if out.size != (width, height) and crop:
        left, top = (out.width - width) // 2, (out.height - height) // 2
        out = out.crop((left, top, left + width, top + height))
    return out


def extras_single(body: object, library: UpscalerLibrary, config: ServerConfig, device="cpu") -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    options = _options(body, library, config)
    image = decode_image(body.get("image"), "image", config.max_image_pixels)
    return {"html_info": "", "image": png_base64(upscale_one(image, options, library, config, device), None)}


def extras_batch(body: object, library: UpscalerLibrary, config: ServerConfig, device="cpu") -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    options = _options(body, library, config)
    items = body.get("imageList")
    if not isinstance(items, list) or not items:
        raise RequestError("imageList must be a non-empty list of {\"data\": BASE64, \"name\": NAME}")
    if len(items) > config.max_images:
        raise RequestError(f"{len(items)} images were sent; this server upscales at most {config.max_images} "
                           f"per request")
    images = []
    for n, item in enumerate(items):
        data = item.get("data") if isinstance(item, dict) else None
        images.append(decode_image(data, f"imageList[{n}].data", config.max_image_pixels))
    return {"html_info": "", "images": [png_base64(upscale_one(image, options, library, config, device), None)
                                        for image in images]}
