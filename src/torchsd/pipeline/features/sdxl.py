"""SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): besides the prompt, the U-Net is told the size
the training image had before it was scaled (original size), where it was cropped (crop top-left) and the
size it was made at (target size); the refiner is told an aesthetic score instead of the target size.
Each number becomes 256 sinusoidal features; beside the pooled text they form the added vector ``y``
(``models.unet.added_vector``) that the U-Net sums into its time embedding.

Defaults as diffusers' StableDiffusionXLPipeline (``_get_add_time_ids``): original = target = the image size,
crop (0, 0); the negative prompt gets the positive numbers unless negative ones are given (then a missing
negative size is the positive one and the negative crop is (0, 0)); aesthetic score 6.0, negative 2.5. Sizes are
(height, width), as diffusers takes them; the JSON names are diffusers' (AUTOMATIC1111 has no such fields).
On the command line and in the infotext sizes are WIDTHxHEIGHT like every other size.

The negative prompt: an empty one is all zeros, context and pooled (diffusers' ``force_zeros_for_empty_prompt``
of the base model; AUTOMATIC1111 zeroes it too). Not for the refiner, whose published config turns it off.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import torch

from ...diffusion.denoisers import Condition
from ...models.unet import added_vector
from .base import (
    MAX_SIDE,
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

Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class SDXLOptions:
    original_size: Size | None = None  # (height, width); None: the image's
    crops_coords_top_left: tuple[int, int] = (0, 0)  # (top, left)
    target_size: Size | None = None  # (height, width); None: the image's
    aesthetic_score: float = 6.0  # the refiner's, in place of the target size
    negative_original_size: Size | None = None  # None: the positive one's
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: Size | None = None
    negative_aesthetic_score: float = 2.5


# (option, infotext key, kind): sizes are written WIDTHxHEIGHT, the crop "top,left"
INFOTEXT = [("original_size", "Original size", "size"), ("crops_coords_top_left", "Crop top left", "pair"),
            ("target_size", "Target size", "size"), ("aesthetic_score", "Aesthetic score", "number"),
            ("negative_original_size", "Negative original size", "size"),
            ("negative_crops_coords_top_left", "Negative crop top left", "pair"),
            ("negative_target_size", "Negative target size", "size"),
            ("negative_aesthetic_score", "Negative aesthetic score", "number")]


class SDXLConditioning(Feature):
    name = "sdxl"
    Options = SDXLOptions

    def validate(self, options: SDXLOptions, request: GenerationRequest) -> SDXLOptions:
        changes = {}
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
            value = getattr(options, name)
            if value is not None:
                if len(value) != 2 or not all(isinstance(v, int) and 1 <= v <= 4 * MAX_SIDE for v in value):
                    raise ValueError(f"{name} must be (height, width) in pixels, each 1..{4 * MAX_SIDE}; got {value!r}")
                changes[name] = tuple(value)
        for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
            value = getattr(options, name)
            if value is not None:
                if len(value) != 2 or not all(isinstance(v, int) and 0 <= v <= 4 * MAX_SIDE for v in value):
                    raise ValueError(f"{name} must be (top, left) in pixels, each 0..{4 * MAX_SIDE}; got {value!r}")
                changes[name] = tuple(value)
        return replace(options, **changes)

    def active(self, options: SDXLOptions) -> bool:
        return options != SDXLOptions()

    # --- the run: step 2 -------------------------------------------------------------------------------
    def micro_conditions(self, sd: StableDiffusion, request: GenerationRequest, run: Run, negative: bool
                         ) -> list[float]:
        """The numbers diffusers' ``_get_add_time_ids`` makes, for the positive or the negative prompt."""
        o = request.options(self)
        image = (run.height, run.width)
        original, crop, target = o.original_size or image, o.crops_coords_top_left, o.target_size or image
        score = o.aesthetic_score
        # diffusers' text-to-image pipeline gives the negative prompt the positive numbers unless negative sizes
        # are given; then the negative crop is its own, (0, 0) by default
        own = any(v is not None for v in (o.negative_original_size, o.negative_target_size,
                                          o.negative_crops_coords_top_left))
        if negative and own:
            original = o.negative_original_size or original
            crop = o.negative_crops_coords_top_left or (0, 0)
            target = o.negative_target_size or target
        if negative:
            score = o.negative_aesthetic_score
        last = [score] if sd.config.family == "sdxl_refiner" else list(target)
        return [*original, *crop, *last]

    def condition(self, sd: StableDiffusion, request: GenerationRequest, run: Run, conditioning, negative: bool):
        """``text.conditioning.Conditioning`` -> what the denoiser takes: the context alone (SD 1/2), or a
        ``Condition`` with SDXL's added vector."""
        if not sd.config.is_sdxl:
            return conditioning.context
        context = conditioning.context.to(sd.dtype)
        pooled = conditioning.pooled
        prompts = run.negative_prompts if negative else run.prompts
        if negative and sd.config.family == "sdxl" and all(p == "" for p in prompts):
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        numbers = torch.tensor([self.micro_conditions(sd, request, run, negative)] * pooled.shape[0],
                               dtype=torch.float32, device=pooled.device)
        y = added_vector(pooled.float(), numbers, sd.config.unet.micro_condition_dim)
        return Condition(context, y.to(sd.dtype))

    # --- interfaces -------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run: Run, index: int) -> dict:
        o, default = request.options(self), SDXLOptions()
        params = {}
        for name, key, kind in INFOTEXT:
            value = getattr(o, name)
            if value == getattr(default, name):
                continue
            params[key] = ("{1}x{0}".format(*value) if kind == "size" else "{},{}".format(*value) if kind == "pair"
                           else number(value))
        return params

    def from_infotext(self, params: dict[str, str]) -> dict:
        fields = {}
        for name, key, kind in INFOTEXT:
            if key not in params:
                continue
            if kind == "size":
                size = parse_size_value(params[key], key)
                fields[name] = None if size is None else (size[1], size[0])
            elif kind == "pair":
                try:
                    top, left = (int(v) for v in params[key].split(","))
                except ValueError:
                    raise ValueError(f"infotext {key}: expected TOP,LEFT; got {params[key]!r}") from None
                fields[name] = (top, left)
            else:
                fields[name] = parse_number(params, key, float)
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser  # the CLI already gives each feature its own argument group
        for name, _, kind in INFOTEXT:
            flag = "--" + name.replace("_", "-").replace("crops-coords-", "crop-")
            if kind == "size":
                group.add_argument(flag, dest=name, type=size_argument, default=None, metavar="WxH",
                                   help=f"SDXL {name.replace('_', ' ')} (default: the image size)")
            elif kind == "pair":
                group.add_argument(flag, dest=name, type=_pair, default=None, metavar="TOP,LEFT",
                                   help=f"SDXL {name.replace('_', ' ')} (default: 0,0)")
            else:
                group.add_argument(flag, dest=name, type=float, default=getattr(SDXLOptions(), name),
                                   help="SDXL refiner's aesthetic score")

    def from_arguments(self, args: argparse.Namespace) -> dict:
        fields = {}
        for name, _, kind in INFOTEXT:
            value = getattr(args, name, None)
            if value is None:
                continue
            fields[name] = (value[1], value[0]) if kind == "size" else value  # WxH -> (height, width)
        return fields

    def from_json(self, body: dict) -> dict:
        return {name: tuple(body[name]) if isinstance(body[name], list) else body[name]
                for name in self.json_names() if body.get(name) is not None}

    def from_a1111(self, fields: A1111Fields) -> dict:
        return self.from_json(fields.body)  # diffusers' names: A1111 has no fields of its own for these


def _pair(text: str) -> tuple[int, int]:
    try:
        top, left = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT in pixels, e.g. 0,0; got {text!r}") from None
    return top, left


SDXL = SDXLConditioning()
