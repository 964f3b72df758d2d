"""Prompt editing, alternation and composable prompts, as AUTOMATIC1111's web UI reads them.

Editing: ``[from:to:when]`` uses ``from`` up to step ``when``, then ``to``; ``[to:when]`` adds ``to`` after
``when``; ``[from::when]`` removes ``from`` after it. A ``when`` written with a decimal point is a fraction of
the steps (``0.5``, ``.25``), one without is a step number (``5``). Brackets nest.
Alternation: ``[cat|dog]`` switches every step (cat, dog, cat …); an option may be empty (``[fe|]male``).
Composable diffusion: ``a cat :1.2 AND a dog :0.8`` is two prompts whose guided differences add up, each
with its weight (``AND`` in capitals, as a word).

This is the grammar of A1111's ``modules/prompt_parser.py`` (its Earley grammar read by a small recursive
parser): a bracket that is not one of these constructs stays text for the attention parser
(``text.prompts``) to read, and a prompt it cannot read at all (a ``|`` outside brackets) is kept whole.
A hires pass has its own schedule over its own steps: there a step number counts from the end of the
first pass (``[a:b:25]`` after 20 first-pass steps is step 5 of the second) and a fraction of ``1.x`` is
the fraction ``0.x`` of the second pass, as in AUTOMATIC1111.

No torch here: the schedules are lists of ``(last_step, text)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

_NUMBER = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*]")
_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class _Unreadable(Exception):
    """The prompt is not in the grammar: it is used as it is."""


@dataclass
class _Scheduled:
    before: list  # None-free: [] when absent
    after: list
    when: str  # as written; turned into a step by ``_step_of``


@dataclass
class _Alternate:
    options: list[list]


def _parse_sequence(text: str, i: int) -> tuple[list, int]:
    """A1111's ``prompt``: plain text, whitespace and bracketed constructs, up to a character that ends it."""
    nodes: list = []
    while i < len(text):
        c = text[i]
        if c == "\\":
            if i + 1 >= len(text):
                raise _Unreadable
            nodes.append(text[i:i + 2])
            i += 2
        elif c in "([":
            parsed = _parse_bracket(text, i)
            if parsed is None:
                return nodes, i
            node, i = parsed
            nodes.append(node)
        elif c in ")]:|":
            return nodes, i
        else:
            nodes.append(c)
            i += 1
    return nodes, i


def _parse_bracket(text: str, i: int):
    """The construct opening at ``text[i]``, or None where there is none (the bracket is then plain text)."""
    first, j = _parse_sequence(text, i + 1)
    at = text[j] if j < len(text) else ""
    if text[i] == "(":  # emphasis: kept as written, for the attention parser
        if at == ")":
            return ["(", *first, ")"], j + 1
        if at == ":":
            second, k = _parse_sequence(text, j + 1)
            if k < len(text) and text[k] == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None
    if at == "]":
        return ["[", *first, "]"], j + 1
    if at == "|":
        options = [first]
        while j < len(text) and text[j] == "|":
            option, j = _parse_sequence(text, j + 1)
            options.append(option)
        if j < len(text) and text[j] == "]":
            return _Alternate(options), j + 1
        return None
    if at == ":":
        number = _NUMBER.match(text, j + 1)
        if number:  # [to:when]
            return _Scheduled([], first, number.group(1)), number.end()
        second, k = _parse_sequence(text, j + 1)
        if k < len(text) and text[k] == ":":
            number = _NUMBER.match(text, k + 1)
            if number:  # [from:to:when]
                return _Scheduled(first, second, number.group(1)), number.end()
    return None


@lru_cache(maxsize=256)
def _parsed(prompt: str) -> tuple | None:
    """The parse of a prompt, or None where it is not in the grammar (or nests deeper than Python recurses)."""
    try:
        return tuple(_parse(prompt))
    except (_Unreadable, RecursionError):
        return None


