"""Generation parameters in AUTOMATIC1111's "infotext" format, stored in a PNG ``parameters`` chunk.

    a red circle
    Negative prompt: blurry
    Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model hash: 0123456789, Model: tiny

A value holding ``,`` ``:`` or a newline is JSON-quoted.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, PngImagePlugin

from .checkpoints.io import atomic_path


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n\"") else text


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None))
    return "\n".join(lines)


def _split_params(line: str) -> list[tuple[str, str]]:
    """Split 'A: 1, B: "x, y", C: 3' respecting JSON-quoted values."""
    pairs, i = [], 0
    while i < len(line):
        colon = line.find(":", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        j = colon + 1
        while j < len(line) and line[j] == " ":
            j += 1
        if j < len(line) and line[j] == '"':
            value, end = json.JSONDecoder().raw_decode(line, j)
            j = end
        else:
            end = line.find(",", j)
            end = len(line) if end < 0 else end
            value, j = line[j:end].strip(), end
        pairs.append((key, value))
        comma = line.find(",", j)
        i = len(line) if comma < 0 else comma + 1
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """Infotext -> {"prompt", "negative_prompt", and every "Key": "value"} (values as strings)."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 or "Steps: " in lines[-1] else ""
    body = lines[:-1] if params_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    result.update(_split_params(params_line))
    return result


def read_png_infotext(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG (tEXt or iTXt), or None."""
    with Image.open(path) as image:
        image.load()
        return image.text.get("parameters") if hasattr(image, "text") else image.info.get("parameters")


def save_png(image: Image.Image, path: str | Path, infotext: str | None) -> None:
    """Write the PNG atomically, so a failure never leaves a half-written file behind."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_itxt("parameters", infotext) if not infotext.isascii() else info.add_text("parameters", infotext)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
