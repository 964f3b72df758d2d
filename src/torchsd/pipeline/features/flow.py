"""The options only flow-matching models (SD 3 / 3.5, FLUX.1) read: FLUX.1-dev's distilled guidance, a
schedule shift in place of the model's own, and SD 3.5's skip-layer guidance. Their run is
``pipeline/flow_run.py``; an SD 1/2 or SDXL model given them refuses, saying why.

``distilled_cfg_scale``: the guidance scale FLUX.1-dev was distilled to take as an input (embedded like a
timestep); one network call per step, unlike classifier-free guidance. Default 3.5 (diffusers' and Forge's; 30
for FLUX.1 Fill, BFL's and diffusers' FluxFillPipeline's);
its infotext key is Forge's "Distilled CFG Scale". ``flow_shift``: the timestep shift s of
t' = s t / (1 + (s - 1) t) (SD 3: 3.0; FLUX.1-dev's shift otherwise follows the image size).

``skip_guidance_layers`` and ``skip_layer_guidance_scale/start/stop``: skip-layer guidance ("SLG"), diffusers'
StableDiffusion3Pipeline arguments of the same names and defaults (the math is ``diffusion.flow``'s
``SkipLayerGuidance``). On with a list of joint blocks, e.g. 7, 8, 9 for SD 3.5 Medium; it adds to classifier-free
guidance, so it needs a guidance scale above 1, and FLUX.1 has none (refused there)."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion, number, parse_number

DEFAULT_DISTILLED_CFG = 3.5
DEFAULT_FILL_DISTILLED_CFG = 30.0  # FLUX.1 Fill: BFL's and diffusers' FluxFillPipeline default
SLG_KEYS = {"skip_guidance_layers": "SLG layers", "skip_layer_guidance_scale": "SLG scale",
            "skip_layer_guidance_start": "SLG start", "skip_layer_guidance_stop": "SLG stop"}


@dataclass(frozen=True)
class FlowOptions:
    distilled_cfg_scale: float | None = None  # FLUX.1-dev only; None: 3.5
    flow_shift: float | None = None  # None: the model's schedule
    skip_guidance_layers: tuple[int, ...] = ()  # SD 3.5: joint blocks left out for skip-layer guidance; () off
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01  # fractions of the steps
    skip_layer_guidance_stop: float = 0.2


def default_distilled_cfg(config) -> float | None:
    """The distilled CFG a model runs with when none is given: 3.5 for FLUX.1-dev, 30 for FLUX.1 Fill, None
    where there is no embedded guidance. ``config``: a pipeline's config."""
    if not getattr(config, "guidance_embedded", False):
        return None
    return DEFAULT_FILL_DISTILLED_CFG if config.is_inpainting else DEFAULT_DISTILLED_CFG


def parse_layers(text: str) -> tuple[int, ...]:
    """"7,8,9" or "7 8 9" (or "[7, 8, 9]") -> (7, 8, 9)."""
    parts = text.strip().strip("[]()").replace(",", " ").split()
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"skip-layer guidance layers are block numbers such as 7,8,9; got {text!r}") from None


