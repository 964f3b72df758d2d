"""JSON <-> ``GenerationRequest``: the one place where AUTOMATIC1111's and OpenAI's fields meet torchsd's.

Both APIs become a ``GenerationJob`` (a validated ``GenerationRequest`` plus what the server does around
it: batches, a model for this job, whether to send images). Null and unknown fields are tolerated, as
clients send them; a field that would change the image and that torchsd cannot honour is refused with
a message rather than ignored. Fields of ``GenerationRequest`` that other parts of torchsd add (mask,
scheduler, …) are passed on when this build's ``GenerationRequest`` has them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
import time
import warnings
from dataclasses import dataclass, field

from PIL import Image, PngImagePlugin, UnidentifiedImageError
from starlette.requests import Request

from .. import __version__
from ..diffusion.samplers import get_sampler
from ..images import open_image
from ..noise import random_seed
from ..pipeline import GenerationRequest
from ..pipeline.features import FEATURES, A1111Fields
from ..pipeline.infotext import parse_infotext
from .config import ServerConfig
from .registry import ModelEntry, ModelRegistry

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
AUTOMATIC_SCHEDULER = {"automatic", "auto", ""}


class RequestError(ValueError):
    """A request the server will not run; the message says what to change. ``status``: the HTTP code."""

    status = 422


class PayloadTooLarge(RequestError):
    status = 413


class UnsupportedMediaType(RequestError):
    status = 415


async def read_json(request: Request) -> object:
    body = await request.body()
    if not body:
        return {}
    # a JSON content type makes a browser ask before sending a cross-site request, so another web page
    # cannot drive this server from the user's browser (forms can only send text/plain or form data)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType("send the body as JSON with 'Content-Type: application/json'")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON ({err})") from None


# --- field readers: clients send nulls, ints as floats, and so on ------------------------------------------

def _get(body: dict, name: str, default):
    value = body.get(name)
    return default if value is None else value


def _int(body: dict, name: str, default: int | None) -> int | None:
    value = _get(body, name, default)
    if value is None:
        return None
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise RequestError(f"{name} must be an integer; got {value!r}")
    return int(value)


def _float(body: dict, name: str, default: float | None) -> float | None:
    value = _get(body, name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _str(body: dict, name: str, default: str | None) -> str | None:
    value = _get(body, name, default)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{name} must be a string; got {type(value).__name__}")
    return value


def default_sampler() -> str:
    """A1111's default (Euler) where this build has it, else GenerationRequest's default."""
    try:
        return get_sampler("Euler").label
    except ValueError:
        return GenerationRequest.__dataclass_fields__["sampler"].default


# --- images in and out ---------------------------------------------------------------------------------------

def png_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk, read before any decoder sees the data."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def _too_large(what: str, width: int, height: int, max_pixels: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} is {width}x{height} ({width * height} pixels), more than the limit of "
                           f"{max_pixels} pixels (about {math.isqrt(max_pixels)}x{math.isqrt(max_pixels)}); "
                           f"resize it first")


def decode_image(data: object, what: str, max_pixels: int) -> Image.Image:
    """A base64 (or data: URL) PNG, JPEG or WebP; the pixel count is checked before decoding."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{what} must be a base64-encoded PNG, JPEG or WebP image (or a data: URL)")
    data = data.strip()
    if data.startswith(("http://", "https://")):
        raise RequestError(f"{what}: image URLs are not fetched; send the image itself, base64-encoded")
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise RequestError(f"{what}: a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise RequestError(f"{what} is not valid base64") from None
    size = png_size(raw)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _too_large(what, *size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"{what} has more than {max_pixels} pixels; resize it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RequestError(f"{what} is not a readable PNG, JPEG or WebP image ({err})") from None
    if image.width * image.height > max_pixels:
        raise _too_large(what, image.width, image.height, max_pixels)
    return open_image(image, what=what, max_pixels=max_pixels)


def png_bytes(image: Image.Image, infotext: str | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext) if infotext.isascii() else info.add_itxt("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_base64(image: Image.Image, infotext: str | None) -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


# --- the job ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationJob:
    request: GenerationRequest  # one batch; batch i of n_iter uses seeds seed + i * batch_size, …
    n_iter: int = 1
    model: ModelEntry | None = None  # a model for this job only (None: the current one)
    keep_model: bool = False  # make ``model`` the current model afterwards
    send_images: bool = True
    parameters: dict = field(default_factory=dict)  # the request as the client sent it, defaults filled in
    is_img2img: bool = False
    a1111: bool = False  # from the A1111 API: fields its clients always send are dropped where unused


def check_limits(config: ServerConfig, width: int | None, height: int | None, steps: int, images: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if value is not None and value > config.max_side:
            raise RequestError(f"{name} {value} is above this server's limit of {config.max_side}")
    if steps > config.max_steps:
        raise RequestError(f"steps {steps} is above this server's limit of {config.max_steps}")
    if images > config.max_images:
        raise RequestError(f"{images} images were asked for; this server makes at most {config.max_images} "
                           f"per request (batch_size * n_iter, or n)")


def build_request(**kwargs) -> GenerationRequest:
    """``GenerationRequest`` from the fields; its own validation errors become 422s."""
    try:
        return GenerationRequest(**kwargs)
    except (ValueError, TypeError) as err:  # TypeError: a JSON value of the wrong kind (a string for a number)
        raise RequestError(str(err)) from None


# --- AUTOMATIC1111 ---------------------------------------------------------------------------------------------

TXT2IMG_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "sampler_index": "Euler",
    "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None,
    "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False, "comments": None,
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "force_task_id": None, "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "infotext": None,
}
IMG2IMG_DEFAULTS = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if not k.startswith(("hr_", "firstphase_", "enable_hr"))},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None,
    "latent_mask": None, "include_init_images": False, "denoising_strength": 0.75,
}


def _refuse_unsupported(body: dict) -> None:
    """Fields that would change the image in ways torchsd does not do: refused, never silently ignored."""
    if body.get("restore_faces"):
        raise RequestError("face restoration is not supported; set restore_faces to false")
    if body.get("script_name"):
        raise RequestError(f"script {body['script_name']!r} not found: torchsd has no scripts (see /sdapi/v1/scripts)")
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts must be an object")
    for name, value in scripts.items():
        if name.lower() == "controlnet":  # read by the control feature
            continue
        args = value.get("args") if isinstance(value, dict) else value
        if args and args != [False]:  # [] and [False] are how clients say "off"
            raise RequestError(f"always-on script {name!r} not found: torchsd has no extensions")


def check_styles(registry: ModelRegistry, names) -> None:
    """Style names against the server's styles file (--styles-file, <models-dir>/styles.csv): an unknown
    name is a 422 before the job is queued."""
    try:
        registry.styles.check(names)
    except ValueError as err:
        raise RequestError(str(err)) from None


def a1111_job(body: object, *, img2img: bool, config: ServerConfig, registry: ModelRegistry,
              options: dict) -> GenerationJob:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _refuse_unsupported(body)
    defaults = IMG2IMG_DEFAULTS if img2img else TXT2IMG_DEFAULTS
    overrides = _get(body, "override_settings", {})
    if not isinstance(overrides, dict):
        raise RequestError("override_settings must be an object")

    width, height = _int(body, "width", 512), _int(body, "height", 512)
    steps, batch_size, n_iter = _int(body, "steps", 50), _int(body, "batch_size", 1), _int(body, "n_iter", 1)
    if n_iter < 1:
        raise RequestError(f"n_iter must be at least 1; got {n_iter}")
    check_limits(config, width, height, steps, batch_size * max(1, n_iter))
    seed = _int(body, "seed", -1)
    clip_skip = _int(overrides, "CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers"))
    sampler = _str(body, "sampler_name", None) or _str(body, "sampler_index", None) or default_sampler()

    model = None
    if overrides.get("sd_model_checkpoint") is not None:
        model = registry.find(overrides["sd_model_checkpoint"])
    kwargs = dict(prompt=_str(body, "prompt", ""), negative_prompt=_str(body, "negative_prompt", ""),
                  width=width, height=height, steps=steps, guidance_scale=_float(body, "cfg_scale", 7.0),
                  sampler=sampler, seed=seed if seed is not None and seed >= 0 else random_seed(),
                  batch_size=batch_size, clip_skip=clip_skip if clip_skip and clip_skip > 1 else None)
    eta = _float(body, "eta", None)
    if eta is not None:
        kwargs["eta"] = eta
    kwargs.update(_scheduler(body))
    fields = A1111Fields(body, img2img=img2img, width=width, height=height, error=RequestError,
                         decode_image=lambda data, what: decode_image(data, what, config.max_image_pixels),
                         find_model=lambda name: registry.find(name).relpath)
    for feature in FEATURES:  # every feature reads its own A1111 fields
        kwargs.update(feature.from_a1111(fields))
    check_styles(registry, kwargs.get("styles", ()))

    parameters = {**defaults, **body}
    if img2img and not body.get("include_init_images"):
        parameters["init_images"], parameters["mask"] = None, None
    return GenerationJob(build_request(**kwargs), n_iter=n_iter, model=model,
                         keep_model=model is not None and not _get(body, "override_settings_restore_afterwards", True),
                         send_images=bool(_get(body, "send_images", True)), parameters=parameters, is_img2img=img2img,
                         a1111=True)


