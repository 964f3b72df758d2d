"""CLIP guidance as a run option: ``clip_guidance_scale`` > 0 wraps the denoiser so that each step's
prediction is pushed towards the prompt as a CLIP image encoder sees it (``diffusion/clip_guidance.py``
has the method). The CLIP is ``clip_model`` (a path, loaded once per model) or the model's own."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from ...diffusion import clip_guidance
from ...models.clip import CLIP
from ...noise import make_generators
from .base import Feature, GenerationRequest, Run, StableDiffusion, parse_number


@dataclass(frozen=True)
class ClipGuidanceOptions:
    clip_guidance_scale: float = 0.0  # 0: off
    clip_model: str | Path | None = None  # None: the model's own CLIP
    clip_cutouts: int = 4  # random crops CLIP sees per step (0: the whole image)
    clip_decoder: str = "vae"  # "vae", or "linear" (cheaper, coarser)


def clip_for_request(sd: StableDiffusion, request: GenerationRequest) -> CLIP:
    if request.clip_model is None:
        if sd.clip is None:
            raise ValueError("clip_guidance_scale needs a CLIP model with an image encoder, and this model has "
                             "none: pass clip_model (CLI: --clip-model) as a transformers CLIPModel folder, an "
                             "OpenCLIP state dict or a CLIP saved by torchsd, or set clip_guidance_scale to 0")
        clip = sd.clip
    else:
        key = str(request.clip_model)
        if key not in sd.clip_models:
            from ...checkpoints.clip import load_clip

            sd.clip_models[key] = load_clip(key)
        clip = sd.clip_models[key]
    return clip.to(sd.device, sd.dtype)


class ClipGuidance(Feature):
    name = "clip_guidance"
    Options = ClipGuidanceOptions

    def validate(self, options: ClipGuidanceOptions, request) -> ClipGuidanceOptions:
        clip_guidance.check_options(options.clip_guidance_scale, options.clip_cutouts, options.clip_decoder)
        return options

    def active(self, options: ClipGuidanceOptions) -> bool:
        return options.clip_guidance_scale != 0

    def wrap_denoiser(self, denoise, sd: StableDiffusion, request: GenerationRequest, run: Run):
        clip = clip_for_request(sd, request)
        tokenizer = sd.tokenizer
        ids = torch.tensor([tokenizer.pad(tokenizer.encode(request.prompt), clip.text.config.max_positions)],
                           device=sd.device)
        with torch.no_grad():
            text_embedding = clip.encode_text(ids).float()
        scaling = sd.config.vae.scaling_factor
        decode = clip_guidance.vae_decoder(sd.vae, scaling) if request.clip_decoder == "vae" else \
            clip_guidance.linear_decoder(sd.vae, scaling)
        # their own generators, so that the cut-outs do not shift the sampler's noise
        return clip_guidance.clip_guidance(denoise, clip, text_embedding, decode, request.clip_guidance_scale,
                                           request.clip_cutouts, make_generators(run.seeds))

    # --- interfaces -------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run, index) -> dict:
        return {"CLIP guidance scale": request.clip_guidance_scale,
                "CLIP model": Path(request.clip_model).name if request.clip_model is not None else "own",
                "CLIP cutouts": request.clip_cutouts, "CLIP decoder": request.clip_decoder}

    def from_infotext(self, params: dict[str, str]) -> dict:
        fields: dict = {}
        if "CLIP guidance scale" in params:
            fields["clip_guidance_scale"] = parse_number(params, "CLIP guidance scale", float)
        if "CLIP cutouts" in params:
            fields["clip_cutouts"] = parse_number(params, "CLIP cutouts", int)
        if params.get("CLIP decoder") in clip_guidance.DECODERS:
            fields["clip_decoder"] = params["CLIP decoder"]
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clip-guidance-scale", type=float, default=0.0,
                            help="CLIP guidance strength, e.g. 100 (0: off)")
        parser.add_argument("--clip-model", default=None,
                            help="CLIP for guidance: transformers CLIPModel folder, OpenCLIP state dict or torchsd "
                                 "CLIP file (default: the model's own)")
        parser.add_argument("--clip-cutouts", type=int, default=4, help="random crops CLIP sees per step "
                                                                        "(0: whole image)")
        parser.add_argument("--clip-decoder", default="vae", choices=list(clip_guidance.DECODERS),
                            help="latents to pixels for guidance: the VAE decoder, or a fitted linear map "
                                 "(faster, coarser)")


CLIP_GUIDANCE = ClipGuidance()
