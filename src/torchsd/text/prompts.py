"""Prompt syntax as AUTOMATIC1111's web UI reads it: attention weights, BREAK, and ``<lora:…>`` tags.

Weights: ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:1.3)`` multiplies by 1.3, nesting
multiplies, ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal, and brackets left open apply up to the end::

    a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).
    -> 'a ' 1.0 | 'house' 1.573 | ' ' 1.1 | 'on' 1.0 | ' a ' 1.1 | 'hill' 0.55 | ', sun, ' 1.1 | 'sky' 1.4641 | '.' 1.1

``BREAK`` (upper case, as a word) ends the current 75-token chunk. Extra networks such as
``<lora:name:0.8>`` are cut out of the text before any of this (``extract_extra_networks``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One token of the attention syntax per match; a ``(x:1.3)`` weight is captured when its ``)`` is read.
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes (a lone backslash is dropped)
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|       # ':1.3)' closes a round bracket with an explicit weight
\)|]|
[^\\()\[\]:]+|                # plain text
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one weight; ``is_break`` marks a BREAK (its text and weight are unused)."""

    text: str
    weight: float
    is_break: bool = False


BREAK = Fragment("BREAK", -1.0, is_break=True)


def parse_prompt_attention(text: str) -> list[Fragment]:
    """Split ``text`` into fragments with their attention weights (AUTOMATIC1111's grammar).

    Adjacent fragments of equal weight are merged; an empty prompt gives one empty fragment of weight 1."""
    parts: list[list] = []  # [text, weight, is_break]; mutable while brackets close
    round_open: list[int] = []  # index in ``parts`` where each open bracket started
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        # AUTOMATIC1111 also multiplies a BREAK's marker weight, which turns a BREAK inside brackets into
        # the literal word "BREAK" with a negative weight; here a BREAK stays a BREAK wherever it is
        for part in parts[start:]:
            if not part[2]:
                part[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:  # plain text, or a bracket/weight that closes nothing: kept as text
            for i, piece in enumerate(_BREAK.split(token)):
                if i > 0:
                    parts.append(["BREAK", -1.0, True])
                parts.append([piece, 1.0, False])

    for start in round_open:  # unbalanced brackets close at the end
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)

    if not parts:
        return [Fragment("", 1.0)]
    merged = [parts[0]]
    for part in parts[1:]:
        last = merged[-1]
        if not part[2] and not last[2] and part[1] == last[1]:
            last[0] += part[0]
        else:
            merged.append(part)
    return [BREAK if is_break else Fragment(text_, weight) for text_, weight, is_break in merged]


# --- extra networks: <kind:name:arg:arg…> ----------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
EXTRA_NETWORK_KINDS = ("lora",)


@dataclass(frozen=True)
class LoraTag:
    """``<lora:name>``, ``<lora:name:w>`` (text encoder and U-Net both w) or ``<lora:name:te:unet>``."""

    name: str
    text_encoder_scale: float = 1.0
    unet_scale: float = 1.0


def extract_extra_networks(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove ``<lora:…>`` tags from ``prompt``; return the remaining text and the tags in order."""
    tags: list[LoraTag] = []

    def take(match: re.Match) -> str:
        kind, args = match.group(1), match.group(2).split(":")
        if kind.lower() not in EXTRA_NETWORK_KINDS:
            raise ValueError(f"prompt tag <{match.group(0)[1:-1]}>: unknown extra network kind {kind!r}; "
                             f"torchsd reads {', '.join(f'<{k}:name:weight>' for k in EXTRA_NETWORK_KINDS)}")
        tags.append(_lora_tag(match.group(0), args))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tags


def _lora_tag(source: str, args: list[str]) -> LoraTag:
    name, numbers = args[0].strip(), args[1:]
    if not name:
        raise ValueError(f"prompt tag {source}: the LoRA name is empty; write <lora:NAME:0.8>")
    if len(numbers) > 2:
        raise ValueError(f"prompt tag {source}: too many values; write <lora:name:weight> or "
                         f"<lora:name:text_encoder_weight:unet_weight>")
    try:
        scales = [float(v) for v in numbers]
    except ValueError:
        raise ValueError(f"prompt tag {source}: weights must be numbers, e.g. <lora:{name}:0.8>") from None
    te = scales[0] if scales else 1.0
    unet = scales[1] if len(scales) > 1 else te
    return LoraTag(name, te, unet)
