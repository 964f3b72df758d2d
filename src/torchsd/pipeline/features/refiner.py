"""Base then refiner (SDXL): the base model samples the first part of the schedule and a second model (SDXL's
refiner) the rest, from the base's latents at that level: AUTOMATIC1111's ``refiner_checkpoint`` and
``refiner_switch_at`` (the fraction of the steps the base takes), diffusers' ``denoising_end`` /
``denoising_start`` hand-off. The refiner encodes the prompts itself (its own encoder and micro-conditioning:
the aesthetic score) and is loaded once per path and kept on the pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import torch

from .base import A1111Fields, Feature, GenerationRequest, Run, StableDiffusion, number, parse_number


@dataclass(frozen=True)
class RefinerOptions:
    refiner_checkpoint: str | None = None  # a model path (the server: a name from its model list)
    refiner_switch_at: float = 0.8  # the fraction of the steps the first model takes


class Refiner(Feature):
    name = "refiner"
    Options = RefinerOptions

    def validate(self, options: RefinerOptions, request: GenerationRequest) -> RefinerOptions:
        if options.refiner_checkpoint and not (math.isfinite(options.refiner_switch_at)
                                               and 0.0 < options.refiner_switch_at < 1.0):
            raise ValueError(f"refiner_switch_at must be between 0 and 1 (the fraction of the steps the first "
                             f"model takes); got {options.refiner_switch_at}")
        return options

    def active(self, options: RefinerOptions) -> bool:
        return bool(options.refiner_checkpoint)

    def switch_index(self, request: GenerationRequest, levels: int) -> int:
        """How many of the ``levels - 1`` steps the first model takes (at least one, and one is left)."""
        steps = levels - 1
        return min(max(1, round(request.refiner_switch_at * steps)), steps - 1) if steps > 1 else steps

    def cut_sigmas(self, sigmas: torch.Tensor, sd: StableDiffusion, request: GenerationRequest, run: Run
                   ) -> torch.Tensor:
        """The first model's levels; the refiner's rest waits in ``run.state``."""
        k = self.switch_index(request, len(sigmas))
        run.state[self.name] = sigmas[k:]
        return sigmas[:k + 1]

    def refiner_model(self, sd: StableDiffusion, request: GenerationRequest) -> StableDiffusion:
        from ..model import StableDiffusion as Pipeline  # imported on use: the pipeline imports the features

        loaded = sd.__dict__.setdefault("refiners", {})
        name = request.refiner_checkpoint
        if name not in loaded:
            if sd.model_loader is not None:  # the runtime's (same device, dtype, speed-ups) or the server's
                loaded[name] = sd.model_loader(name)
            else:
                loaded[name] = Pipeline.from_checkpoint(name, device=sd.device, dtype=sd.dtype)
        return loaded[name]

    def after_sampling(self, latents: torch.Tensor, sd: StableDiffusion, request: GenerationRequest, run: Run,
                       *, progress: bool = False, callback=None) -> torch.Tensor:
        from .. import run as steps  # the run's own steps, with the refiner in place of the first model
        from .sdxl import SDXL

        sigmas = run.state.get(self.name)
        if sigmas is None or len(sigmas) < 2:
            return latents
        refiner = self.refiner_model(sd, request)
        if refiner.config.vae.latent_channels != sd.config.vae.latent_channels:
            raise ValueError(f"refiner {request.refiner_checkpoint}: its latents have "
                             f"{refiner.config.vae.latent_channels} channels, the first model's "
                             f"{sd.config.vae.latent_channels}: they cannot hand over")
        cond = refiner.condition(run.prompts)
        uncond = refiner.condition(run.negative_prompts) if run.uncond is not None else None
        second = dataclasses.replace(run, cond=SDXL.condition(refiner, request, run, cond, negative=False),
                                     uncond=None if uncond is None else
                                     SDXL.condition(refiner, request, run, uncond, negative=True))
        x = latents * (1 + sigmas[0].item() ** 2) ** 0.5  # back from the U-Net's latents to x at sigmas[0]
        return steps.sample(refiner, request, second, x, sigmas, progress=progress, callback=callback)

    # --- interfaces -------------------------------------------------------------------------------------
    def infotext_params(self, sd, request, run: Run, index: int) -> dict:
        from pathlib import Path

        return {"Refiner": Path(request.refiner_checkpoint).stem,
                "Refiner switch at": number(request.refiner_switch_at)}

    def from_infotext(self, params: dict[str, str]) -> dict:
        # the infotext names the refiner, not its file: --from keeps the switch point, --refiner names the file
        if "Refiner switch at" not in params:
            return {}
        return {"refiner_switch_at": parse_number(params, "Refiner switch at", float)}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--refiner", dest="refiner_checkpoint", default=None, metavar="MODEL",
                            help="a second model (SDXL's refiner) that takes over for the last steps")
        parser.add_argument("--refiner-switch-at", dest="refiner_switch_at", type=float, default=0.8,
                            help="the fraction of the steps the first model takes (default 0.8)")

    def json_names(self) -> tuple[str, ...]:
        return ("refiner_switch_at",)  # a client's JSON never names a file for the server to open

    def from_a1111(self, fields: A1111Fields) -> dict:
        name = fields.str("refiner_checkpoint")
        if not name or name.strip().lower() == "none":  # A1111's page sends "None" for no refiner
            return {}
        if fields.find_model is None:  # a path is never taken from a request
            raise fields.error("refiner_checkpoint names a model from the server's list (/sdapi/v1/sd-models); "
                               "this endpoint has no model list")
        # the server's own name for it (a title from its list, never a path); unknown names are refused there
        return {"refiner_checkpoint": fields.find_model(name),
                "refiner_switch_at": fields.float("refiner_switch_at", RefinerOptions.refiner_switch_at)}

REFINER = Refiner()
