"""Prompt styles: ``styles=["Ink", "Moody"]`` names rows of AUTOMATIC1111's ``styles.csv`` whose text is
merged into the prompt and negative prompt before they are read (``text/styles.py``).

The styles come from the model's library, ``sd.styles``: ``sd.styles.load("styles.csv")`` in Python;
``--styles-file FILE`` on the command line, where without it a ``styles.csv`` in the current folder is
read when ``--style`` names one (A1111 keeps it in its own folder); ``torchsd serve --styles-file FILE``
or ``<models-dir>/styles.csv`` for the server. As AUTOMATIC1111 does, the infotext holds the prompts with
the styles applied and no style names, so it makes the same image again without the styles file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .base import A1111Fields, Feature, GenerationRequest, StableDiffusion

DEFAULT_STYLES_FILE = "styles.csv"


@dataclass(frozen=True)
class StylesOptions:
    styles: tuple[str, ...] = ()  # names in the styles file, applied in order


class Styles(Feature):
    name = "styles"
    Options = StylesOptions

    def validate(self, options: StylesOptions, request: GenerationRequest) -> StylesOptions:
        styles = options.styles
        if isinstance(styles, str) or not all(isinstance(name, str) for name in styles):
            raise ValueError(f"styles must be a list of style names, e.g. ['Ink', 'Moody']; got {styles!r}")
        return StylesOptions(tuple(styles))

    def active(self, options: StylesOptions) -> bool:
        return bool(options.styles)

    def expand_prompts(self, sd: StableDiffusion, request: GenerationRequest, prompt: str,
                       negative_prompt: str) -> tuple[str, str]:
        return sd.styles.apply(request.styles, prompt, negative_prompt)

    # --- interfaces -------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--style", dest="styles", action="append", default=[], metavar="NAME",
                            help="a prompt style from the styles file; repeat for several, applied in order")
        parser.add_argument("--styles-file", type=Path, default=None, metavar="FILE",
                            help=f"AUTOMATIC1111's styles.csv (default: {DEFAULT_STYLES_FILE} in the current "
                                 f"folder, when --style is given)")

    def configure_model(self, sd: StableDiffusion, args: argparse.Namespace) -> None:
        path = getattr(args, "styles_file", None)
        if path is None and getattr(args, "styles", None) and Path(DEFAULT_STYLES_FILE).is_file():
            path = Path(DEFAULT_STYLES_FILE)
        if path is not None:
            sd.styles.load(path)

    def from_arguments(self, args: argparse.Namespace) -> dict:
        return {"styles": tuple(args.styles)} if getattr(args, "styles", None) else {}

    def from_a1111(self, fields: A1111Fields) -> dict:
        styles = fields.get("styles", [])
        if not isinstance(styles, list) or not all(isinstance(name, str) for name in styles):
            raise fields.error(f"styles must be a list of style names; got {styles!r}")
        return {"styles": tuple(styles)} if styles else {}

    def a1111_info(self, request: GenerationRequest, subseeds: list[int] | None) -> dict:
        return {"styles": list(request.styles)}


STYLES = Styles()
