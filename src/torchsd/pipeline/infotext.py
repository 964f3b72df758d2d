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

from ..checkpoints.io import atomic_path
from .features import FEATURES, Run
from .features.base import parse_number, parse_size_value


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


# --- a run's infotext, and back from an infotext to a request ----------------------------------------------

def infotext_for(sd, request, run: Run, index: int) -> str:
    """The infotext of image ``index`` of a run: the core keys, then each active feature's."""
    params = {
        "Steps": request.steps, "Sampler": run.spec.label, "Schedule type": run.scheduler.label,
        "CFG scale": request.guidance_scale, "Seed": run.seeds[index], "Size": f"{run.width}x{run.height}",
        "Model hash": sd.model_hash, "Model": sd.name,
        "Clip skip": request.clip_skip if request.clip_skip not in (None, 1) else None,
        "Eta": request.eta if request.eta else None,
    }
    active = request.active()
    for feature in active:
        params.update(feature.infotext_params(sd, request, run, index))
    params["Version"] = "torchsd"
    typed = request.prompt if run.prompt is None else run.prompt  # as typed, styles applied
    negative_prompt = request.negative_prompt if run.negative_prompt is None else run.negative_prompt
    prompt = typed + "".join(feature.infotext_prompt_suffix(request, run) for feature in active)
    return format_infotext(prompt, negative_prompt, params)


def request_fields(text: str) -> dict[str, object]:
    """Infotext -> ``GenerationRequest`` keyword arguments (text-to-image; keys torchsd does not use are
    left out). The prompt keeps its ``<lora:…>`` tags, which bring the LoRAs back by name."""
    params = parse_infotext(text)
    fields: dict[str, object] = {"prompt": params["prompt"], "negative_prompt": params["negative_prompt"]}
    numbers = {"Steps": ("steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
               "Clip skip": ("clip_skip", int), "Eta": ("eta", float)}
    for key, (name, kind) in numbers.items():
        if key in params:
            fields[name] = parse_number(params, key, kind)
    if "Sampler" in params:
        sampler = params["Sampler"]
        schedule = params.get("Schedule type", "")
        if schedule and schedule.lower() not in ("automatic", "uniform"):
            sampler = f"{sampler} {schedule}"  # e.g. "DPM++ 2M" + "Karras"
        fields["sampler"] = sampler
    if "Size" in params:
        size = parse_size_value(params["Size"], "Size")
        if size is not None:
            fields["width"], fields["height"] = size
    for feature in FEATURES:
        fields.update(feature.from_infotext(params))
    return fields
