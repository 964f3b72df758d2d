"""``FlowPipeline``: SD 3 / 3.5 and FLUX.1, the rectified-flow transformers, as one pipeline.

text-to-image:  prompt -> CLIP-L, (OpenCLIP-bigG), T5 -> context (B, tokens, 4096) + pooled vector
                noise at t = 1 -> sampler(denoise = transformer's velocity as x0, guidance) -> latents
                -> z = latents / scaling + shift -> VAE decoder -> image
image-to-image: image -> VAE -> (z - shift) * scaling -> (1 - t) x0 + t noise at the level strength picks
                (inpainting: x0 pinned to the image's latents outside the mask; hires fix: a second such pass
                on the upscaled first one)

Why one class for both families rather than an SD3Pipeline and a FluxPipeline: everything but the prompt
encoding and two transformer inputs is the same (16-channel VAE with shift and scale, flow schedule,
samplers through ``FlowDenoiser``, image-to-image, infotext), so the family is a field and the two
differences are two small functions (``encode_sd3``/``encode_flux`` below, the guidance inputs in
``flow_run.py``). It is a sibling of ``StableDiffusion`` (not a subclass): the U-Net model's stages
(prompt weighting, embeddings, inpainting channels) do not apply. Both take the same ``GenerationRequest``
and return the same ``GenerationResult``, so the CLI, the server and the infotext reader treat them alike.

The run, step by step, is ``flow_run.py``; loading is ``checkpoints/flow_pipeline.py``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..checkpoints.embeddings import EmbeddingLibrary
from ..checkpoints.flow_pipeline import FAMILIES, FlowModel
from ..checkpoints.lora import LoraLibrary
from ..checkpoints.upscalers import UpscalerLibrary
from ..config import CLIPTextConfig, FlowScheduleConfig, FluxConfig, MMDiTConfig, VAEConfig
from ..diffusion.samplers import Step
from ..memory import return_freed_memory
from ..models.layers import set_attention_chunk
from ..text.styles import StyleLibrary
from . import autoencoding
from .request import GenerationRequest, GenerationResult


@dataclass(frozen=True)
class FlowPipelineConfig:
    """What the run reads of the model; ``sample_size`` is the native image side in pixels and ``text``
    CLIP-L's config (the width the server's embedding list compares against)."""

    family: str  # "sd3" or "flux"
    variant: str  # "dev", "schnell", "sd35_medium", "sd35_large", …
    transformer: MMDiTConfig | FluxConfig
    vae: VAEConfig
    schedule: FlowScheduleConfig
    text: CLIPTextConfig
    sample_size: int
    t5_max_length: int

    @property
    def patch_size(self) -> int:
        return self.transformer.patch_size

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downscaling times the 2x2 patches."""
        return self.vae.downscale_factor * self.patch_size

    @property
    def is_inpainting(self) -> bool:
        """FLUX.1 Fill: the masked image and the mask as input channels (inpainting on the other models runs
        on the base model alone, the mask pinning the kept latents)."""
        return isinstance(self.transformer, FluxConfig) and self.transformer.condition_channels > 0

    @property
    def guidance_embedded(self) -> bool:
        return isinstance(self.transformer, FluxConfig) and self.transformer.guidance_embeds

    @property
    def label(self) -> str:
        return f"{FAMILIES[self.family]} ({self.variant}{', Fill' if self.is_inpainting else ''})"


