"""Cheaper steps, opt-in and approximate: DeepCache (``deep_cache_interval``: reuse the U-Net's deep features
between full steps, ``models/step_cache.py``) and token merging (``tome_ratio``: ToMe for SD, merge similar
tokens before self-attention, ``models/token_merging.py``). Both trade image fidelity for time; their price
(speed-up and PSNR against the plain run) is measured by ``benchmarks/step_cost.py`` and listed in
docs/performance.md. Each swaps modules in for the run and restores the model's own afterwards; off (the
defaults), neither touches the model, and images are bit-identical to a run without them."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass

from ...models.step_cache import DeepCacheUNet
from ...models.token_merging import token_merging
from ...models.unet import UNet
from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion, number, parse_number


@dataclass(frozen=True)
class DeepCacheOptions:
    deep_cache_interval: int = 1  # a full U-Net step every N steps; 1: off
    deep_cache_branch: int = 0  # which layer ends the deep branch (0: the shallowest, DeepCache's default)


class DeepCache(Feature):
    name = "deep_cache"
    Options = DeepCacheOptions

    def validate(self, options: DeepCacheOptions, request: GenerationRequest) -> DeepCacheOptions:
        if not isinstance(options.deep_cache_interval, int) or options.deep_cache_interval < 1:
            raise ValueError(f"deep_cache_interval must be an integer >= 1 (1 = off; 3 is DeepCache's usual "
                             f"choice); got {options.deep_cache_interval!r}")
        if not isinstance(options.deep_cache_branch, int) or options.deep_cache_branch < 0:
            raise ValueError(f"deep_cache_branch must be an integer >= 0 (0 = the shallowest branch); "
                             f"got {options.deep_cache_branch!r}")
        return options

    def active(self, options: DeepCacheOptions) -> bool:
        return options.deep_cache_interval > 1

    @contextmanager
    def model_context(self, sd: StableDiffusion, request: GenerationRequest, run: Run):
        denoiser = sd.denoiser
        original = denoiser.unet
        if not isinstance(original, UNet):
            raise ValueError(f"deep_cache_interval needs the plain torchsd U-Net (SD 1.x/2.x, SDXL); this model's "
                             f"denoiser runs {type(original).__name__} — set deep_cache_interval to 1, or "
                             "load the model without a compiled or offloaded U-Net")
        denoiser.unet = DeepCacheUNet(original, request.deep_cache_interval, request.deep_cache_branch)
        try:
            yield
        finally:
            denoiser.unet = original

    def infotext_params(self, sd, request, run: Run, index: int) -> dict:
        return {"DeepCache interval": request.deep_cache_interval,
                "DeepCache branch": request.deep_cache_branch or None}

    def from_infotext(self, params: dict[str, str]) -> dict:
        fields = {}
        if "DeepCache interval" in params:
            fields["deep_cache_interval"] = parse_number(params, "DeepCache interval", int)
        if "DeepCache branch" in params:
            fields["deep_cache_branch"] = parse_number(params, "DeepCache branch", int)
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--deep-cache-interval", type=int, default=1, metavar="N",
                            help="DeepCache: run the whole U-Net every N steps and only its shallow branch in "
                                 "between (faster, approximate: see docs/performance.md; 1 = off)")
        parser.add_argument("--deep-cache-branch", type=int, default=0, metavar="K",
                            help="DeepCache's branch: 0 (default) caches the most and is fastest; higher "
                                 "recomputes deeper layers (closer to the plain run)")

    def from_a1111(self, fields: A1111Fields) -> dict:
        return {"deep_cache_interval": fields.int("deep_cache_interval", 1),
                "deep_cache_branch": fields.int("deep_cache_branch", 0)}

    def a1111_info(self, request, subseeds) -> dict:
        return {"deep_cache_interval": request.deep_cache_interval, "deep_cache_branch": request.deep_cache_branch}


@dataclass(frozen=True)
class TokenMergingOptions:
    tome_ratio: float = 0.0  # the fraction of tokens merged before self-attention; 0: off
    tome_max_downsample: int = 1  # merge at levels downsampled at most this much (1: the top level only)


class TokenMerging(Feature):
    name = "token_merging"
    Options = TokenMergingOptions

    def validate(self, options: TokenMergingOptions, request: GenerationRequest) -> TokenMergingOptions:
        if not 0.0 <= options.tome_ratio <= 0.75:
            raise ValueError(f"tome_ratio must be between 0 (off) and 0.75 (3 of every 2x2 tokens merged; ToMe's "
                             f"authors advise <= 0.5); got {options.tome_ratio}")
        if options.tome_max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"tome_max_downsample must be 1, 2, 4 or 8 (the levels merged: 1 = the top one only); "
                             f"got {options.tome_max_downsample}")
        return options

    def active(self, options: TokenMergingOptions) -> bool:
        return options.tome_ratio > 0

    def model_context(self, sd: StableDiffusion, request: GenerationRequest, run: Run):
        if not isinstance(sd.unet, UNet):
            raise ValueError(f"tome_ratio needs torchsd's U-Net (SD 1.x/2.x, SDXL); this model has "
                             f"{type(sd.unet).__name__} — set tome_ratio to 0")
        return token_merging(sd.unet, request.tome_ratio, request.tome_max_downsample)

    def infotext_params(self, sd, request, run: Run, index: int) -> dict:
        # AUTOMATIC1111's keys (its built-in ToMe, also tomesd with use_rand off)
        return {"Token merging ratio": number(request.tome_ratio),
                "Token merging maximum down sampling": request.tome_max_downsample
                if request.tome_max_downsample != 1 else None}

    def from_infotext(self, params: dict[str, str]) -> dict:
        fields = {}
        if "Token merging ratio" in params:
            fields["tome_ratio"] = parse_number(params, "Token merging ratio", float)
        if "Token merging maximum down sampling" in params:
            fields["tome_max_downsample"] = parse_number(params, "Token merging maximum down sampling", int)
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tome-ratio", type=float, default=0.0, metavar="R",
                            help="token merging: merge this fraction of tokens before self-attention (faster at "
                                 "large sizes, approximate: see docs/performance.md; 0 = off, <= 0.5 advised)")
        parser.add_argument("--tome-max-downsample", type=int, default=1, choices=(1, 2, 4, 8),
                            help="merge tokens at U-Net levels downsampled at most this much (default 1: top)")

    def from_a1111(self, fields: A1111Fields) -> dict:
        return {"tome_ratio": fields.float("tome_ratio", 0.0),
                "tome_max_downsample": fields.int("tome_max_downsample", 1)}

    def a1111_info(self, request, subseeds) -> dict:
        return {"tome_ratio": request.tome_ratio, "tome_max_downsample": request.tome_max_downsample}


DEEP_CACHE = DeepCache()
TOKEN_MERGING = TokenMerging()
