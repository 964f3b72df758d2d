"""Variation seeds and seed resizing (AUTOMATIC1111's "Extra" seed options); the noise math is in
``diffusion/variation.py``. Every run's initial noise comes through ``VARIATION.noise``, which without
these options is the plain per-seed noise."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ...diffusion.variation import variation_noise
from ...noise import random_seed
from .base import MAX_SIDE, A1111Fields, Feature, GenerationRequest, Run, parse_number, parse_size_value, size_argument


@dataclass(frozen=True)
class VariationOptions:
    subseed: int | None = None  # None: random when subseed_strength > 0
    subseed_strength: float = 0.0  # 0 = the seed alone, 1 = the subseed alone
    seed_resize_from: tuple[int, int] | None = None  # (width, height): draw the seed's noise at this size


class Variation(Feature):
    name = "variation"
    Options = VariationOptions

    def validate(self, options: VariationOptions, request: GenerationRequest) -> VariationOptions:
        if options.subseed is not None and not 0 <= options.subseed < 2 ** 63:
            raise ValueError(f"subseed must be a non-negative integer below 2**63 (or None); got {options.subseed}")
        if not 0.0 <= options.subseed_strength <= 1.0:
            raise ValueError(f"subseed_strength must be between 0 (the seed alone) and 1 (the subseed alone); "
                             f"got {options.subseed_strength}")
        size = options.seed_resize_from
        if size is not None:
            if len(size) != 2 or not all(isinstance(v, int) and 8 <= v <= MAX_SIDE for v in size):
                raise ValueError(f"seed_resize_from must be (width, height), each 8..{MAX_SIDE}; got {size!r}")
            options = VariationOptions(options.subseed, options.subseed_strength, tuple(size))
        return options

    def active(self, options: VariationOptions) -> bool:
        return options.subseed_strength > 0 or options.seed_resize_from is not None

    def prepare(self, sd, request, run: Run) -> None:
        if request.subseed_strength > 0:
            first = request.subseed if request.subseed is not None else random_seed()
            run.state[self.name] = [first + i for i in range(run.batch_size)]

    def subseeds(self, run: Run) -> list[int] | None:
        return run.state.get(self.name)

    def noise(self, shape: tuple[int, ...], request: GenerationRequest, run: Run, downscale_factor: int
              ) -> torch.Tensor:
        """Unit initial noise (B, C, h, w) for the run's seeds, drawn from ``run.generators``."""
        options = request.options(self)
        return variation_noise(shape, run.seeds, run.generators, subseeds=self.subseeds(run),
                               subseed_strength=options.subseed_strength, seed_resize_from=options.seed_resize_from,
                               downscale_factor=downscale_factor)

    # --- interfaces -------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run: Run, index: int) -> dict:
        subseeds = self.subseeds(run)
        return {"Variation seed": subseeds[index] if subseeds else None,
                "Variation seed strength": request.subseed_strength if subseeds else None,
                "Seed resize from": "{}x{}".format(*request.seed_resize_from) if request.seed_resize_from else None}

    def from_infotext(self, params: dict[str, str]) -> dict:
        fields: dict = {}
        if "Variation seed strength" in params:
            fields["subseed_strength"] = parse_number(params, "Variation seed strength", float)
        if "Variation seed" in params:
            fields["subseed"] = parse_number(params, "Variation seed", int)
        if fields.get("subseed_strength") == 0:
            fields.pop("subseed", None)
        if "Seed resize from" in params:
            fields["seed_resize_from"] = parse_size_value(params["Seed resize from"], "Seed resize from")
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--subseed", type=int, default=None, help="variation seed (default: random when "
                                                                     "strength > 0)")
        parser.add_argument("--subseed-strength", type=float, default=0.0,
                            help="0 = the seed alone, 1 = the subseed alone")
        parser.add_argument("--seed-resize-from", type=size_argument, default=None, metavar="WxH",
                            help="draw the seed's noise at this size and centre it, keeping a seed's layout "
                                 "across sizes")

    def from_a1111(self, fields: A1111Fields) -> dict:
        subseed = fields.int("subseed", -1)
        width, height = fields.int("seed_resize_from_w", -1), fields.int("seed_resize_from_h", -1)
        return {"subseed": subseed if subseed is not None and subseed >= 0 else None,
                "subseed_strength": fields.float("subseed_strength", 0.0),
                "seed_resize_from": (width, height) if width > 0 and height > 0 else None}

    def a1111_info(self, request, subseeds) -> dict:
        width, height = request.seed_resize_from or (-1, -1)
        n = request.batch_size
        return {"subseed": subseeds[0] if subseeds else -1, "all_subseeds": subseeds or [-1] * n,
                "subseed_strength": request.subseed_strength, "seed_resize_from_w": width,
                "seed_resize_from_h": height}


VARIATION = Variation()
