"""``StableDiffusion``: the bundle of networks, tokenizer and schedule, and its stages.

text-to-image:  prompt -> tokens -> CLIP text encoder -> context
                noise * sigma_max -> sampler(denoise = U-Net + guidance) -> latents -> VAE decoder -> image
image-to-image: image -> VAE encoder -> latents + noise at the level ``strength`` picks -> the same loop

The run itself, step by step, is ``run.py``; the request is ``request.py``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..checkpoints.embeddings import EmbeddingLibrary
from ..checkpoints.lora import LoraLibrary
from ..checkpoints.upscalers import UpscalerLibrary
from ..config import ModelConfig
from ..diffusion.denoisers import ModelDenoiser
from ..diffusion.samplers import Step
from ..models.clip import CLIP, CLIPTextModel
from ..models.taesd import TinyAutoencoder
from ..models.tiling import VAETiling
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..text.conditioning import Conditioning, encode_prompts, encode_prompts_sdxl
from ..text.styles import StyleLibrary
from ..text.tokenizer import CLIPTokenizer
from . import autoencoding
from .infotext import infotext_for
from .request import GenerationRequest, GenerationResult
from .run import plan, run

GuidanceObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class StableDiffusion:
    """The three networks, the tokenizer and the schedule. Build with ``load_pipeline`` or ``from_config``."""

    def __init__(self, config: ModelConfig, unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, *, name: str = "model", source: Path | None = None,
                 text_encoder_2: CLIPTextModel | None = None):
        if (text_encoder_2 is None) != (config.text_2 is None):
            raise ValueError("StableDiffusion: give text_encoder_2 exactly when the config has a second text "
                             "encoder (SDXL base)")
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        # SDXL base's OpenCLIP bigG (the refiner's bigG is its only encoder, ``text_encoder``)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False) if text_encoder_2 is not None else None
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.denoiser = ModelDenoiser(self.unet, config.schedule)
        self.clip: CLIP | None = None  # the model's own joint CLIP, for CLIP guidance
        self.clip_models: dict[str, CLIP] = {}  # CLIPs that requests named, loaded once
        self._hash: str | None = None
        self.loras = LoraLibrary()  # folders where <lora:name:w> names are found
        self.embeddings = EmbeddingLibrary()  # folders of textual-inversion embeddings, used by file name
        self.styles = StyleLibrary()  # prompt styles by name: sd.styles.load("styles.csv")
        self.upscalers = UpscalerLibrary()  # folders of ESRGAN-family networks, used by file name (hires fix)
        self.taesd: TinyAutoencoder | None = None  # the tiny VAE: live previews, and final images if fast_decode
        self.fast_decode = False  # decode final images with ``taesd`` (much faster, a little blurrier)
        self.vae_tiling: VAETiling | None = None  # tile VAE encode/decode of larger images (runtime.py)
        # entered around every sampling loop (the runtime's packed weights, for one)
        self.sampling_hooks: dict[str, Callable[[], AbstractContextManager]] = {}
        self.execution_device: torch.device | None = None  # where offloaded networks run (offload.py)
        # how a second model that a request names (SDXL's refiner) is loaded: None reads the path as stored;
        # the runtime sets its own loader (the same device, dtype and speed-ups), the server one that looks
        # the name up in its model list
        self.model_loader: Callable[[str], StableDiffusion] | None = None

    @classmethod
    def from_config(cls, config: ModelConfig, *, seed: int = 0, name: str = "random") -> "StableDiffusion":
        """Randomly initialised models (for tests and for trying the code without weights)."""
        torch.manual_seed(seed)
        tokenizer = CLIPTokenizer(pad_token_id=config.text.pad_token_id)
        return cls(config, UNet(config.unet), AutoencoderKL(config.vae), CLIPTextModel(config.text), tokenizer,
                   name=name, text_encoder_2=CLIPTextModel(config.text_2) if config.text_2 is not None else None)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, lora_dirs: list[str | Path] = (),
                        embedding_dirs: list[str | Path] = (), **options) -> "StableDiffusion":
        """A model from a diffusers folder or single file (``None``: the bundled model) as stored, with no
        runtime choices applied: ``torchsd.load_pipeline`` (``runtime.py``) is the entry point with defaults.
        ``lora_dirs``: where ``<lora:name:w>`` names are found; ``embedding_dirs``: textual-inversion
        embeddings. ``options``: see ``checkpoints.read_checkpoint``."""
        from ..checkpoints import load_model

        loaded = load_model(path, device=device, dtype=dtype, **options)
        sd = cls(loaded.config, loaded.unet, loaded.vae, loaded.text_encoder, loaded.tokenizer, name=loaded.name,
                 source=loaded.source, text_encoder_2=loaded.text_encoder_2)
        sd.clip = loaded.clip
        for folder in lora_dirs:
            sd.loras.add_dir(folder)
        for folder in embedding_dirs:
            sd.embeddings.add_dir(folder)
        return sd

    @contextmanager
    def sampling_context(self) -> Iterator[None]:
        """The context a sampling loop runs inside: every entry of ``sampling_hooks`` entered."""
        with ExitStack() as stack:
            for hook in self.sampling_hooks.values():
                stack.enter_context(hook())
            yield

    @property
    def networks(self) -> tuple[torch.nn.Module, ...]:
        """Every network of the model: U-Net, VAE and the text encoder(s)."""
        return (self.unet, self.vae) + self.text_encoders

    @property
    def text_encoders(self) -> tuple[CLIPTextModel, ...]:
        """In the order of ``config.text_encoders`` (SDXL base: CLIP-L, then bigG)."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def device(self) -> torch.device:
        return self.execution_device or next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        for model in self.networks:
            model.to(device=device, dtype=dtype)
        return self

    @property
    def model_hash(self) -> str | None:
        """sha256[:10] of the weights file, as AUTOMATIC1111 shows it."""
        if self._hash is None and self.source is not None and self.source.is_file():
            from ..checkpoints.io import file_sha256

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
        """``encode_prompt`` that also tells which embeddings the prompts used (and for SDXL the pooled output)."""
        if self.config.is_sdxl:  # both encoders' penultimate states; clip_skip does not apply
            return encode_prompts_sdxl(self.text_encoders, self.tokenizer, prompts, self.embeddings,
                                       device=self.execution_device)
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
        if self.fast_decode and self.taesd is not None:
            return self.decode_preview(latents)
        return autoencoding.decode(self.vae, latents / self.config.vae.scaling_factor, tiling=self.vae_tiling)

    @torch.no_grad()
    def decode_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32) for a look while sampling: through TAESD when the
        pipeline has one (a small fraction of the VAE's cost), else the full VAE."""
        if self.taesd is None or self.taesd.decoder is None:
            return autoencoding.decode(self.vae, latents / self.config.vae.scaling_factor, tiling=self.vae_tiling)
        parameter = next(self.taesd.parameters())
        images = self.taesd.decode(latents.to(parameter.device, parameter.dtype)).float()
        return torch.nan_to_num(images).clamp(-1, 1)

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
        return run(self, request, progress=progress, callback=callback, observer=observer)

    def infotext(self, request: GenerationRequest, seed: int, width: int, height: int) -> str:
        """The infotext of one image of ``request`` made with ``seed`` at ``width``×``height``."""
        run = plan(self, request)
        run.seeds, run.width, run.height = [seed], width, height
        return infotext_for(self, request, run, 0)

    # --- saving --------------------------------------------------------------------------------
    def save(self, path: str | Path, format: str = "diffusers", dtype: torch.dtype | None = None) -> None:
        """Write the model as a diffusers folder or an original-layout single file."""
        from ..checkpoints import save_pipeline

        save_pipeline(self, path, format=format, dtype=dtype)
