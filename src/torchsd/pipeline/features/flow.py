"""The options only flow-matching models (SD 3 / 3.5, FLUX.1) read: FLUX.1-dev's distilled guidance and a
schedule shift in place of the model's own. Their run is ``pipeline/flow_run.py``; an SD 1/2 or SDXL model
given them refuses, saying why.

``distilled_cfg_scale``: the guidance scale FLUX.1-dev was distilled to take as an input (embedded like a
timestep); one network call per step, unlike classifier-free guidance. Default 3.5 (diffusers' and Forge's);
its infotext key is Forge's "Distilled CFG Scale". ``flow_shift``: the timestep shift s of
t' = s t / (1 + (s - 1) t) (SD 3: 3.0; FLUX.1-dev's shift otherwise follows the image size)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion, number, parse_number

DEFAULT_DISTILLED_CFG = 3.5


@dataclass(frozen=True)
class FlowOptions:
    distilled_cfg_scale: float | None = None  # FLUX.1-dev only; None: 3.5
    flow_shift: float | None = None  # None: the model's schedule


class Flow(Feature):
    name = "flow"
    Options = FlowOptions

    def validate(self, options: FlowOptions, request: GenerationRequest) -> FlowOptions:
        for name in ("distilled_cfg_scale", "flow_shift"):
            value = getattr(options, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        if options.distilled_cfg_scale is not None and options.distilled_cfg_scale < 0:
            raise ValueError(f"distilled_cfg_scale must be >= 0 (FLUX.1-dev's default is 3.5); got "
                             f"{options.distilled_cfg_scale}")
        if options.flow_shift is not None and options.flow_shift <= 0:
            raise ValueError(f"flow_shift must be positive (1 = no shift, SD 3 uses 3); got {options.flow_shift}")
        return options

    def active(self, options: FlowOptions) -> bool:
        return options.distilled_cfg_scale is not None or options.flow_shift is not None

    def prepare(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> None:
        # reached only in the U-Net run: the flow run reads these options itself
        raise ValueError("distilled_cfg_scale and flow_shift are options of flow-matching models (SD 3 / 3.5, "
                         "FLUX.1); this model is a U-Net one (SD 1/2 or SDXL): drop them")

    def infotext_params(self, sd, request, run, index) -> dict:
        options = request.options(self)
        return {"Distilled CFG Scale": number(options.distilled_cfg_scale)
                if options.distilled_cfg_scale is not None else None,
                "Shift": number(options.flow_shift) if options.flow_shift is not None else None}

    def from_infotext(self, params: dict[str, str]) -> dict:
        fields = {}
        if "Distilled CFG Scale" in params:
            fields["distilled_cfg_scale"] = parse_number(params, "Distilled CFG Scale", float)
        if "Shift" in params:
            fields["flow_shift"] = parse_number(params, "Shift", float)
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--distilled-cfg", dest="distilled_cfg_scale", type=float, default=None,
                            help="FLUX.1-dev: the guidance scale it takes as an input (default 3.5)")
        parser.add_argument("--shift", dest="flow_shift", type=float, default=None,
                            help="SD 3 / FLUX.1: timestep shift in place of the model's (SD 3: 3)")

    def from_a1111(self, fields: A1111Fields) -> dict:
        # Forge's field name; "flow_shift" by our own
        return {"distilled_cfg_scale": fields.float("distilled_cfg_scale"), "flow_shift": fields.float("flow_shift")}

    def a1111_unused(self, sd: StableDiffusion, request: GenerationRequest) -> dict:
        # Forge's clients send distilled_cfg_scale (3.5) with every request, whatever the model; Forge reads it
        # only where the model embeds guidance. A value typed in Python or on the command line is refused there
        # instead: it would change nothing, and the user meant it to
        embedded = getattr(sd.config, "guidance_embedded", False)
        if request.options(self).distilled_cfg_scale is not None and not embedded:
            return {"distilled_cfg_scale": None}
        return {}


FLOW = Flow()
