"""What a generation feature is: its options, and what it does in each interface and at each step of a run.

A feature (image-to-image, inpainting, hires fix, variation seeds, LoRA, CLIP guidance …) is one module
holding one ``Feature`` subclass. The pipeline, the infotext reader and writer, the CLI and both HTTP APIs
iterate over the registry in ``features/__init__.py``; none of them names a feature's fields. Every hook
has a do-nothing default, so a feature overrides only the steps it touches.

The options are a frozen dataclass whose field names are the flat keyword arguments of
``sd.generate(...)`` (``hires_scale``, ``mask_blur`` …): a name is unique across features, which lets the
request be built from, and read back as, flat keywords.
"""

from __future__ import annotations

import argparse
import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from ...diffusion.schedulers import img2img_start

if TYPE_CHECKING:
    from ...diffusion.denoisers import Denoise

# The pipeline and the request import the features, so the features name them through these aliases
# (pipeline.model.StableDiffusion, pipeline.request.GenerationRequest) rather than by importing them.
StableDiffusion = Any
GenerationRequest = Any

MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_BATCH = 64


def noised_ve(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x = x0 + sigma * noise: the level sigma of the U-Net samplers' (variance-exploding) variable."""
    return x0 + noise * sigma


@dataclass
class Run:
    """One run's resolved plan and what features found out on the way (for later steps and the infotext).

    The plan (``spec`` … ``shape``) is fixed in step 1; features may change the size in ``prepare``
    (an inpainting canvas) before the shape is computed."""

    spec: Any  # diffusion.samplers.SamplerSpec
    scheduler: Any  # diffusion.schedulers.Scheduler
    seeds: list[int]
    generators: list[torch.Generator]
    width: int
    height: int
    sigmas: torch.Tensor | None = None
    shape: tuple[int, ...] = ()
    prompts: list[str] = field(default_factory=list)  # per image, extra-network tags removed
    negative_prompts: list[str] = field(default_factory=list)
    # the text context (B, T, W), or for SDXL a diffusion.denoisers.Condition: context + added vector y
    cond: Any = None
    uncond: Any = None
    concat: torch.Tensor | None = None  # extra U-Net input channels (inpainting models)
    noise: Callable[[], torch.Tensor] | None = None  # unit initial noise, drawn when called (order of draws)
    embeddings: list = field(default_factory=list)  # textual-inversion embeddings the prompts used
    sample: Callable[..., torch.Tensor] | None = None  # (x, sigmas) -> latents: the run's sampler loop again
    state: dict[str, Any] = field(default_factory=dict)  # per feature name: what it keeps between steps
    prompt: str | None = None  # the request's prompts as the run reads them (styles applied), as typed
    negative_prompt: str | None = None
    hires_steps: int | None = None  # while a hires pass samples: its steps (prompt schedules count over them)
    model: Any = None  # the denoiser model of the current sampler loop: sd.denoiser, or a feature's (ControlNet)
    # how the model family starts an image-to-image loop (run.py: the U-Net's; flow_run.py: rectified flow's):
    # ``levels(steps)``, a loop's levels for run.shape; the first of them that a strength keeps; and clean
    # latents brought to a level with unit noise
    levels: Callable[[int], torch.Tensor] | None = None
    img2img_start: Callable[[int, float], int] = img2img_start
    noised: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = noised_ve

    @property
    def batch_size(self) -> int:
        return len(self.seeds)


class A1111Fields:
    """Typed readers for an AUTOMATIC1111 JSON body: clients send nulls, ints as floats and so on.
    ``image(name)`` decodes a base64 image within the server's limits; ``width``/``height`` are the
    request's; ``img2img`` tells the endpoint. ``find_model(name)``: the server's name for a model of its
    list that a field names (the refiner), raising when there is none; None where there is no list."""

    def __init__(self, body: dict, *, img2img: bool, width: int | None, height: int | None,
                 decode_image: Callable[[object, str], Any], error: type[ValueError] = ValueError,
                 find_model: Callable[[str], str] | None = None):
        self.body, self.img2img, self.width, self.height = body, img2img, width, height
        self.decode_image, self.error, self.find_model = decode_image, error, find_model

    def get(self, name: str, default=None):
        value = self.body.get(name)
        return default if value is None else value

    def int(self, name: str, default: int | None = None) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not value.is_integer()):
            raise self.error(f"{name} must be an integer; got {value!r}")
        return int(value)

    def float(self, name: str, default: float | None = None) -> float | None:
        import math

        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(f"{name} must be a finite number; got {value!r}")
        return float(value)

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name, default)
        if value is not None and not isinstance(value, str):
            raise self.error(f"{name} must be a string; got {type(value).__name__}")
        return value

    def bool(self, name: str, default: bool = False) -> bool:
        return bool(self.get(name, default))


