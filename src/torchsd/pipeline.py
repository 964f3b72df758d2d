"""``StableDiffusion``: the bundle of models, and ``GenerationRequest -> GenerationResult``.

text-to-image:  prompt -> tokens -> CLIP text encoder -> context
                noise * sigma_max -> sampler(denoise = U-Net + guidance) -> latents -> VAE decoder -> image
image-to-image: image -> VAE encoder -> latents + noise at the level ``strength`` picks -> the same loop
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from . import autoencoding
from .config import ModelConfig
from .diffusion.denoisers import ModelDenoiser, classifier_free_guidance
from .diffusion.noise import make_generators, randn, random_seed
from .diffusion.samplers import Step, build_sigmas, get_sampler, initial_noise_scale
from .images import open_image, pil_to_tensor, tensor_to_pil
from .infotext import format_infotext
from .models.clip import CLIPTextModel
from .models.tiling import VAETiling
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .text.tokenizer import CLIPTokenizer

MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides an image. The CLI builds it from flags, the server from JSON, tests directly.

    ``width``/``height`` None means the model's native size (or the init image's, for image-to-image).
    ``latents``: unit-variance initial noise (B, C, h, w); the sampler scales it to its first noise level."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int | None = None
    batch_size: int = 1
    init_image: Image.Image | str | Path | None = None
    strength: float = 0.75
    latents: torch.Tensor | None = None
    clip_skip: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string; got {type(self.prompt).__name__}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                if value < 8 or value > MAX_SIDE:
                    raise ValueError(f"{name} must be between 8 and {MAX_SIDE}; got {value}")
                if value % 8:
                    lower, upper = value // 8 * 8, value // 8 * 8 + 8
                    raise ValueError(f"{name} must be a multiple of 8; got {value} — try {lower} or {upper}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}; got {self.steps}")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}; got {self.batch_size}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number; got {self.guidance_scale}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0; got {self.eta}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1 (0 keeps the image, 1 ignores it); got {self.strength}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be a non-negative integer below 2**63 (or None for random); got {self.seed}")
        if self.clip_skip is not None and self.clip_skip < 1:
            raise ValueError(f"clip_skip must be at least 1; got {self.clip_skip}")
        get_sampler(self.sampler)  # raises with the valid names
        if self.init_image is not None:
            object.__setattr__(self, "init_image", open_image(self.init_image, what="init image"))
        if self.latents is not None and self.latents.shape[0] != self.batch_size:
            raise ValueError(f"latents hold {self.latents.shape[0]} images but batch_size is {self.batch_size}")

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: torch.Tensor  # final latents as the U-Net sees them (scaled by the VAE's scaling_factor)
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    extra: dict = field(default_factory=dict)


class StableDiffusion:
    """The three networks, the tokenizer and the schedule. Build with ``load_pipeline`` or ``from_config``."""

    def __init__(self, config: ModelConfig, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, *, name: str = "model", source: Path | None = None):
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.denoiser = ModelDenoiser(self.unet, config.schedule)
        self._hash: str | None = None
        self.vae_tiling: VAETiling | None = None  # tile VAE encode/decode of larger images (runtime.py)
        self.execution_device: torch.device | None = None  # where offloaded networks run (offload.py)

    @classmethod
    def from_config(cls, config: ModelConfig, *, seed: int = 0, name: str = "random") -> "StableDiffusion":
        """Randomly initialised models (for tests and for trying the code without weights)."""
        torch.manual_seed(seed)
        tokenizer = CLIPTokenizer(pad_token_id=config.text.pad_token_id)
        return cls(config, UNet(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text), tokenizer,
                   name=name)

    @property
    def device(self) -> torch.device:
        return self.execution_device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(device=device, dtype=dtype)
        return self

    @property
    def model_hash(self) -> str | None:
        """sha256[:10] of the weights file, as AUTOMATIC1111 shows it."""
        if self._hash is None and self.source is not None and self.source.is_file():
            import hashlib

            digest = hashlib.sha256()
            with open(self.source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._hash = digest.hexdigest()[:10]
        return self._hash

    # --- the stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """Prompts -> text context (B, 77, width) in the model's dtype."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip or self.config.clip_skip).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, sampled from the posterior with ``generator``."""
        posterior = autoencoding.encode(self.vae, images.to(self.device), tiling=self.vae_tiling)
        return posterior.sample(generator).float() * self.config.vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32); a non-finite half-precision decode is redone
        in float32, and one still not finite raises ``FloatingPointError``."""
        return autoencoding.decode(self.vae, latents / self.config.vae.scaling_factor, tiling=self.vae_tiling)

    # --- the whole run -------------------------------------------------------------------------
    def generate(self, prompt: str | GenerationRequest, negative_prompt: str = "", *, progress: bool = False,
                 callback: Callable[[Step], None] | None = None, **options) -> GenerationResult:
        """Text-to-image, or image-to-image with ``init_image`` and ``strength``. See ``GenerationRequest``."""
        request = prompt if isinstance(prompt, GenerationRequest) else \
            GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **options)
        return self.run(request, progress=progress, callback=callback)

    @torch.no_grad()
    def run(self, request: GenerationRequest, *, progress: bool = False,
            callback: Callable[[Step], None] | None = None) -> GenerationResult:
        spec = get_sampler(request.sampler)
        B = request.batch_size
        width, height = self._size(request)
        first_seed = request.seed if request.seed is not None else random_seed()
        seeds = [first_seed + i for i in range(B)]
        generators = make_generators(seeds)

        cond = self.encode_prompt([request.prompt] * B, request.clip_skip)
        uncond = self.encode_prompt([request.negative_prompt] * B, request.clip_skip) \
            if request.guidance_scale != 1.0 else None

        sigmas = build_sigmas(self.config.schedule, request.steps, spec)
        f = self.config.vae.downscale_factor
        shape = (B, self.config.vae.latent_channels, height // f, width // f)
        if request.init_image is not None:
            image = pil_to_tensor(request.init_image, width, height).expand(B, -1, -1, -1)
            init_latents = self.encode_image(image, generators)
            # strength s runs the last round(s * steps) steps of the schedule (diffusers' convention)
            start = request.steps - min(int(request.steps * request.strength), request.steps)
            sigmas = sigmas[start:]
            if len(sigmas) < 2:
                return self._finish(request, init_latents, seeds, width, height)
            noise = request.latents if request.latents is not None else randn(shape, generators)
            x = init_latents + noise.to(self.device, torch.float32) * sigmas[0].item()
        else:
            noise = request.latents if request.latents is not None else randn(shape, generators)
            if tuple(noise.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for {width}x{height}; got {tuple(noise.shape)}")
            x = noise.to(self.device, torch.float32) * initial_noise_scale(sigmas, spec)

        denoise = classifier_free_guidance(self.denoiser, cond, uncond, request.guidance_scale)
        kwargs = {"eta": request.eta} if "eta" in inspect.signature(spec.function).parameters else {}
        if spec.stochastic or "generator" in inspect.signature(spec.function).parameters:
            kwargs["generator"] = generators
        sigmas_dev = sigmas.to(self.device, torch.float32)
        bar = _progress_bar(len(sigmas) - 1) if progress else None

        def on_step(step: Step) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(step)

        try:
            # a callback reads each step's sigma on the host: skip it when nobody listens, so that
            # the loop never waits for the accelerator
            watched = bar is not None or callback is not None
            x = spec.function(denoise, x, sigmas_dev, callback=on_step if watched else None, **kwargs)
        finally:
            if bar is not None:
                bar.close()
        # back from x = z / sqrt(alpha_bar) to the latents the U-Net sees, at the last level visited
        latents = x / (1 + sigmas[-1].item() ** 2) ** 0.5
        return self._finish(request, latents, seeds, width, height)

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        if request.width and request.height:
            return request.width, request.height
        if request.init_image is not None:
            w, h = request.init_image.size
            return request.width or max(8, w // 8 * 8), request.height or max(8, h // 8 * 8)
        return request.width or self.config.sample_size, request.height or self.config.sample_size

    def _finish(self, request: GenerationRequest, latents: torch.Tensor, seeds: list[int], width: int,
                height: int) -> GenerationResult:
        images = self.decode_latents(latents)
        if not torch.isfinite(images).all():
            raise FloatingPointError("the decoded image holds NaN or Inf values; try float32 (--dtype fp32)")
        infotexts = [self.infotext(request, seed, width, height) for seed in seeds]
        return GenerationResult(tensor_to_pil(images), latents, seeds, infotexts, request)

    def infotext(self, request: GenerationRequest, seed: int, width: int, height: int) -> str:
        spec = get_sampler(request.sampler)
        params = {
            "Steps": request.steps, "Sampler": spec.label, "CFG scale": request.guidance_scale, "Seed": seed,
            "Size": f"{width}x{height}", "Model hash": self.model_hash, "Model": self.name,
            "Denoising strength": request.strength if request.init_image is not None else None,
            "Clip skip": request.clip_skip if request.clip_skip not in (None, 1) else None,
            "Eta": request.eta if request.eta else None,
            "Version": "torchsd",
        }
        return format_infotext(request.prompt, request.negative_prompt, params)

    # --- saving --------------------------------------------------------------------------------
    def save(self, path: str | Path, format: str = "diffusers", dtype: torch.dtype | None = None) -> None:
        """Write the model as a diffusers folder or an original-layout single file."""
        from .checkpoints import save_pipeline

        save_pipeline(self, path, format=format, dtype=dtype)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)


def load_pipeline(path: str | Path | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, **options) -> StableDiffusion:
    """A model from a diffusers folder or single file; ``None`` is the bundled model."""
    from .checkpoints import load_pipeline as _load

    return _load(path, device=device, dtype=dtype, **options)