def _parse(prompt: str) -> list:
    """A1111's ``start``: sequences, with brackets and colons that open nothing kept as text."""
    nodes: list = []
    i = 0
    while i < len(prompt):
        sequence, i = _parse_sequence(prompt, i)
        nodes += sequence
        if i < len(prompt):
            if prompt[i] == "|":
                raise _Unreadable
            nodes.append(prompt[i])
            i += 1
    return nodes


def _steps_of(nodes: list, resolve) -> set[int]:
    """Every step at which some part of the prompt changes (A1111's ``collect_steps``)."""
    found: set[int] = set()
    for node in nodes:
        if isinstance(node, _Scheduled):
            step = resolve(node.when)
            if step >= 1:
                found.add(step)
            found |= _steps_of(node.before, resolve) | _steps_of(node.after, resolve)
        elif isinstance(node, _Alternate):
            found.add(-1)  # every step
            for option in node.options:
                found |= _steps_of(option, resolve)
        elif isinstance(node, list):
            found |= _steps_of(node, resolve)
    return found


def _text_at(nodes: list, step: int, resolve) -> str:
    """The prompt at ``step`` (1-based, A1111's ``at_step``)."""
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            parts.append(_text_at(node.before if step <= resolve(node.when) else node.after, step, resolve))
        elif isinstance(node, _Alternate):
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, resolve))
        else:
            parts.append(_text_at(node, step, resolve))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """``[(last_step, text), …]``: ``text`` is the prompt up to and including step ``last_step`` (1-based, as
    A1111's ``get_learned_conditioning_prompt_schedules`` writes it; see ``text_at_step`` for how a sampler
    step picks its entry). With ``hires_steps``, the schedule of the hires pass (first pass: ``steps``)."""
    if hires_steps is None:
        int_offset, fraction_offset, total = 0, 0.0, steps
    else:
        int_offset, fraction_offset, total = steps, 1.0, hires_steps

    def resolve(when: str) -> int:
        value = float(when)
        value = (value - fraction_offset) * total if "." in when else value - int_offset
        return min(total, int(value))

    nodes = _parsed(prompt)
    if nodes is None:
        return [(total, prompt)]
    changes = _steps_of(nodes, resolve)
    every = range(1, total + 1) if -1 in changes else ()
    points = sorted({total} | {s for s in changes if s >= 1} | set(every))
    return [(step, _text_at(nodes, step, resolve)) for step in points]


def text_at_step(schedule: list[tuple[int, str]], step_index: int) -> str:
    """The entry a sampler step uses: the first whose ``last_step`` is at least the 0-based step index
    (A1111's ``reconstruct_cond_batch``, so ``[a:b:3]`` over 10 steps gives ``a`` to the first 4 steps)."""
    for last_step, text in schedule:
        if step_index <= last_step:
            return text
    return schedule[-1][1]


def has_schedule(prompt: str) -> bool:
    """Whether the prompt holds an edit (``[a:b:when]``) or an alternation (``[a|b]``) that the grammar reads."""
    if "[" not in prompt:
        return False
    nodes = _parsed(prompt)
    return nodes is not None and _has_construct(nodes)


def _has_construct(nodes: list) -> bool:
    return any(isinstance(n, (_Scheduled, _Alternate)) or isinstance(n, list) and _has_construct(n) for n in nodes)


def split_composable(prompt: str) -> list[tuple[str, float]]:
    """``a cat :1.2 AND a dog`` -> ``[("a cat", 1.2), (" a dog", 1.0)]``: A1111's sub-prompts with their weights
    (a trailing ``:number`` is the weight; the text keeps its leading space, as A1111 keeps it)."""
    result = []
    for subprompt in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.search(subprompt)
        text, weight = match.groups() if match is not None else (subprompt, None)
        result.append((text, float(weight) if weight is not None else 1.0))
    return result


def is_composable(prompt: str) -> bool:
    """Whether the prompt needs composable diffusion: an ``AND``, or a ``:weight`` at its end."""
    parts = split_composable(prompt)
    return len(parts) > 1 or parts[0] != (prompt.rstrip(), 1.0)