class Flow(Feature):
    name = "flow"
    Options = FlowOptions

    def validate(self, options: FlowOptions, request: GenerationRequest) -> FlowOptions:
        for name in ("distilled_cfg_scale", "flow_shift", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                     "skip_layer_guidance_stop"):
            value = getattr(options, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        if options.distilled_cfg_scale is not None and options.distilled_cfg_scale < 0:
            raise ValueError(f"distilled_cfg_scale must be >= 0 (FLUX.1-dev's default is 3.5); got "
                             f"{options.distilled_cfg_scale}")
        if options.flow_shift is not None and options.flow_shift <= 0:
            raise ValueError(f"flow_shift must be positive (1 = no shift, SD 3 uses 3); got {options.flow_shift}")
        layers = options.skip_guidance_layers
        if isinstance(layers, str):
            layers = parse_layers(layers)
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"skip_guidance_layers must be a list of block numbers >= 0 (SD 3.5 Medium: 7, 8, 9); "
                             f"got {options.skip_guidance_layers!r}")
        if not 0 <= options.skip_layer_guidance_start < options.skip_layer_guidance_stop <= 1:
            raise ValueError(f"skip-layer guidance runs from skip_layer_guidance_start to _stop, fractions of the "
                             f"steps with 0 <= start < stop <= 1; got {options.skip_layer_guidance_start} to "
                             f"{options.skip_layer_guidance_stop}")
        return dataclasses.replace(options, skip_guidance_layers=tuple(sorted(set(layers))))

    def active(self, options: FlowOptions) -> bool:
        return (options.distilled_cfg_scale is not None or options.flow_shift is not None
                or bool(options.skip_guidance_layers))

    def prepare(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> None:
        # reached only in the U-Net run: the flow run reads these options itself
        raise ValueError("distilled_cfg_scale, flow_shift and skip_guidance_layers are options of flow-matching "
                         "models (SD 3 / 3.5, FLUX.1); this model is a U-Net one (SD 1/2 or SDXL): drop them")

    def infotext_params(self, sd, request, run, index) -> dict:
        options = request.options(self)
        params = {"Distilled CFG Scale": number(options.distilled_cfg_scale)
                  if options.distilled_cfg_scale is not None else None,
                  "Shift": number(options.flow_shift) if options.flow_shift is not None else None}
        if options.skip_guidance_layers:
            params.update({SLG_KEYS["skip_guidance_layers"]: ", ".join(map(str, options.skip_guidance_layers)),
                           **{SLG_KEYS[name]: number(getattr(options, name)) for name in
                              ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")}})
        return params

    def from_infotext(self, params: dict[str, str]) -> dict:
        fields = {}
        if "Distilled CFG Scale" in params:
            fields["distilled_cfg_scale"] = parse_number(params, "Distilled CFG Scale", float)
        if "Shift" in params:
            fields["flow_shift"] = parse_number(params, "Shift", float)
        if SLG_KEYS["skip_guidance_layers"] in params:
            fields["skip_guidance_layers"] = parse_layers(params[SLG_KEYS["skip_guidance_layers"]])
            for name in ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"):
                if SLG_KEYS[name] in params:
                    fields[name] = parse_number(params, SLG_KEYS[name], float)
        return fields

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--distilled-cfg", dest="distilled_cfg_scale", type=float, default=None,
                            help="FLUX.1-dev: the guidance scale it takes as an input (default 3.5)")
        parser.add_argument("--shift", dest="flow_shift", type=float, default=None,
                            help="SD 3 / FLUX.1: timestep shift in place of the model's (SD 3: 3)")
        parser.add_argument("--slg-layers", dest="skip_guidance_layers", type=_layers, default=None,
                            metavar="7,8,9", help="SD 3.5: skip-layer guidance away from the model without these "
                                                  "joint blocks (SD 3.5 Medium: 7,8,9; needs --cfg above 1)")
        parser.add_argument("--slg-scale", dest="skip_layer_guidance_scale", type=float, default=None,
                            help="skip-layer guidance scale (default 2.8)")
        parser.add_argument("--slg-start", dest="skip_layer_guidance_start", type=float, default=None,
                            help="skip-layer guidance from this fraction of the steps (default 0.01)")
        parser.add_argument("--slg-stop", dest="skip_layer_guidance_stop", type=float, default=None,
                            help="skip-layer guidance until this fraction of the steps (default 0.2)")

    def from_arguments(self, args: argparse.Namespace) -> dict:
        # a flag left out keeps the options' default (diffusers' 2.8, 0.01, 0.2), not None
        return {k: v for k, v in super().from_arguments(args).items() if v is not None or k in
                ("distilled_cfg_scale", "flow_shift")}

    def from_a1111(self, fields: A1111Fields) -> dict:
        # Forge's field name; "flow_shift" and the skip-layer guidance ones (diffusers' names) by our own
        out = {"distilled_cfg_scale": fields.float("distilled_cfg_scale"), "flow_shift": fields.float("flow_shift")}
        layers = fields.get("skip_guidance_layers")
        if layers is not None:
            if isinstance(layers, list):  # JSON clients send whole numbers as floats too
                layers = [int(v) if isinstance(v, float) and v.is_integer() else v for v in layers]
            out["skip_guidance_layers"] = parse_layers(layers) if isinstance(layers, str) else layers
        for name in ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"):
            value = fields.float(name)
            if value is not None:
                out[name] = value
        return out

    def a1111_unused(self, sd: StableDiffusion, request: GenerationRequest) -> dict:
        # Forge's clients send distilled_cfg_scale (3.5) with every request, whatever the model; Forge reads it
        # only where the model embeds guidance. A value typed in Python or on the command line is refused there
        # instead: it would change nothing, and the user meant it to
        embedded = getattr(sd.config, "guidance_embedded", False)
        if request.options(self).distilled_cfg_scale is not None and not embedded:
            return {"distilled_cfg_scale": None}
        return {}


def _layers(text: str) -> tuple[int, ...]:
    try:
        return parse_layers(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


FLOW = Flow()