class Feature:
    """The base of every feature; the defaults do nothing."""

    name: str = ""
    Options: type = type(None)  # a frozen dataclass, field names = flat keyword names
    binary_names: tuple[str, ...] = ()  # options that hold images: not set by name from JSON

    # --- the request --------------------------------------------------------------------------------
    def defaults(self):
        return self.Options()

    def flat_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.Options))

    def validate(self, options, request: GenerationRequest):
        """Check (and normalise) ``options`` against the whole request; raise ``ValueError`` saying how to
        fix a bad value. Returns the options to keep."""
        return options

    def active(self, options) -> bool:
        """Whether the feature changes this run at all."""
        return False

    def active_in(self, request: GenerationRequest) -> bool:
        """Whether the feature changes this run: by default its options say; a feature that reads the prompt
        text (prompt editing) looks at the whole request."""
        return self.active(request.options(self))

    # --- the run --------------------------------------------------------------------------------------
    def model_context(self, sd: StableDiffusion, request: GenerationRequest, run: Run
                      ) -> AbstractContextManager:
        """Held around the whole run (LoRA: merged weights, restored afterwards)."""
        return nullcontext()

    def prepare(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> None:
        """After the plan, before the prompts are encoded: may change ``run.width``/``height``."""

    def expand_prompts(self, sd: StableDiffusion, request: GenerationRequest, prompt: str,
                       negative_prompt: str) -> tuple[str, str]:
        """Before step 2: the prompts the run reads instead of the request's (styles); they are written in
        the infotext."""
        return prompt, negative_prompt

    def cut_sigmas(self, sigmas: torch.Tensor, sd: StableDiffusion, request: GenerationRequest, run: Run
                   ) -> torch.Tensor:
        """Step 1, after the levels are built: the levels the first sampler loop visits (the refiner's
        hand-off keeps the first part and samples the rest itself in ``after_sampling``)."""
        return sigmas

    def encode_prompts(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> bool:
        """Step 2 for a feature that reads the prompts' own syntax (prompt editing, ``AND``): encode
        ``run.prompts``/``run.negative_prompts`` itself, set ``run.cond``/``run.uncond`` to the first step's
        contexts and return True; the first active feature that does so replaces the plain encode."""
        return False

    def wrap_model(self, model, sd: StableDiffusion, request: GenerationRequest, run: Run, sigmas: torch.Tensor):
        """Step 4, first: the model ``(x, sigma, context, concat) -> x0`` that guidance calls, for the sampler
        loop over ``sigmas``; a feature that changes every U-Net call (ControlNet's residuals) wraps it."""
        return model

    def guidance(self, sd: StableDiffusion, request: GenerationRequest, run: Run, sigmas: torch.Tensor,
                 observer=None) -> "Denoise | None":
        """Step 4: the guided denoiser over ``sigmas`` (the levels this sampler loop visits) in place of
        plain classifier-free guidance over ``run.cond``/``run.uncond``; None keeps the plain one. The
        features' ``wrap_denoiser`` wrap what it returns."""
        return None

    def wrap_denoiser(self, denoise: "Denoise", sd: StableDiffusion, request: GenerationRequest,
                      run: Run) -> "Denoise":
        return denoise

    def after_sampling(self, latents: torch.Tensor, sd: StableDiffusion, request: GenerationRequest,
                       run: Run, *, progress: bool = False, callback=None) -> torch.Tensor:
        return latents

    def finish_images(self, pictures: list, run: Run) -> list:
        return pictures

    # --- the infotext (AUTOMATIC1111's keys) ----------------------------------------------------------
    def infotext_params(self, sd: StableDiffusion, request: GenerationRequest, run: Run, index: int) -> dict:
        return {}

    def infotext_prompt_suffix(self, request: GenerationRequest, run: Run) -> str:
        return ""

    def from_infotext(self, params: dict[str, str]) -> dict:
        """Infotext keys -> flat keywords (text-to-image: images are not in an infotext)."""
        return {}

    # --- the command line ------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags whose ``dest`` is the flat keyword name (``--from IMAGE`` relies on it)."""

    def configure_model(self, sd: StableDiffusion, args: argparse.Namespace) -> None:
        """After the CLI loaded the model (LoRA and embedding folders)."""

    def from_arguments(self, args: argparse.Namespace) -> dict:
        """Parsed flags -> flat keywords; by default every flat name the parser has."""
        return {name: getattr(args, name) for name in self.flat_names() if hasattr(args, name)}

    # --- JSON by name (the OpenAI API's extra fields, a prompts file's lines) -----------------------------
    def json_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.flat_names() if name not in self.binary_names)

    def from_json(self, body: dict) -> dict:
        """The flat keywords a JSON object sets by their own names (lists stand for tuples)."""
        return {name: body[name] for name in self.json_names() if body.get(name) is not None}

    # --- the AUTOMATIC1111 API -------------------------------------------------------------------------
    def from_a1111(self, fields: A1111Fields) -> dict:
        """A txt2img/img2img JSON body -> flat keywords."""
        return {}

    def a1111_info(self, request: GenerationRequest, subseeds: list[int] | None) -> dict:
        """Fields of the response's ``info`` JSON (A1111's ``Processed.js()``)."""
        return {}

    def a1111_unused(self, sd: StableDiffusion, request: GenerationRequest) -> dict:
        """Once an A1111 job's model is known: flat keywords set back to their defaults because Forge-style
        clients send them with every request and this model does not read them (Forge ignores them there);
        the Python API and the CLI refuse them instead."""
        return {}


def number(value: float) -> int | float:
    """4.0 -> 4, as AUTOMATIC1111 writes whole numbers; 0.5 stays 0.5."""
    return int(value) if float(value).is_integer() else value


def parse_size_value(value: str, key: str) -> tuple[int, int] | None:
    """'512x768' from an infotext; None for A1111's "-1x-1" (unset)."""
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"infotext {key}: expected WIDTHxHEIGHT; got {value!r}") from None
    return (width, height) if width > 0 and height > 0 else None


def parse_number(params: dict[str, str], key: str, kind: type):
    try:
        return kind(params[key])
    except ValueError:
        raise ValueError(f"infotext {key}: expected a number; got {params[key]!r}") from None


def size_argument(text: str) -> tuple[int, int]:
    """An argparse type for WIDTHxHEIGHT."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512 (WIDTHxHEIGHT); got {text!r}") from None
    return width, height
