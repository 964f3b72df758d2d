"""LoRA and textual-inversion embeddings (AUTOMATIC1111's "extra networks").

LoRAs come from ``loras`` = [(name or path, scale)] and from ``<lora:name:scale>`` tags in the prompts;
they are merged into the weights for the run and the exact originals restored afterwards
(``checkpoints/lora.py``). Embeddings are used by name in the prompt (``text/conditioning.py``); this
feature only records both in the infotext, so that the run can be checked and made again.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ...checkpoints.lora import AppliedLora, merged_loras
from ...text.prompts import extract_extra_networks
from .base import Feature, GenerationRequest, Run, StableDiffusion


@dataclass(frozen=True)
class LoraOptions:
    loras: tuple[tuple[str | Path, float], ...] = ()  # in addition to the prompt's <lora:…> tags


def parse_lora(text: str) -> tuple[str, float]:
    """NAME_OR_PATH[:SCALE]; a path may itself hold colons, so only a numeric last part is a scale."""
    head, _, tail = text.rpartition(":")
    if head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def request_loras(sd: StableDiffusion, request: GenerationRequest) -> list[AppliedLora]:
    """The LoRAs of ``request.loras`` and of the ``<lora:…>`` tags in its prompts, loaded and checked."""
    wanted: list[tuple[str | Path, float, float]] = [(source, scale, scale) for source, scale in request.loras]
    for text in (request.prompt, request.negative_prompt):
        wanted += [(tag.name, tag.text_encoder_scale, tag.unet_scale) for tag in extract_extra_networks(text)[1]]
    return [AppliedLora(sd.loras.load(sd.loras.resolve(source), sd), te, unet) for source, te, unet in wanted]


class Lora(Feature):
    name = "lora"
    Options = LoraOptions

    def validate(self, options: LoraOptions, request: GenerationRequest) -> LoraOptions:
        loras = []
        for item in options.loras:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (str, Path))
                    and isinstance(item[1], (int, float)) and math.isfinite(item[1])):
                raise ValueError(f"loras must be (name or path, scale) pairs, e.g. [('myLora', 0.8)]; got {item!r}")
            loras.append((item[0], float(item[1])))
        return LoraOptions(tuple(loras))

    def active(self, options: LoraOptions) -> bool:
        return True  # prompt tags and embeddings are found while the run goes

    @contextmanager
    def model_context(self, sd: StableDiffusion, request: GenerationRequest, run: Run) -> Iterator[None]:
        loras = request_loras(sd, request)  # before anything slow: unknown names fail fast
        run.state[self.name] = loras
        with merged_loras(sd, loras):  # the weights are restored bit for bit afterwards
            yield

    # --- interfaces ---------------------------------------------------------------------------------------
    def infotext_params(self, sd: StableDiffusion, request, run: Run, index: int) -> dict:
        loras = run.state.get(self.name, [])
        return {"Lora hashes": ", ".join(dict.fromkeys(f"{a.lora.name}: {sd.loras.shorthash(a.lora.path)}"
                                                       for a in loras)) or None,
                "TI hashes": ", ".join(f"{e.name}: {sd.embeddings.shorthash(e)}" for e in run.embeddings) or None}

    def infotext_prompt_suffix(self, request: GenerationRequest, run: Run) -> str:
        # LoRAs given through the API are written as prompt tags, so that the infotext alone reproduces the run
        loras = run.state.get(self.name, [])
        return "".join(f" <lora:{a.lora.name}:{scale}>" for a, (_, scale) in zip(loras, request.loras))

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--lora", dest="loras", action="append", default=[], type=parse_lora,
                            metavar="NAME_OR_PATH[:SCALE]",
                            help="apply a LoRA (repeatable); <lora:name:scale> in the prompt works too")
        parser.add_argument("--lora-dir", action="append", default=[], type=Path,
                            help="folder of LoRA files (repeatable)")
        parser.add_argument("--embeddings-dir", action="append", default=[], type=Path,
                            help="folder of textual-inversion embeddings, used by file name in prompts (repeatable)")

    def from_arguments(self, args: argparse.Namespace) -> dict:
        for folder in getattr(args, "lora_dir", []) + getattr(args, "embeddings_dir", []):
            if not folder.is_dir():  # fail before the (slow) model load
                raise ValueError(f"folder {str(folder)!r} does not exist (--lora-dir / --embeddings-dir)")
        return {"loras": tuple(getattr(args, "loras", ()))}

    def configure_model(self, sd: StableDiffusion, args: argparse.Namespace) -> None:
        for folder in getattr(args, "lora_dir", []):
            sd.loras.add_dir(folder)
        for folder in getattr(args, "embeddings_dir", []):
            sd.embeddings.add_dir(folder)


LORA = Lora()
