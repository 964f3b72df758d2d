"""Many images from a prompts file (``torchsd generate --prompts FILE``), batched through the run's steps.

The file holds one prompt per line, or one JSON object per line with per-image parameters
(``{"prompt": "a cat", "steps": 20, "seed": 7, "count": 2, "output": "cat.png"}``); blank lines and
lines starting with ``#`` are skipped. Every image is a job with a fixed output path
(``00000.png``, ``00001.png`` … in file order, unless the line names one), so:

- prompts that share a shape (size, steps, sampler, guidance …) go through the U-Net together, up to
  ``--max-batch`` images per call;
- each image is written as soon as its batch is decoded, atomically;
- jobs whose output already exists are skipped, so an interrupted run continues where it stopped;
- under ``torchrun --nproc_per_node N`` rank 0 lists the jobs still to do and hands each rank every
  N-th of them (over gloo), so no image is made twice or missed (``cli/prompts_file.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.denoisers import cat_conditions
from ..diffusion.samplers import resolve_sampler
from ..noise import random_seed
from ..text.prompts import extract_extra_networks
from . import run as steps
from .features import FEATURES
from .features.lora import LORA
from .infotext import infotext_for
from .request import GenerationRequest

# per-line keys: the core request fields that make sense in a file, every feature's options by name (a
# line with any of those runs alone), plus "count" and "output"
LINE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "scheduler",
               "eta", "seed", "clip_skip") + tuple(name for feature in FEATURES for name in feature.json_names())
MAX_COUNT = 1000


@dataclass(frozen=True)
class Job:
    request: GenerationRequest  # one image, seed fixed
    output: Path


def read_prompts(path: str | Path, defaults: GenerationRequest, output_dir: Path,
                 first_seed: int | None = None) -> list[Job]:
    """Parse the prompts file into jobs. ``defaults`` fills what a line leaves out; with
    ``first_seed`` the k-th image of the file gets seed first_seed + k, otherwise a random one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {str(path)!r} does not exist; give a text file with one prompt per line")
    jobs: list[Job] = []
    names: set[Path] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields, count, output = _parse_line(line, f"{path}:{number}")
        for i in range(count):
            k = len(jobs)
            seed = fields.get("seed")
            seed = seed + i if seed is not None else (first_seed + k if first_seed is not None else random_seed())
            try:
                request = defaults.replace(**{**fields, "seed": seed, "batch_size": 1})
            except (ValueError, TypeError) as err:  # TypeError: a value of the wrong kind
                raise ValueError(f"{path}:{number}: {err}") from None
            name = Path(output) if output and count == 1 else \
                Path(f"{Path(output).stem}-{i + 1}.png") if output else Path(f"{k:05d}.png")
            target = output_dir / name
            if target in names:
                raise ValueError(f"{path}:{number}: output {str(name)!r} is used twice; give each line its own")
            names.add(target)
            jobs.append(Job(request, target))
    if not jobs:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts (blank lines and # comments are skipped)")
    return jobs


def _parse_line(line: str, where: str) -> tuple[dict, int, str | None]:
    if not line.startswith("{"):
        return {"prompt": line}, 1, None
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); write one JSON object per line, "
                         f'e.g. {{"prompt": "a cat", "steps": 20}}') from None
    if not isinstance(fields, dict) or not isinstance(fields.get("prompt"), str):
        raise ValueError(f'{where}: a JSON line needs a "prompt" string, e.g. {{"prompt": "a cat"}}')
    unknown = set(fields) - set(LINE_FIELDS) - {"count", "output"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}; "
                         f"valid keys: {', '.join(LINE_FIELDS)}, count, output")
    count = fields.pop("count", 1)
    if not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise ValueError(f"{where}: count must be an integer between 1 and {MAX_COUNT}; got {count!r}")
    output = fields.pop("output", None)
    if output is not None and (not isinstance(output, str) or Path(output).name != output
                               or not output.lower().endswith(".png")):
        raise ValueError(f"{where}: output must be a plain file name ending in .png; got {output!r}")
    return fields, count, output


def shape_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share U-Net calls: everything but prompts and seeds matches."""
    spec, scheduler = resolve_sampler(request.sampler, request.scheduler)
    return (request.width, request.height, request.steps, request.guidance_scale, spec.name, scheduler.name,
            request.eta, request.clip_skip)


def batchable(request: GenerationRequest) -> bool:
    """Plain text-to-image: one image, no given latents, and no feature that changes the run (no init image,
    mask, hires pass, variation seed, CLIP guidance or LoRA), whose per-run set-up the pipeline does for
    one request at a time. Other requests run alone."""
    return (request.batch_size == 1 and request.latents is None and all(f is LORA for f in request.active())
            and not request.loras and not extract_extra_networks(request.prompt)[1]
            and not extract_extra_networks(request.negative_prompt)[1])


def batches(jobs: list[Job], max_batch: int) -> list[list[Job]]:
    """Group batchable jobs by shape (in order of first appearance), then cut each group into batches;
    other jobs form batches of one."""
    groups: dict[tuple, list[Job]] = {}
    for n, job in enumerate(jobs):
        key = shape_key(job.request) if batchable(job.request) else ("alone", n)
        groups.setdefault(key, []).append(job)
    return [group[i:i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]


@torch.no_grad()
def generate_batch(sd, requests: list[GenerationRequest]):
    """Text-to-image for plain requests of one shape in one sampling loop, one image per request, so
    that image k equals ``sd.generate(requests[k])`` up to float rounding. Prompts are encoded one by
    one (a batch would pad short prompts to the longest's chunk count and change them); prompts of
    different lengths go through separate loops. A single request that is not plain runs through
    ``sd.run``. Returns (PIL images, infotexts) in the order of ``requests``."""
    if len(requests) == 1 and not batchable(requests[0]):
        result = sd.run(requests[0])
        return result.images, result.infotexts
    first = requests[0]
    if not all(batchable(r) for r in requests) or any(shape_key(r) != shape_key(first) for r in requests):
        raise ValueError("generate_batch needs plain one-image requests of the same shape (see shape_key)")
    requests = [r if r.seed is not None else r.replace(seed=random_seed()) for r in requests]
    # 2. each prompt alone, then grouped by the length of its context
    encoded = []
    for request in requests:
        alone = steps.plan(sd, request)
        steps.encode_prompts(sd, request, alone, [request.prompt], [request.negative_prompt])
        encoded.append(alone)
    by_length: dict[tuple, list[int]] = {}
    for k, alone in enumerate(encoded):
        key = (alone.cond.shape[1], alone.uncond.shape[1] if alone.uncond is not None else 0)
        by_length.setdefault(key, []).append(k)
    images, infotexts = [None] * len(requests), [None] * len(requests)
    for indices in by_length.values():
        # 1. one plan for the group, its seeds those of the requests
        run = steps.plan(sd, first, seeds=[requests[k].seed for k in indices])
        steps.schedule(sd, first, run)
        run.cond = cat_conditions([encoded[k].cond for k in indices]).to(sd.dtype)
        guided = encoded[indices[0]].uncond is not None
        run.uncond = cat_conditions([encoded[k].uncond for k in indices]).to(sd.dtype) if guided else None
        x = steps.start_latents(sd, first, run)  # 3.
        steps.extra_inputs(sd, run)
        latents = steps.sample(sd, first, run, x, run.sigmas)  # 4.-5.
        pictures = steps.finish(sd, first, run, latents, steps.decode(sd, latents)).images  # 7.-8.
        for k, picture in zip(indices, pictures):
            images[k] = picture
            infotexts[k] = infotext_for(sd, requests[k], encoded[k], 0)
    return images, infotexts
