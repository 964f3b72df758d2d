"""``StableDiffusion``: the bundle of models, and ``GenerationRequest -> GenerationResult``.

text-to-image:  prompt -> tokens -> CLIP text encoder -> context
                noise * sigma_max -> sampler(denoise = U-Net + guidance) -> latents -> VAE decoder -> image
image-to-image: image -> VAE encoder -> latents + noise at the level ``strength`` picks -> the same loop
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .checkpoints.embeddings import EmbeddingLibrary
from .checkpoints.lora import LoraLibrary, merged_loras, request_loras
from . import autoencoding
from .config import ModelConfig
from .diffusion import clip_guidance
from .diffusion.denoisers import ModelDenoiser, classifier_free_guidance
from .diffusion.noise import make_generators, random_seed
from .diffusion.samplers import Step, build_sigmas, initial_noise_scale, resolve_sampler, sampler_options
from .diffusion.schedulers import img2img_start
from .diffusion.variation import variation_noise
from .hires import hires_pass, target_size as hires_target_size
from .images import open_image, pil_to_tensor, tensor_to_pil
from .inpainting import Inpainting, inpainting_concat, mask_tensor, pin_unmasked, prepare_inpainting
from .infotext import format_infotext
from .models.clip import CLIP, CLIPTextModel
from .models.tiling import VAETiling
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .accel.prepacked import packed_weights
from .text.conditioning import Conditioning, encode_prompts
from .text.prompts import extract_extra_networks
from .text.tokenizer import CLIPTokenizer

MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64

GuidanceObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides an image. The CLI builds it from flags, the server from JSON, tests directly.

    ``width``/``height`` None means the model's native size (or the init image's, for image-to-image).
    ``latents``: unit-variance initial noise (B, C, h, w); the sampler scales it to its first noise level.
    ``scheduler``: the schedule type ("karras", …); "automatic" is the sampler's own (AUTOMATIC1111's choice).
    ``eta``: the noise of DDIM and the ancestral/SDE samplers; None is the sampler's default (0 for DDIM, else 1).

    AUTOMATIC1111's features: ``mask`` (white = repaint; needs ``init_image``) with ``mask_blur``,
    ``mask_invert`` and ``inpainting_fill`` (see ``inpainting``); ``loras`` = [(name or path, scale)], in
    addition to ``<lora:name:scale>`` in the prompt; variation seeds ``subseed``/``subseed_strength`` and
    ``seed_resize_from`` = (width, height); hires fix ``hires`` with ``hires_scale`` or ``hires_size``,
    ``hires_upscaler``, ``hires_steps`` (None = ``steps``) and ``hires_strength`` (see ``hires``).
    ``clip_guidance_scale`` > 0 turns CLIP guidance on (``diffusion/clip_guidance.py``) with the CLIP at
    ``clip_model`` (a path) or the model's own; ``clip_decoder`` "vae" or "linear" (cheaper, coarser)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float = 7.5
    sampler: str = "ddim"
    scheduler: str = "automatic"
    eta: float | None = None
    seed: int | None = None
    batch_size: int = 1
    init_image: Image.Image | str | Path | None = None
    strength: float = 0.75
    latents: torch.Tensor | None = None
    clip_skip: int | None = None
    mask: Image.Image | str | Path | None = None
    mask_blur: float = 4.0
    mask_invert: bool = False
    inpainting_fill: str = "original"
    loras: tuple[tuple[str | Path, float], ...] = ()
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    hires: bool = False
    hires_scale: float = 2.0
    hires_size: tuple[int, int] | None = None
    hires_upscaler: str = "Latent"
    hires_steps: int | None = None
    hires_strength: float = 0.7
    clip_guidance_scale: float = 0.0
    clip_model: str | Path | None = None
    clip_cutouts: int = 4
    clip_decoder: str = "vae"

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
        if self.eta is not None and not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0; got {self.eta}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1 (0 keeps the image, 1 ignores it); got {self.strength}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be a non-negative integer below 2**63 (or None for random); got {self.seed}")
        if self.clip_skip is not None and self.clip_skip < 1:
            raise ValueError(f"clip_skip must be at least 1; got {self.clip_skip}")
        resolve_sampler(self.sampler, self.scheduler)  # raises with the valid names
        clip_guidance.check_options(self.clip_guidance_scale, self.clip_cutouts, self.clip_decoder)
        if self.init_image is not None:
            object.__setattr__(self, "init_image", open_image(self.init_image, what="init image"))
        if self.latents is not None and self.latents.shape[0] != self.batch_size:
            raise ValueError(f"latents hold {self.latents.shape[0]} images but batch_size is {self.batch_size}")
        self._validate_a1111_fields()

    def _validate_a1111_fields(self) -> None:
        from .hires import upscaler_label
        from .inpainting import FILL_MODES

        if self.mask is not None:
            if self.init_image is None:
                raise ValueError("a mask needs init_image: the picture whose masked (white) part is repainted")
            object.__setattr__(self, "mask", open_image(self.mask, what="mask"))
        if not (math.isfinite(self.mask_blur) and 0 <= self.mask_blur <= 256):
            raise ValueError(f"mask_blur must be between 0 and 256 pixels; got {self.mask_blur}")
        fill = FILL_MODES[self.inpainting_fill] if isinstance(self.inpainting_fill, int) and \
            0 <= self.inpainting_fill < len(FILL_MODES) else str(self.inpainting_fill).lower()
        if fill not in FILL_MODES:
            raise ValueError(f"inpainting_fill must be one of {', '.join(FILL_MODES)} (or 0-3); "
                             f"got {self.inpainting_fill!r}")
        object.__setattr__(self, "inpainting_fill", fill)
        for text in (self.prompt, self.negative_prompt):
            extract_extra_networks(text)  # raises on a malformed <lora:…> tag before any work is queued
        loras = []
        for item in self.loras:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path))
                    and isinstance(item[1], (int, float)) and math.isfinite(item[1])):
                raise ValueError(f"loras must be (name or path, scale) pairs, e.g. [('myLora', 0.8)]; got {item!r}")
            loras.append((item[0], float(item[1])))
        object.__setattr__(self, "loras", tuple(loras))
        if self.subseed is not None and not 0 <= self.subseed < 2 ** 63:
            raise ValueError(f"subseed must be a non-negative integer below 2**63 (or None); got {self.subseed}")
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise ValueError(f"subseed_strength must be between 0 (the seed alone) and 1 (the subseed alone); "
                             f"got {self.subseed_strength}")
        for name in ("seed_resize_from", "hires_size"):
            size = getattr(self, name)
            if size is not None:
                if len(size) != 2 or not all(isinstance(v, int) and 8 <= v <= MAX_SIDE for v in size):
                    raise ValueError(f"{name} must be (width, height), each 8..{MAX_SIDE}; got {size!r}")
                object.__setattr__(self, name, tuple(size))
        if self.hires_size is not None and any(v % 8 for v in self.hires_size):
            raise ValueError(f"hires_size must be multiples of 8; got {self.hires_size}")
        if self.hires:
            if self.init_image is not None:
                raise ValueError("hires fix is for text-to-image; for image-to-image, give the larger size directly")
            if not (math.isfinite(self.hires_scale) and 1.0 <= self.hires_scale <= 8.0):
                raise ValueError(f"hires_scale must be between 1 and 8; got {self.hires_scale}")
            if self.hires_steps is not None and not 1 <= self.hires_steps <= MAX_STEPS:
                raise ValueError(f"hires_steps must be between 1 and {MAX_STEPS} (or None for steps); "
                                 f"got {self.hires_steps}")
            if not 0.0 <= self.hires_strength <= 1.0:
                raise ValueError(f"hires_strength must be between 0 and 1; got {self.hires_strength}")
            object.__setattr__(self, "hires_upscaler", upscaler_label(self.hires_upscaler))

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


@dataclass
class RunExtras:
    """What a run found out on the way that its infotext reports (and the inpainting composite)."""

    loras: list = field(default_factory=list)  # checkpoints.lora.AppliedLora, request.loras first
    embeddings: list = field(default_factory=list)  # checkpoints.embeddings.Embedding used by the prompts
    subseeds: list[int] | None = None
    inpainting: Inpainting | None = None


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
        self.clip: CLIP | None = None  # the model's own joint CLIP, for CLIP guidance
        self.clip_models: dict[str, CLIP] = {}  # CLIPs that requests named, loaded once
        self._hash: str | None = None
        self.loras = LoraLibrary()  # folders where <lora:name:w> names are found
        self.embeddings = EmbeddingLibrary()  # folders of textual-inversion embeddings, used by file name
        self.vae_tiling: VAETiling | None = None  # tile VAE encode/decode of larger images (runtime.py)
        self.prepack = False  # hold the U-Net's conv weights in oneDNN's layout while sampling (runtime.py)
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
            from .checkpoints.io import file_sha256

            self._hash = file_sha256(self.source)[:10]
        return self._hash

    # --- the stages ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], clip_skip: int | None = None) -> torch.Tensor:
        """Prompts -> text context (B, 77·chunks, width) in the model's dtype, reading AUTOMATIC1111's
        weighting syntax, long prompts and embeddings (see ``text.conditioning``)."""
        return self.condition(prompts, clip_skip).context.to(self.dtype)

    @torch.no_grad()
    def condition(self, prompts: list[str], clip_skip: int | None = None) -> Conditioning:
        """``encode_prompt`` that also tells which embeddings the prompts used."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, clip_skip or self.config.clip_skip,
                              self.embeddings, device=self.execution_device)

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
                 callback: Callable[[Step], None] | None = None, observer: GuidanceObserver | None = None,
                 **options) -> GenerationResult:
        """Text-to-image, or image-to-image with ``init_image`` and ``strength``. See ``GenerationRequest``."""
        request = prompt if isinstance(prompt, GenerationRequest) else \
            GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **options)
        return self.run(request, progress=progress, callback=callback, observer=observer)

    @torch.no_grad()
    def run(self, request: GenerationRequest, *, progress: bool = False,
            callback: Callable[[Step], None] | None = None,
            observer: GuidanceObserver | None = None) -> GenerationResult:
        """``callback`` sees every sampler ``Step``; ``observer`` sees (sigma, x0_cond, x0_uncond) at every
        guided denoiser call (never when guidance_scale is 1, which runs the conditional half alone)."""
        loras = request_loras(self, request)  # before anything slow: unknown names fail fast
        with merged_loras(self, loras):  # the weights are restored bit for bit afterwards
            return self._run(request, RunExtras(loras=loras), progress=progress, callback=callback,
                             observer=observer)

    def _run(self, request: GenerationRequest, extras: RunExtras, *, progress: bool,
             callback: Callable[[Step], None] | None, observer: GuidanceObserver | None = None
             ) -> GenerationResult:
        spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
        B = request.batch_size
        width, height = self._size(request)
        first_seed = request.seed if request.seed is not None else random_seed()
        seeds = [first_seed + i for i in range(B)]
        generators = make_generators(seeds)
        if request.subseed_strength > 0:
            first_subseed = request.subseed if request.subseed is not None else random_seed()
            extras.subseeds = [first_subseed + i for i in range(B)]

        prompt, negative_prompt = extract_extra_networks(request.prompt)[0], \
            extract_extra_networks(request.negative_prompt)[0]
        cond = self.condition([prompt] * B, request.clip_skip)
        uncond = self.condition([negative_prompt] * B, request.clip_skip) if request.guidance_scale != 1.0 else None
        extras.embeddings = list({e.name: e for e in cond.embeddings + (uncond.embeddings if uncond else [])}.values())
        cond, uncond = cond.context, uncond.context if uncond is not None else None

        if request.mask is not None:
            extras.inpainting = prepare_inpainting(
                request.init_image, request.mask, width, height, explicit_size=bool(request.width or request.height),
                mask_blur=request.mask_blur, invert=request.mask_invert, fill=request.inpainting_fill)
            width, height = extras.inpainting.size
        sigmas = build_sigmas(self.config.schedule, request.steps, spec, scheduler)
        f = self.config.vae.downscale_factor
        shape = (B, self.config.vae.latent_channels, height // f, width // f)
        if request.latents is not None and tuple(request.latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for {width}x{height}; "
                             f"got {tuple(request.latents.shape)}")

        def initial_noise() -> torch.Tensor:  # drawn after the init image's posterior sample, if any
            noise = request.latents if request.latents is not None else variation_noise(
                shape, seeds, generators, subseeds=extras.subseeds, subseed_strength=request.subseed_strength,
                seed_resize_from=request.seed_resize_from, downscale_factor=f)
            return noise.to(self.device, torch.float32)

        concat = init_latents = latent_mask = None
        # image-to-image runs the last steps of the same levels; at strength 1 (start 0) it is text-to-image,
        # unless a mask asks to keep part of the image
        start = img2img_start(request.steps, request.strength) if request.init_image is not None else 0
        if request.init_image is not None and (start > 0 or extras.inpainting is not None):
            inpainting = extras.inpainting
            source = inpainting.image if inpainting is not None else request.init_image
            image = pil_to_tensor(source, width, height).expand(B, -1, -1, -1)
            init_latents = self.encode_image(image, generators)
            noise = initial_noise()
            if inpainting is not None:
                latent_mask = inpainting.latent_mask(shape, self.device)
                init_latents = inpainting.fill_latents(init_latents, noise, latent_mask)
                if self.config.is_inpainting:
                    concat = inpainting_concat(self, image, mask_tensor(inpainting, B), shape)
            sigmas = sigmas[start:]
            if len(sigmas) < 2:
                return self._finish(request, init_latents, seeds, width, height, extras)
            x = init_latents + noise * sigmas[0].item()
        else:
            x = initial_noise() * initial_noise_scale(sigmas, spec)
        if self.config.is_inpainting and concat is None:
            concat = inpainting_concat(self, None, None, shape)

        latents = self.sample(request, x, sigmas, cond, uncond, generators, seeds=seeds, concat=concat,
                              init_latents=init_latents, latent_mask=latent_mask, progress=progress, callback=callback,
                              observer=observer)
        if latent_mask is not None:
            latents = init_latents * (1 - latent_mask) + latents * latent_mask
        if request.hires:
            hires_width, hires_height = hires_target_size(request, width, height)
            latents = hires_pass(self, request, latents, seeds, extras.subseeds, cond, uncond, hires_width,
                                 hires_height, progress=progress, callback=callback)
        return self._finish(request, latents, seeds, width, height, extras)

    def sample(self, request: GenerationRequest, x: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
               uncond: torch.Tensor | None, generators: list[torch.Generator], *, seeds: list[int] | None = None,
               concat: torch.Tensor | None = None,
               init_latents: torch.Tensor | None = None, latent_mask: torch.Tensor | None = None,
               progress: bool = False, callback: Callable[[Step], None] | None = None,
               observer: GuidanceObserver | None = None) -> torch.Tensor:
        """The sampler loop from ``x`` at ``sigmas[0]``; returns the latents the U-Net sees at the end.

        ``concat``: extra U-Net input channels (inpainting models); ``latent_mask`` with ``init_latents``
        keeps the unmasked latents (1 = repaint)."""
        spec, _ = resolve_sampler(request.sampler, request.scheduler)
        denoise = classifier_free_guidance(self.denoiser, cond, uncond, request.guidance_scale, concat=concat,
                                           observer=observer)
        denoise = clip_guidance.guidance_for_request(self, request, denoise, seeds or [0] * x.shape[0])
        if latent_mask is not None:
            denoise = pin_unmasked(denoise, init_latents, latent_mask)
        kwargs = sampler_options(spec, generators, request.eta)
        # the samplers read the levels once as Python floats (stepping.py): from the CPU, so that nothing
        # waits for the accelerator, and in float32, the precision they had on the device
        levels = sigmas.to("cpu", torch.float32)
        bar = _progress_bar(len(sigmas) - 1) if progress else None

        def on_step(step: Step) -> None:
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(step)

        try:
            watched = bar is not None or callback is not None
            with packed_weights(self.unet, self.prepack):
                x = spec.function(denoise, x, levels, callback=on_step if watched else None, **kwargs)
        finally:
            if bar is not None:
                bar.close()
        # back from x = z / sqrt(alpha_bar) to the latents the U-Net sees, at the last level visited
        return x / (1 + sigmas[-1].item() ** 2) ** 0.5

    def _size(self, request: GenerationRequest) -> tuple[int, int]:
        if request.width and request.height:
            return request.width, request.height
        if request.init_image is not None:
            w, h = request.init_image.size
            return request.width or max(8, w // 8 * 8), request.height or max(8, h // 8 * 8)
        return request.width or self.config.sample_size, request.height or self.config.sample_size

    def _finish(self, request: GenerationRequest, latents: torch.Tensor, seeds: list[int], width: int,
                height: int, extras: RunExtras | None = None) -> GenerationResult:
        extras = extras or RunExtras()
        images = self.decode_latents(latents)
        if not torch.isfinite(images).all():
            raise FloatingPointError("the decoded image holds NaN or Inf values; try float32 (--dtype fp32)")
        pictures = tensor_to_pil(images)
        if extras.inpainting is not None:  # pixels the mask does not touch come back exactly as they were
            pictures = [extras.inpainting.composite(picture) for picture in pictures]
        if extras.inpainting is not None and extras.inpainting.crop is not None:
            width, height = extras.inpainting.crop  # the size of the pictures returned
        infotexts = [self.infotext(request, seed, width, height, extras, index=i) for i, seed in enumerate(seeds)]
        return GenerationResult(pictures, latents, seeds, infotexts, request)

    def infotext(self, request: GenerationRequest, seed: int, width: int, height: int,
                 extras: RunExtras | None = None, index: int = 0) -> str:
        extras = extras or RunExtras()
        spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
        hires = request.hires
        params = {
            "Steps": request.steps, "Sampler": spec.label, "Schedule type": scheduler.label,
            "CFG scale": request.guidance_scale, "Seed": seed,
            "Size": f"{width}x{height}", "Model hash": self.model_hash, "Model": self.name,
            "Denoising strength": request.strength if request.init_image is not None else
            (request.hires_strength if hires else None),
            "Clip skip": request.clip_skip if request.clip_skip not in (None, 1) else None,
            "Eta": request.eta if request.eta else None,
            "Variation seed": extras.subseeds[index] if extras.subseeds else None,
            "Variation seed strength": request.subseed_strength if extras.subseeds else None,
            "Seed resize from": "{}x{}".format(*request.seed_resize_from) if request.seed_resize_from else None,
            "Mask blur": _number(request.mask_blur) if request.mask is not None else None,
            "Hires upscale": _number(request.hires_scale) if hires and request.hires_size is None else None,
            "Hires resize": "{}x{}".format(*request.hires_size) if hires and request.hires_size else None,
            "Hires steps": request.hires_steps if hires else None,
            "Hires upscaler": request.hires_upscaler if hires else None,
            "Lora hashes": ", ".join(dict.fromkeys(f"{a.lora.name}: {self.loras.shorthash(a.lora.path)}"
                                                   for a in extras.loras)) or None,
            "TI hashes": ", ".join(f"{e.name}: {self.embeddings.shorthash(e)}" for e in extras.embeddings) or None,
            **clip_guidance.infotext_params(request),
            "Version": "torchsd",
        }
        # LoRAs given through the API are written as prompt tags, so that the infotext alone reproduces the run
        api_tags = "".join(f" <lora:{a.lora.name}:{scale}>" for a, (_, scale) in zip(extras.loras, request.loras))
        return format_infotext(request.prompt + api_tags, request.negative_prompt, params)

    # --- saving --------------------------------------------------------------------------------
    def save(self, path: str | Path, format: str = "diffusers", dtype: torch.dtype | None = None) -> None:
        """Write the model as a diffusers folder or an original-layout single file."""
        from .checkpoints import save_pipeline

        save_pipeline(self, path, format=format, dtype=dtype)


def _number(value: float) -> int | float:
    """4.0 -> 4, as AUTOMATIC1111 writes whole numbers; 0.5 stays 0.5."""
    return int(value) if float(value).is_integer() else value


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", leave=False)


def load_pipeline(path: str | Path | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, *, lora_dirs: list[str | Path] = (),
                  embedding_dirs: list[str | Path] = (), **options) -> StableDiffusion:
    """A model from a diffusers folder or single file; ``None`` is the bundled model. ``lora_dirs`` are
    where ``<lora:name:w>`` names are found, ``embedding_dirs`` hold textual-inversion embeddings."""
    from .checkpoints import load_pipeline as _load

    sd = _load(path, device=device, dtype=dtype, **options)
    for folder in lora_dirs:
        sd.loras.add_dir(folder)
    for folder in embedding_dirs:
        sd.embeddings.add_dir(folder)
    return sd