class FlowPipeline:
    """The transformer, the 16-channel VAE, the text encoders and their tokenizers. Build with
    ``torchsd.load_pipeline`` (a diffusers folder or single files) or ``FlowPipeline(FlowModel)``."""

    def __init__(self, model: FlowModel):
        transformer_config = model.transformer.config
        vae_config = model.vae.config
        base = transformer_config.sample_size if isinstance(transformer_config, MMDiTConfig) else 128
        mask_channels = getattr(transformer_config, "condition_channels", 0) - vae_config.latent_channels
        if mask_channels > 0 and mask_channels != vae_config.downscale_factor ** 2:
            raise ValueError(f"a FLUX.1 Fill transformer with {mask_channels} mask channels needs a VAE that "
                             f"downscales by {math.isqrt(mask_channels)}; this one downscales by "
                             f"{vae_config.downscale_factor}")
        self.config = FlowPipelineConfig(model.family, model.variant, transformer_config, vae_config,
                                         model.schedule, model.text["clip_l"].config,
                                         base * vae_config.downscale_factor, model.t5_max_length)
        self.transformer = model.transformer.eval().requires_grad_(False)
        self.vae = model.vae.eval().requires_grad_(False)
        # the encoders in memory now, by role ("clip_l", "clip_g", "t5"); ``text_encoder(role)`` reads one that
        # is not (freed, or left for later) from its file again through ``text_sources``
        self.text_encoders: dict[str, torch.nn.Module] = {k: v.eval().requires_grad_(False)
                                                          for k, v in model.text.items() if v is not None}
        self.text_sources = dict(model.text_sources)
        # drop the text encoders once a run's prompts are encoded (their memory back before the transformer
        # runs) and keep those prompts' encodings, so that the next run with the same prompts reads none
        self.free_text_encoders = False
        self.attention_chunk: int | None = None  # what a text encoder read again gets (layers.set_attention_chunk)
        self._encoding = 0  # depth of ``text_encoding()`` blocks
        self._encoded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._used: set[tuple] = set()
        self.tokenizers = model.tokenizers
        self.name = model.name
        self.source = model.source
        self.parts = model.parts
        self._hash: str | None = None
        # what the shared features and the server look for on any pipeline
        self.loras = LoraLibrary()
        self.embeddings = EmbeddingLibrary()
        self.styles = StyleLibrary()
        self.upscalers = UpscalerLibrary()
        self.taesd = None
        self.fast_decode = False
        self.vae_tiling = None
        self.execution_device: torch.device | None = None
        self.sampling_hooks: dict[str, Callable] = {}

    def __repr__(self) -> str:
        return f"FlowPipeline({self.config.label}, {self.name!r})"

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def networks(self) -> list[torch.nn.Module]:
        """The networks in memory: transformer, VAE and the text encoders that are loaded."""
        return [self.transformer, self.vae, *self.text_encoders.values()]

    @property
    def device(self) -> torch.device:
        return self.execution_device or next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (its float weights'; quantized ones are dequantized to it)."""
        return next(p for p in self.transformer.parameters() if p.is_floating_point()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FlowPipeline":
        for network in self.networks:
            network.to(device=device, dtype=dtype)  # quantized weights are uint8 buffers: moved, never widened
        self._encoded.clear()
        return self

    # --- the text encoders, in memory only while they are needed (``free_text_encoders``) ------------------
    def has_text_encoder(self, role: str) -> bool:
        return role in self.text_encoders or role in self.text_sources

    def text_encoder(self, role: str) -> torch.nn.Module | None:
        """The encoder of ``role``, read from its file again if it is not in memory; None where the model has
        none (SD 3 without T5)."""
        encoder = self.text_encoders.get(role)
        if encoder is None and role in self.text_sources:
            encoder = self.text_sources[role]().eval().requires_grad_(False)
            encoder.to(device=self.device, dtype=self.dtype)
            set_attention_chunk(encoder, self.attention_chunk)
            self.text_encoders[role] = encoder
        return encoder

    @contextmanager
    def text_encoding(self) -> Iterator[None]:
        """Around the encoding of a run's prompts (nested blocks count as one). With ``free_text_encoders`` the
        encoders are dropped at its end and only the encodings of the prompts encoded inside it are kept."""
        self._encoding += 1
        try:
            yield
        finally:
            self._encoding -= 1
            if self._encoding == 0 and self.free_text_encoders:
                self.release_text_encoders()
                self._encoded = {k: v for k, v in self._encoded.items() if k in self._used}
                self._used = set()

    def release_text_encoders(self) -> None:
        """Drop every text encoder that can be read again from its file, and give its memory back."""
        dropped = [role for role in self.text_encoders if role in self.text_sources]
        for role in dropped:
            del self.text_encoders[role]
        if dropped:
            return_freed_memory(collect=True)

    @contextmanager
    def sampling_context(self) -> Iterator[None]:
        yield

    @property
    def model_hash(self) -> str | None:
        if self._hash is None and self.source is not None and self.source.is_file():
            from ..checkpoints.io import file_sha256

            self._hash = file_sha256(self.source)[:10]
        return self._hash

    # --- the stages --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], encoders_key: tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (context (B, tokens, width), pooled (B, pooled_dim)) in the transformer's dtype.
        ``encoders_key``: what else the encoders hold for this encoding (their LoRAs), part of the kept
        encodings' key."""
        key = (tuple(prompts), encoders_key)
        with self.text_encoding():
            if self.free_text_encoders:
                self._used.add(key)
                if key in self._encoded:
                    return self._encoded[key]
            encode = encode_sd3 if self.family == "sd3" else encode_flux
            context, pooled = encode(self, prompts)
            encoded = context.to(self.dtype), pooled.to(self.dtype)
            if self.free_text_encoders:
                self._encoded[key] = encoded
            return encoded

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """Images in [-1, 1] -> latents the transformer sees: (z - shift) * scaling, z from the posterior."""
        vae = self.config.vae
        posterior = autoencoding.encode(self.vae, images.to(self.device))
        return (posterior.sample(generator).float() - vae.shift_factor) * vae.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (float32, finite or FloatingPointError); with ``fast_decode``, TAESD's."""
        if self.fast_decode and self.taesd is not None:
            return self.decode_preview(latents)
        vae = self.config.vae
        return autoencoding.decode(self.vae, latents / vae.scaling_factor + vae.shift_factor, tiling=self.vae_tiling)

    @torch.no_grad()
    def decode_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] for a look while sampling: TAESD3 / TAEF1 when the pipeline has one
        (they read the transformer's latents as they are, no shift or scale), else the full VAE."""
        if self.taesd is None or self.taesd.decoder is None:
            vae = self.config.vae
            return autoencoding.decode(self.vae, latents / vae.scaling_factor + vae.shift_factor,
                                       tiling=self.vae_tiling)
        parameter = next(self.taesd.parameters())
        images = self.taesd.decode(latents.to(parameter.device, parameter.dtype)).float()
        return torch.nan_to_num(images).clamp(-1, 1)

    # --- the whole run ------------------------------------------------------------------------------
    def generate(self, prompt: str | GenerationRequest, negative_prompt: str = "", *, progress: bool = False,
                 callback: Callable[[Step], None] | None = None, **options) -> GenerationResult:
        """Text-to-image, or image-to-image with ``init_image`` and ``strength`` (inpainting with ``mask``; hires
        fix with ``hires=True``). Without a sampler named,
        Euler (diffusers' FlowMatchEulerDiscreteScheduler). See ``GenerationRequest``."""
        if not isinstance(prompt, GenerationRequest):
            options.setdefault("sampler", "euler")
            prompt = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, **options)
        return self.run(prompt, progress=progress, callback=callback)

    @torch.no_grad()
    def run(self, request: GenerationRequest, *, progress: bool = False,
            callback: Callable[[Step], None] | None = None, observer=None) -> GenerationResult:
        """``callback`` sees every sampler ``Step``; ``observer`` sees (t, x0_cond, x0_uncond) at every
        classifier-free-guided transformer call."""
        from .flow_run import run

        return run(self, request, progress=progress, callback=callback, observer=observer)

    def infotext(self, request: GenerationRequest, seed: int, width: int, height: int) -> str:
        from .flow_run import infotext

        return infotext(self, request, seed, width, height)

    def save(self, path: str | Path, format: str = "diffusers", dtype: torch.dtype | None = None) -> None:
        """Write the model as a diffusers folder (the layout StableDiffusion3Pipeline / FluxPipeline read)."""
        from ..checkpoints.flow_pipeline import write_flow_folder

        if format != "diffusers":
            raise ValueError(f"a {self.config.label} model is written as a diffusers folder; got format {format!r}")
        write_flow_folder(self, path, dtype=dtype)


# --- 2. the prompts, per family -----------------------------------------------------------------------------

def _t5(pipe: FlowPipeline, prompts: list[str], batch: int) -> torch.Tensor:
    """T5's final hidden states (B, max_length, width); zeros where the model has no T5 (SD 3 without
    text_encoder_3, as diffusers runs it)."""
    encoder = pipe.text_encoder("t5")
    if encoder is None:
        return torch.zeros(batch, pipe.config.t5_max_length, pipe.config.transformer.context_dim, device=pipe.device)
    ids = pipe.tokenizers["t5"](prompts).to(pipe.device)
    return encoder(ids).float()


def _clip(pipe: FlowPipeline, name: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = pipe.tokenizers[name](prompts).to(pipe.device)
    hidden, pooled = pipe.text_encoder(name)(ids)
    return hidden.float(), pooled.float()


def encode_sd3(pipe: FlowPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD 3: CLIP-L's and bigG's penultimate states side by side (768 + 1280), zero-padded to T5's width,
    then T5's tokens after them; pooled = both projected pooled vectors (768 + 1280 = 2048)."""
    hidden_l, pooled_l = _clip(pipe, "clip_l", prompts)
    hidden_g, pooled_g = _clip(pipe, "clip_g", prompts)
    t5 = _t5(pipe, prompts, len(prompts))
    clip = torch.cat([hidden_l, hidden_g], dim=-1)  # (B, 77, 2048)
    if clip.shape[-1] > t5.shape[-1]:
        raise ValueError(f"SD 3: the CLIP states are {clip.shape[-1]} wide, wider than the transformer's context "
                         f"{t5.shape[-1]}: the text encoders are not this model's")
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=1), torch.cat([pooled_l, pooled_g], dim=-1)  # (B, 77 + T, 4096), (B, 2048)


def encode_flux(pipe: FlowPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1: T5's tokens are the context; CLIP-L's pooled vector (final-normed end token, unprojected)."""
    _, pooled = _clip(pipe, "clip_l", prompts)
    return _t5(pipe, prompts, len(prompts)), pooled


def load_flow_pipeline(path: str | Path, *, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, variant: str | None = None, vae: str | Path | None = None,
                       text_encoders: list[str | Path] | tuple = (), t5_tokenizer: str | Path | None = None,
                       lora_dirs: list[str | Path] = (), embedding_dirs: list[str | Path] = (),
                       without_t5: bool = False, free_text_encoders: bool = False) -> FlowPipeline:
    """An SD 3 / 3.5 or FLUX.1 pipeline from a diffusers folder or a single file (and the parts it lacks:
    ``vae``, ``text_encoders``, ``t5_tokenizer``; see ``checkpoints/flow_pipeline.py``), on ``device`` in
    ``dtype``; quantized transformer weights (fp8, GGUF) stay quantized. ``without_t5``: SD 3 conditions on
    zeros in T5's place, as diffusers' ``text_encoder_3=None`` (T5-XXL is never read). ``free_text_encoders``:
    see ``FlowPipeline``; T5 is then first read when a prompt needs it."""
    from ..checkpoints.flow_pipeline import _read_vae, read_flow_file, read_flow_folder
    from ..checkpoints.io import CheckpointError

    path = Path(path)
    t5 = "none" if without_t5 else "later" if free_text_encoders else "now"
    if path.is_dir():
        if text_encoders or t5_tokenizer is not None:
            raise CheckpointError(f"{path}: a diffusers folder brings its own text encoders and tokenizers; "
                                  f"--text-encoder and --t5-tokenizer are for single files")
        model = read_flow_folder(path, dtype=dtype, variant=variant, t5=t5)
        if vae is not None:
            model.vae, model.parts["vae"] = _read_vae(Path(vae), model.family, dtype), str(vae)
    else:
        if variant is not None:
            raise CheckpointError(f"{path}: variant={variant!r} selects files in a diffusers folder; a single file "
                                  f"has none")
        model = read_flow_file(path, dtype=dtype, vae=vae, text_encoders=text_encoders, t5_tokenizer=t5_tokenizer,
                               t5=t5)
    pipe = FlowPipeline(model).to(device)
    pipe.free_text_encoders = free_text_encoders
    for folder in lora_dirs:
        pipe.loras.add_dir(folder)
    for folder in embedding_dirs:
        pipe.embeddings.add_dir(folder)
    return pipe
