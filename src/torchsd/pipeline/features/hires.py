"""Hires fix: generate at the model's size, upscale, then run a second image-to-image pass at the new size.

A model draws well only near the size it was trained at; a first pass there fixes the composition, the
upscale (in latent space, or of the decoded image) makes it bigger, and the second pass, starting
part-way through the schedule (``hires_strength``), adds detail at the new size. As in AUTOMATIC1111,
the second pass draws fresh noise from the same seeds (and variation seeds).

SD 3 and FLUX.1 run the same passes (Forge runs hires fix for FLUX.1): the run hands in its model family's
levels, strength count and noising (``Run.levels``, ``img2img_start``, ``noised``), so the second pass there is
a flow image-to-image pass, (1 - t) x0 + t noise, on the schedule of the new size (FLUX.1's shift grows with it).
"""

from __future__ import annotations

import argparse
import math
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...images import pil_to_tensor, tensor_to_pil
from ...noise import make_generators
from ..upscaling import RESAMPLERS, canonical_name, resize
from .base import (
    MAX_SIDE,
    MAX_STEPS,
    A1111Fields,
    Feature,
    GenerationRequest,
    Run,
    StableDiffusion,
    number,
    parse_number,
    parse_size_value,
    size_argument,
)
from .inpaint import inpainting_concat
from .variation import VARIATION

