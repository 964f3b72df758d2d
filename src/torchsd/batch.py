"""Many images from a prompts file: ``torchsd generate --prompts FILE``.

The file holds one prompt per line, or one JSON object per line with per-image parameters
(``{"prompt": "a cat", "steps": 20, "seed": 7, "count": 2, "output": "cat.png"}``); blank lines and
lines starting with ``#`` are skipped. Every image is a job with a fixed output path
(``00000.png``, ``00001.png`` … in file order, unless the line names one), so:

- prompts that share a shape (size, steps, sampler, guidance …) go through the U-Net together, up to
  ``--max-batch`` images per call;
- each image is written as soon as its batch is decoded, atomically;
- jobs whose output already exists are skipped, so an interrupted run continues where it stopped;
- under ``torchrun --nproc_per_node N`` rank 0 lists the jobs still to do and hands each rank every
  N-th of them (over gloo), so no image is made twice or missed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .diffusion.noise import make_generators, randn, random_seed
from .diffusion.samplers import build_sigmas, initial_noise_scale, resolve_sampler
from .images import tensor_to_pil
from .pipeline import GenerationRequest, RunExtras
from .text.prompts import extract_extra_networks

# per-line keys: GenerationRequest fields that make sense in a file, plus "count" and "output"
LINE_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "sampler", "scheduler",
               "eta", "seed", "clip_skip")
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
            except ValueError as err:
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
    """Plain text-to-image: no init image, mask, hires pass, variation seed, CLIP guidance or LoRA, whose
    per-run set-up the pipeline does for one request at a time. Other requests run alone."""
    return (request.batch_size == 1 and request.init_image is None and request.mask is None and not request.hires
            and request.latents is None and request.subseed_strength == 0 and request.seed_resize_from is None
            and request.clip_guidance_scale == 0 and not request.loras
            and not extract_extra_networks(request.prompt)[1] and not extract_extra_networks(request.negative_prompt)[1])


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
    guided = first.guidance_scale != 1.0
    conditions = [(_condition(sd, r.prompt, first.clip_skip), _condition(sd, r.negative_prompt, first.clip_skip)
                   if guided else None) for r in requests]
    by_length: dict[tuple, list[int]] = {}
    for k, (cond, uncond) in enumerate(conditions):
        key = (cond.context.shape[1], uncond.context.shape[1] if uncond is not None else 0)
        by_length.setdefault(key, []).append(k)
    images, infotexts = [None] * len(requests), [None] * len(requests)
    for indices in by_length.values():
        group = [requests[k] for k in indices]
        cond = torch.cat([conditions[k][0].context for k in indices]).to(sd.dtype)
        uncond = torch.cat([conditions[k][1].context for k in indices]).to(sd.dtype) if guided else None
        pictures = _sample_and_decode(sd, group, cond, uncond)
        for k, picture in zip(indices, pictures):
            used = conditions[k][0].embeddings + (conditions[k][1].embeddings if guided else [])
            extras = RunExtras(embeddings=list({e.name: e for e in used}.values()))
            width, height = picture.size
            images[k] = picture
            infotexts[k] = sd.infotext(requests[k], requests[k].seed, width, height, extras)
    return images, infotexts


def _condition(sd, prompt: str, clip_skip: int | None):
    return sd.condition([extract_extra_networks(prompt)[0]], clip_skip)  # as the pipeline reads a prompt


def _sample_and_decode(sd, requests: list[GenerationRequest], cond: torch.Tensor, uncond: torch.Tensor | None):
    first = requests[0]
    spec, scheduler = resolve_sampler(first.sampler, first.scheduler)
    width, height = first.width or sd.config.sample_size, first.height or sd.config.sample_size
    seeds = [r.seed for r in requests]
    generators = make_generators(seeds)
    sigmas = build_sigmas(sd.config.schedule, first.steps, spec, scheduler)
    f = sd.config.vae.downscale_factor
    shape = (len(requests), sd.config.vae.latent_channels, height // f, width // f)
    x = randn(shape, generators).to(sd.device) * initial_noise_scale(sigmas, spec)
    latents = sd.sample(first, x, sigmas, cond, uncond, generators, seeds=seeds)
    return tensor_to_pil(sd.decode_latents(latents))


# --- the command ---------------------------------------------------------------------------------

def add_prompts_arguments(p) -> None:
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="one prompt per line, or JSON lines with per-image parameters; --output is then a folder")
    p.add_argument("--max-batch", type=int, default=4, help="with --prompts: images per U-Net call (default 4)")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_prompts_file(args) -> int:
    from .cli import load_model, request_from_args
    from .infotext import save_png

    if not 1 <= args.max_batch <= 64:
        raise ValueError(f"--max-batch must be between 1 and 64; got {args.max_batch}")
    if args.batch_size != 1:
        raise ValueError('--batch does not apply to --prompts; put "count": N on a JSON line instead')
    output_dir = args.output or Path("outputs")
    if output_dir.suffix.lower() == ".png":
        raise ValueError(f"with --prompts, --output is a folder for the images; got {str(output_dir)!r}")
    defaults = request_from_args(argparse_defaults(args))
    jobs = read_prompts(args.prompts, defaults, output_dir, first_seed=args.seed)

    rank, world = distributed_rank()
    pending = _pending(jobs, rank, world)
    mine = pending[rank::world]
    if world > 1 and torch.cuda.is_available() and args.device is None:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = 0
    if mine:
        sd = load_model(args)
        for batch in batches(mine, args.max_batch):
            images, infotexts = generate_batch(sd, [job.request for job in batch])
            for job, image, infotext in zip(batch, images, infotexts):
                save_png(image, job.output, infotext)
                print(f"{job.output}  (seed {job.request.seed})", flush=True)
            done += len(batch)
    seconds = time.perf_counter() - start
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    print(f"{prefix}{done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.3f} images/s); "
          f"{len(jobs) - len(pending)} of {len(jobs)} already existed", flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def argparse_defaults(args):
    """``args`` with an empty prompt where --prompts replaces the positional one."""
    import argparse

    return argparse.Namespace(**{**vars(args), "prompt": args.prompt or ""})


def _pending(jobs: list[Job], rank: int, world: int) -> list[Job]:
    """The jobs whose output does not exist yet. Under torchrun every rank uses rank 0's view, so
    that a file appearing meanwhile cannot make two ranks split different lists."""
    if world == 1:
        return [job for job in jobs if not job.output.exists()]
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # coordination only: a handful of small messages
    box = [[i for i, job in enumerate(jobs) if not job.output.exists()] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return [jobs[i] for i in box[0]]
