"""``torchsd generate --prompts FILE``: a prompts file's images, batched, resumable, split over torchrun ranks.

The file's format and the batching are ``pipeline/batch.py``; this module is the command around them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..pipeline.batch import Job, batches, generate_batch, read_prompts


def add_prompts_arguments(p) -> None:
    p.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="one prompt per line, or JSON lines with per-image parameters; --output is then a folder")
    p.add_argument("--max-batch", type=int, default=4, help="with --prompts: images per U-Net call (default 4)")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run_prompts_file(args) -> int:
    from ..pipeline.infotext import save_png
    from .flags import load_model, request_from_args

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