# AUTOMATIC1111's upscaler names -> (space, interpolation mode, antialias)
UPSCALERS: dict[str, tuple[str, str, bool]] = {
    "Latent": ("latent", "bilinear", False),
    "Latent (antialiased)": ("latent", "bilinear", True),
    "Latent (bicubic)": ("latent", "bicubic", False),
    "Latent (bicubic antialiased)": ("latent", "bicubic", True),
    "Latent (nearest)": ("latent", "nearest", False),
    "Latent (nearest-exact)": ("latent", "nearest-exact", False),
    "Lanczos": ("image", "lanczos", False),
    "Nearest": ("image", "nearest", False),
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def builtin_label(name: str) -> str | None:
    """The AUTOMATIC1111 label of a built-in upscaler named in any case or spacing ("latent-bicubic" too)."""
    for label in UPSCALERS:
        if _key(label) == _key(name):
            return label
    return None


def upscaler_label(name: str, sd: StableDiffusion | None = None) -> str:
    """The label of a built-in upscaler, or the name of a network in ``sd``'s upscaler folders (its file stem:
    "R-ESRGAN 4x+")."""
    label = builtin_label(name)
    if label is not None:
        return label
    library = getattr(sd, "upscalers", None)
    network = canonical_name(name, library)
    if network is not None and network not in RESAMPLERS:
        return network
    networks = sorted(library.files()) if library is not None else []
    raise ValueError(f"unknown hires upscaler {name!r}; choose one of {', '.join([*UPSCALERS, *networks])} "
                     f"(ESRGAN-family networks are found by file name in the upscaler folder: --upscalers-dir, "
                     f"or <models-dir>/ESRGAN for the server)")


def target_size(options: "HiresOptions", width: int, height: int, multiple: int = 8) -> tuple[int, int]:
    """The second pass's size: ``hires_size``, or the first pass's times ``hires_scale`` rounded down to
    ``multiple`` (8; an SD 3 / FLUX.1 model's 16)."""
    if options.hires_size is not None:
        return options.hires_size
    return (int(width * options.hires_scale) // multiple * multiple,
            int(height * options.hires_scale) // multiple * multiple)


def size_multiple(sd: StableDiffusion) -> int:
    """What the model's image sides are multiples of: the VAE's 8, or a flow model's 16 (its 2x2 patches too)."""
    return getattr(sd.config, "multiple", 8)


def upscale(sd: StableDiffusion, latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """First-pass latents -> latents for a ``width``×``height`` picture."""
    label = upscaler_label(upscaler, sd)
    if label not in UPSCALERS:  # a network: on the decoded pictures
        images = [resize(image, width, height, label, sd.upscalers, sd.device)
                  for image in tensor_to_pil(sd.decode_latents(latents))]
        return _encode(sd, images)
    space, mode, antialias = UPSCALERS[label]
    f = sd.config.vae.downscale_factor
    if space == "latent":
        align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias, **align)
    from PIL import Image

    resample = Image.LANCZOS if mode == "lanczos" else Image.NEAREST
    return _encode(sd, [image.resize((width, height), resample) for image in tensor_to_pil(sd.decode_latents(latents))])


def _encode(sd: StableDiffusion, images: list) -> torch.Tensor:
    pixels = torch.cat([pil_to_tensor(image) for image in images])
    with torch.no_grad():
        posterior = sd.vae.encode(pixels.to(sd.device, sd.dtype))
    # the posterior mean: deterministic, and it leaves the seeds' noise streams alone
    vae = sd.config.vae
    return (posterior.mode().float() - vae.shift_factor) * vae.scaling_factor  # shift: SD 3's and FLUX.1's VAEs'



@dataclass(frozen=True)
class HiresOptions:
    hires: bool = False
    hires_scale: float = 2.0
    hires_size: tuple[int, int] | None = None  # (width, height), instead of hires_scale
    hires_upscaler: str = "Latent"
    hires_steps: int | None = None  # None: the request's steps
    hires_strength: float = 0.7  # denoising strength of the second pass


class Hires(Feature):
    name = "hires"
    Options = HiresOptions

    def validate(self, options: HiresOptions, request: GenerationRequest) -> HiresOptions:
        size = options.hires_size
        if size is not None:
            if len(size) != 2 or not all(isinstance(v, int) and 8 <= v <= MAX_SIDE for v in size):
                raise ValueError(f"hires_size must be (width, height), each 8..{MAX_SIDE}; got {size!r}")
            if any(v % 8 for v in size):
                raise ValueError(f"hires_size must be multiples of 8; got {tuple(size)}")
            options = HiresOptions(**{**options.__dict__, "hires_size": tuple(size)})
        if not options.hires:
            return options
        if request.init_image is not None:
            raise ValueError("hires fix is for text-to-image; for image-to-image, give the larger size directly")
        if not (math.isfinite(options.hires_scale) and 1.0 <= options.hires_scale <= 8.0):
            raise ValueError(f"hires_scale must be between 1 and 8; got {options.hires_scale}")
        if options.hires_steps is not None and not 1 <= options.hires_steps <= MAX_STEPS:
            raise ValueError(f"hires_steps must be between 1 and {MAX_STEPS} (or None for steps); "
                             f"got {options.hires_steps}")
        if not 0.0 <= options.hires_strength <= 1.0:
            raise ValueError(f"hires_strength must be between 0 and 1; got {options.hires_strength}")
        if not isinstance(options.hires_upscaler, str) or not options.hires_upscaler.strip():
            raise ValueError(f"hires_upscaler must be an upscaler's name; got {options.hires_upscaler!r}")
        # a network's name is checked against the model's upscaler folders when the run starts
        label = builtin_label(options.hires_upscaler) or options.hires_upscaler.strip()
        return HiresOptions(**{**options.__dict__, "hires_upscaler": label})

    def active(self, options: HiresOptions) -> bool:
        return options.hires

    def model_context(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> AbstractContextManager:
        # an unknown network fails before the first pass; the infotext names it as its folder lists it
        options = request.options(self)
        run.state[self.name] = upscaler_label(options.hires_upscaler, sd)
        multiple = size_multiple(sd)
        if options.hires_size is not None and any(side % multiple for side in options.hires_size):
            raise ValueError(f"hires_size {options.hires_size[0]}x{options.hires_size[1]}: this model's images are "
                             f"multiples of {multiple} pixels")
        return nullcontext()

    def after_sampling(self, latents: torch.Tensor, sd: StableDiffusion, request: GenerationRequest, run: Run,
                       *, progress: bool = False, callback=None) -> torch.Tensor:
        """Upscale the first pass's latents and denoise them again from ``hires_strength``."""
        options = request.options(self)
        width, height = target_size(options, run.width, run.height, size_multiple(sd))
        upscaled = upscale(sd, latents, width, height, options.hires_upscaler)
        steps = options.hires_steps or request.steps
        run.shape = tuple(upscaled.shape)  # the levels of a flow model depend on the size (FLUX.1's shift)
        sigmas = run.levels(steps)
        sigmas = sigmas[run.img2img_start(steps, options.hires_strength):]
        if len(sigmas) < 2:
            return upscaled
        # fresh noise from the same seeds (and variation seeds), as AUTOMATIC1111 draws it
        run.generators = make_generators(run.seeds)
        noise = VARIATION.noise(run.shape, request, run, sd.config.vae.downscale_factor)
        x = run.noised(upscaled, noise.to(upscaled.device), sigmas[0].item())
        run.concat = inpainting_concat(sd, None, None, run.shape) if sd.config.is_inpainting else None
        run.hires_steps = steps  # prompt schedules of the second pass count over its own steps
        return run.sample(x, sigmas, progress=progress, callback=callback)

    # --- interfaces -------------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run, index) -> dict:
        options = request.options(self)
        return {"Denoising strength": options.hires_strength,
                "Hires upscale": number(options.hires_scale) if options.hires_size is None else None,
                "Hires resize": "{}x{}".format(*options.hires_size) if options.hires_size else None,
                "Hires steps": options.hires_steps,
                "Hires upscaler": run.state.get(self.name, options.hires_upscaler)}

    def from_infotext(self, params: dict[str, str]) -> dict:
        if not any(k in params for k in ("Hires upscale", "Hires resize", "Hires upscaler")):
            return {}
        fields: dict = {"hires": True}
        if "Hires upscale" in params:
            fields["hires_scale"] = parse_number(params, "Hires upscale", float)
        if "Hires resize" in params:
            fields["hires_size"] = parse_size_value(params["Hires resize"], "Hires resize")
        if "Hires steps" in params:
            fields["hires_steps"] = parse_number(params, "Hires steps", int)
        if "Hires upscaler" in params:
            fields["hires_upscaler"] = params["Hires upscaler"]
        if "Denoising strength" in params:
            fields["hires_strength"] = parse_number(params, "Denoising strength", float)
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--hires", action="store_true", help="hires fix: upscale and run a second pass")
        parser.add_argument("--hires-scale", type=float, default=2.0)
        parser.add_argument("--hires-size", type=size_argument, default=None, metavar="WxH",
                            help="instead of --hires-scale")
        parser.add_argument("--hires-upscaler", default="Latent",
                            help="Latent, 'Latent (bicubic)', Lanczos, Nearest …, or a network in --upscalers-dir")
        parser.add_argument("--upscalers-dir", action="append", default=[], type=Path,
                            help="folder of ESRGAN-family upscalers (.pth/.safetensors), named by file stem "
                                 "(repeatable)")
        parser.add_argument("--hires-steps", type=int, default=None, help="default: --steps")
        parser.add_argument("--hires-strength", type=float, default=0.7, help="denoising strength of the second pass")

    def configure_model(self, sd: StableDiffusion, args: argparse.Namespace) -> None:
        for folder in getattr(args, "upscalers_dir", []):
            sd.upscalers.add_dir(folder)

    def from_a1111(self, fields: A1111Fields) -> dict:
        if fields.img2img or not fields.bool("enable_hr"):
            return {}
        for name in ("hr_prompt", "hr_negative_prompt", "hr_sampler_name", "hr_checkpoint_name", "hr_scheduler"):
            if fields.get(name) not in (None, "", "Use same sampler", "Use same checkpoint", "Use same scheduler"):
                raise fields.error(f"{name} is not supported: the hires pass uses the first pass's prompt, sampler "
                                   f"and model; leave {name} empty")
        resize_x, resize_y = fields.int("hr_resize_x", 0), fields.int("hr_resize_y", 0)
        size = None
        if resize_x or resize_y:  # A1111: one side 0 keeps the aspect ratio of the first pass
            width, height = fields.width, fields.height
            if not resize_x:
                resize_x = resize_y * width // height
            if not resize_y:
                resize_y = resize_x * height // width
            size = (resize_x // 8 * 8, resize_y // 8 * 8)
        steps = fields.int("hr_second_pass_steps", 0)
        return {"hires": True, "hires_scale": fields.float("hr_scale", 2.0), "hires_size": size,
                "hires_upscaler": fields.str("hr_upscaler", None) or "Latent",
                "hires_steps": steps or None, "hires_strength": fields.float("denoising_strength", 0.7)}


HIRES = Hires()
