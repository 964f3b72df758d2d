"""Hires fix: generate at the model's size, upscale, then run a second image-to-image pass at the new size.

A model draws well only near the size it was trained at; a first pass there fixes the composition, the
upscale (in latent space, or of the decoded image) makes it bigger, and the second pass, starting
part-way through the schedule (``hires_strength``), adds detail at the new size. As in AUTOMATIC1111,
the second pass draws fresh noise from the same seeds (and variation seeds).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .diffusion.noise import make_generators
from .diffusion.samplers import build_sigmas, resolve_sampler
from .diffusion.schedulers import img2img_start
from .diffusion.variation import variation_noise
from .images import pil_to_tensor, tensor_to_pil

if TYPE_CHECKING:
    from .pipeline import GenerationRequest, StableDiffusion

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


def upscaler_label(name: str) -> str:
    """The AUTOMATIC1111 label of an upscaler named in any case or spacing ("latent-bicubic" too)."""
    for label in UPSCALERS:
        if _key(label) == _key(name):
            return label
    raise ValueError(f"unknown hires upscaler {name!r}; choose one of {', '.join(UPSCALERS)} "
                     f"(AI upscalers such as ESRGAN are not available)")


def target_size(request: "GenerationRequest", width: int, height: int) -> tuple[int, int]:
    if request.hires_size is not None:
        return request.hires_size
    return int(width * request.hires_scale) // 8 * 8, int(height * request.hires_scale) // 8 * 8


def upscale(sd: "StableDiffusion", latents: torch.Tensor, width: int, height: int, upscaler: str) -> torch.Tensor:
    """First-pass latents -> latents for a ``width``×``height`` picture."""
    space, mode, antialias = UPSCALERS[upscaler_label(upscaler)]
    f = sd.config.vae.downscale_factor
    if space == "latent":
        align = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias, **align)
    from PIL import Image

    resample = Image.LANCZOS if mode == "lanczos" else Image.NEAREST
    images = [image.resize((width, height), resample) for image in tensor_to_pil(sd.decode_latents(latents))]
    pixels = torch.cat([pil_to_tensor(image) for image in images])
    with torch.no_grad():
        posterior = sd.vae.encode(pixels.to(sd.device, sd.dtype))
    # the posterior mean: deterministic, and it leaves the seeds' noise streams alone
    return posterior.mode().float() * sd.config.vae.scaling_factor


def hires_pass(sd: "StableDiffusion", request: "GenerationRequest", latents: torch.Tensor, seeds: list[int],
               subseeds: list[int] | None, cond: torch.Tensor, uncond: torch.Tensor | None, width: int, height: int,
               *, progress: bool = False, callback=None) -> torch.Tensor:
    """Upscale ``latents`` to the hires size and denoise them again from ``hires_strength``."""
    from .inpainting import inpainting_concat

    upscaled = upscale(sd, latents, width, height, request.hires_upscaler)
    steps = request.hires_steps or request.steps
    spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
    sigmas = build_sigmas(sd.config.schedule, steps, spec, scheduler)
    sigmas = sigmas[img2img_start(steps, request.hires_strength):]
    if len(sigmas) < 2:
        return upscaled
    generators = make_generators(seeds)
    noise = variation_noise(tuple(upscaled.shape), seeds, generators, subseeds=subseeds,
                            subseed_strength=request.subseed_strength, seed_resize_from=request.seed_resize_from,
                            downscale_factor=sd.config.vae.downscale_factor)
    x = upscaled + noise.to(upscaled.device) * sigmas[0].item()
    concat = inpainting_concat(sd, None, None, tuple(upscaled.shape)) if sd.config.is_inpainting else None
    return sd.sample(request, x, sigmas, cond, uncond, generators, seeds=seeds, concat=concat, progress=progress,
                     callback=callback)
