"""``GenerationRequest``: everything that decides an image, and ``GenerationResult``: what a run returns.

The request holds the core fields every run has and one frozen options object per feature
(``features/``). It is built from flat keywords, as ``sd.generate("a cat", steps=20, hires=True,
mask=...)`` passes them: each keyword goes to the feature that owns it. A feature's options are read
back by the feature (``feature.options(request)``), or by their flat name (``request.hires_scale``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from ..diffusion.samplers import resolve_sampler
from ..text.prompts import extract_extra_networks
from .features import FEATURES, owner_of
from .features.base import MAX_BATCH, MAX_SIDE, MAX_STEPS

if TYPE_CHECKING:
    from .features.base import Feature

CORE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "scheduler",
               "eta", "seed", "batch_size", "latents", "clip_skip")


@dataclass(frozen=True, init=False)
class GenerationRequest:
    """The core of a request; feature options live in ``features`` (one per registered feature, in order).

    ``width``/``height`` None means the model's native size (or the init image's, for image-to-image).
    ``latents``: unit-variance initial noise (B, C, h, w); the sampler scales it to its first noise level.
    ``scheduler``: the schedule type ("karras", …); "automatic" is the sampler's own (AUTOMATIC1111's choice).
    ``eta``: the noise of DDIM and the ancestral/SDE samplers; None is the sampler's default (0 for DDIM, else 1).
    The feature keywords are listed in each feature's options (``features/*.py``)."""

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
    latents: torch.Tensor | None = None
    clip_skip: int | None = None
    features: tuple = ()  # one options object per registered feature, in registry order

    def __init__(self, prompt: str, negative_prompt: str = "", *, features: tuple = (), **keywords: Any):
        core = {f.name: f.default for f in dataclasses.fields(self) if f.name not in ("prompt", "features")}
        flat: dict[str, dict[str, Any]] = {}
        for name, value in keywords.items():
            if name in core:
                core[name] = value
            else:
                flat.setdefault(owner_of(name).name, {})[name] = value  # raises for an unknown keyword
        object.__setattr__(self, "prompt", prompt)
        core["negative_prompt"] = negative_prompt
        for name, value in core.items():
            object.__setattr__(self, name, value)
        given = {type(options): options for options in features}
        options = []
        for feature in FEATURES:
            base = given.get(feature.Options, feature.defaults())
            options.append(dataclasses.replace(base, **flat.get(feature.name, {})))
        object.__setattr__(self, "features", tuple(options))
        self._validate()

    def _validate(self) -> None:
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
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be a non-negative integer below 2**63 (or None for random); got {self.seed}")
        if self.clip_skip is not None and self.clip_skip < 1:
            raise ValueError(f"clip_skip must be at least 1; got {self.clip_skip}")
        resolve_sampler(self.sampler, self.scheduler)  # raises with the valid names
        if self.latents is not None and self.latents.shape[0] != self.batch_size:
            raise ValueError(f"latents hold {self.latents.shape[0]} images but batch_size is {self.batch_size}")
        for text in (self.prompt, self.negative_prompt):
            extract_extra_networks(text)  # raises on a malformed <lora:…> tag before any work is queued
        # features in registry order: a later one may read an earlier one's normalised options
        for i, feature in enumerate(FEATURES):
            options = feature.validate(self.features[i], self)
            object.__setattr__(self, "features", self.features[:i] + (options,) + self.features[i + 1:])

    def options(self, feature: "Feature"):
        return self.features[FEATURES.index(feature)]

    def active(self) -> list["Feature"]:
        """The features that change this run, in registry order."""
        return [feature for feature in FEATURES if feature.active_in(self)]

    def __getattr__(self, name: str):
        # only reached for names that are not core fields: a feature's flat keyword
        if name.startswith("__") or name == "features":
            raise AttributeError(name)
        try:
            feature = owner_of(name)
        except ValueError:
            raise AttributeError(f"GenerationRequest has no field {name!r}") from None
        return getattr(self.options(feature), name)

    def flat(self) -> dict[str, Any]:
        """Every field as the flat keywords ``GenerationRequest(**flat)`` takes."""
        core = {name: getattr(self, name) for name in CORE_FIELDS}
        for options in self.features:
            core.update({f.name: getattr(options, f.name) for f in dataclasses.fields(options)})
        return core

    def replace(self, **changes) -> "GenerationRequest":
        return GenerationRequest(**{**self.flat(), **changes})


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: torch.Tensor  # final latents as the U-Net sees them (scaled by the VAE's scaling_factor)
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    subseeds: list[int] | None = None  # the variation seeds used, when subseed_strength > 0
    extra: dict = field(default_factory=dict)
