"""Prompt styles from AUTOMATIC1111's ``styles.csv``: named pieces of prompt and negative prompt.

The file has the columns ``name``, ``prompt`` and ``negative_prompt`` (A1111's older files call the prompt
column ``text``). A style's text holding ``{prompt}`` has the prompt put in its place; any other style
text is appended with ", " (leading and trailing spaces of both dropped, empty parts skipped). Several
styles apply in order, each to the result of the one before, to the prompt and the negative prompt alike
— AUTOMATIC1111's ``apply_styles_to_prompt``. Unlike A1111, which skips a style it does not know, an
unknown name is an error that names it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompts(style_prompt: str, prompt: str) -> str:
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def read_styles_csv(path: str | Path) -> dict[str, Style]:
    """The styles of a ``styles.csv``, by name (a later row of the same name wins, as in A1111)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"styles file {str(path)!r} does not exist; give AUTOMATIC1111's styles.csv "
                         f"(columns name, prompt, negative_prompt)")
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file, skipinitialspace=True)
        columns = set(reader.fieldnames or ())
        if "name" not in columns or not columns & {"prompt", "text"}:
            raise ValueError(f"styles file {str(path)!r} needs the columns name, prompt, negative_prompt; "
                             f"it has {', '.join(sorted(columns)) or 'none'}")
        styles = {}
        for row in reader:
            name = (row.get("name") or "").strip()
            if not name or name.startswith("#"):
                continue
            prompt = row.get("prompt") if "prompt" in columns else row.get("text")
            styles[name] = Style(name, prompt or "", row.get("negative_prompt") or "")
    return styles


class StyleLibrary:
    """The styles a model's runs may name (``sd.styles``): empty until a ``styles.csv`` is loaded."""

    def __init__(self, path: str | Path | None = None):
        self.path: Path | None = None
        self.styles: dict[str, Style] = {}
        if path is not None:
            self.load(path)

    def load(self, path: str | Path) -> "StyleLibrary":
        self.styles = read_styles_csv(path)
        self.path = Path(path)
        return self

    def check(self, names) -> None:
        """Raise ``ValueError`` naming every style that is not in the file."""
        unknown = [name for name in names if name not in self.styles]
        if not unknown:
            return
        listed = "unknown prompt style" + ("s " if len(unknown) > 1 else " ") + ", ".join(map(repr, unknown))
        if self.path is None:
            raise ValueError(f"{listed}: no styles file is loaded (torchsd generate --styles-file FILE, "
                             f"torchsd serve --styles-file FILE, or sd.styles.load(FILE))")
        known = ", ".join(map(repr, self.styles)) or "none"
        raise ValueError(f"{listed}; {self.path} has: {known}")

    def apply(self, names, prompt: str, negative_prompt: str) -> tuple[str, str]:
        self.check(names)
        for name in names:
            style = self.styles[name]
            prompt = merge_prompts(style.prompt, prompt)
            negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def as_list(self) -> list[dict]:
        """AUTOMATIC1111's ``/sdapi/v1/prompt-styles``: [{"name", "prompt", "negative_prompt"}]."""
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in self.styles.values()]