def _scheduler(body: dict) -> dict:
    scheduler = _str(body, "scheduler", None)
    if scheduler is None or scheduler.strip().lower() in AUTOMATIC_SCHEDULER:
        return {}
    return {"scheduler": scheduler}


def a1111_info(job: GenerationJob, result) -> str:
    """The ``info`` JSON string of a txt2img/img2img response (A1111's ``Processed.js()``)."""
    request = result.request
    n = len(result.images)
    return json.dumps({
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": result.seeds[0] if result.seeds else request.seed, "all_seeds": result.seeds,
        "width": request.width, "height": request.height, "sampler_name": result.sampler_label,
        "cfg_scale": request.guidance_scale, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": result.model_name, "sd_model_hash": result.model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": result.infotexts, "styles": [],
        "job_timestamp": result.timestamp, "clip_skip": request.clip_skip or 1,
        "is_using_inpainting_conditioning": False, "version": f"torchsd {__version__}",
        "interrupted": result.interrupted, "steps_completed": result.steps_completed,
        **{key: value for feature in FEATURES for key, value in feature.a1111_info(request, result.subseeds).items()},
    })


def png_info(body: object, config: ServerConfig) -> dict:
    """/png-info: the infotext of a PNG, its other text chunks, and the infotext parsed as A1111 does."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object with an 'image' field")
    image = decode_image(body.get("image"), "image", config.max_image_pixels)
    text = dict(getattr(image, "text", {}) or {})
    info = text.pop("parameters", None) or image.info.get("parameters") or ""
    items = {k: v for k, v in {**image.info, **text}.items() if isinstance(k, str) and isinstance(v, str)
             and k != "parameters"}
    parameters: dict = {}
    if info:
        parsed = parse_infotext(info)
        parameters = {"Prompt": parsed.pop("prompt"), "Negative prompt": parsed.pop("negative_prompt"), **parsed}
        if "Size" in parameters and "x" in str(parameters["Size"]):
            parameters["Size-1"], parameters["Size-2"] = str(parameters["Size"]).split("x", 1)
    return {"info": info, "items": items, "parameters": parameters}


# --- OpenAI ------------------------------------------------------------------------------------------------------

OPENAI_GENERIC_MODELS = ("dall-e", "gpt-image", "torchsd")


def parse_size(size: object) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    if isinstance(size, str):
        try:
            width, height = (int(v) for v in size.lower().split("x"))
            return width, height
        except ValueError:
            pass
    raise RequestError(f"size must look like '512x512' (WIDTHxHEIGHT) or 'auto'; got {size!r}")


def openai_job(body: object, *, config: ServerConfig, registry: ModelRegistry,
               options: dict) -> tuple[GenerationJob, str]:
    """A GenerationJob and the response format ("b64_json" or "url")."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    prompt = _str(body, "prompt", None)
    if not prompt:
        raise RequestError("prompt is required: describe the image to generate")
    n = _int(body, "n", 1)
    if n < 1:
        raise RequestError(f"n must be at least 1; got {n}")
    width, height = parse_size(body.get("size"))
    response_format = _str(body, "response_format", "b64_json")
    if response_format not in ("b64_json", "url"):
        raise RequestError(f"response_format must be 'b64_json' or 'url'; got {response_format!r}")
    if _str(body, "output_format", "png") != "png":
        raise RequestError("output_format must be 'png': torchsd writes PNG images with their parameters")
    model_name = _str(body, "model", None)
    model = None
    if model_name and not model_name.lower().startswith(OPENAI_GENERIC_MODELS):
        model = registry.find(model_name)
    # torchsd's own extras, for clients that send them (openai's extra_body=)
    steps = _int(body, "steps", GenerationRequest.__dataclass_fields__["steps"].default)
    check_limits(config, width, height, steps, n)
    seed = _int(body, "seed", -1)
    clip_skip = options.get("CLIP_stop_at_last_layers")
    # and every feature's options by their Python names (hires, hires_scale, subseed, loras …)
    features = {name: value for feature in FEATURES for name, value in feature.from_json(body).items()}
    request = build_request(
        prompt=prompt, negative_prompt=_str(body, "negative_prompt", ""), width=width, height=height, steps=steps,
        guidance_scale=_float(body, "cfg_scale", _float(body, "guidance_scale", 7.0)),
        sampler=_str(body, "sampler", None) or default_sampler(), batch_size=n,
        seed=seed if seed is not None and seed >= 0 else random_seed(),
        clip_skip=clip_skip if clip_skip and clip_skip > 1 else None, **features)
    check_styles(registry, request.styles)
    return GenerationJob(request, model=model, parameters=dict(body)), response_format


def openai_response(result, response_format: str) -> dict:
    data = []
    for image, infotext in zip(result.images, result.infotexts):
        encoded = png_base64(image, infotext)
        data.append({"b64_json": encoded} if response_format == "b64_json"
                    else {"url": f"data:image/png;base64,{encoded}"})
    width, height = result.images[0].size if result.images else (result.request.width, result.request.height)
    size = f"{width}x{height}"  # the pictures' (a hires pass makes them larger than the request's size)
    return {"created": int(time.time()), "data": data, "output_format": "png", "size": size}
