"""The one training loop every task uses: data, DDP or FSDP2, AdamW with warm-up, accumulation, bf16 autocast,
EMA, atomic checkpoints with exact resumption, a progress bar, a metrics CSV and sample grids."""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import random
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..checkpoints.io import atomic_path, remove_stale_temporaries
from .config import TrainConfig, write_toml
from .distributed import (
    Distributed,
    DistributedBatchSampler,
    full_model_state,
    full_optimizer_state,
    load_full_optimizer_state,
    setup,
    shard,
    teardown,
)

STATE_FILE = "state.pt"


class Task(Protocol):
    """What a trainable thing provides to the loop."""

    model: nn.Module  # the trainable module (wrapped in DDP by the loop)
    use_ema: bool

    def dataset(self) -> Dataset: ...  # items: (index, image or latent, [control image,] caption)
    def loss(self, model: nn.Module, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...
    def sample(self, model: nn.Module, path: Path) -> None: ...  # write a sample grid PNG
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...
    def export(self, model: nn.Module, output: Path) -> list[Path]: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...
    def after_step(self, step: int) -> None: ...
    # optional: param_groups(model) -> the optimizer's groups (a group's "lr" overrides config.lr), or None for the
    # default: one group of every parameter that requires a gradient


class EMA:
    """Exponential moving average of weights, with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for ema, live in zip(self.model.parameters(), model.parameters()):
            ema.lerp_(live.detach(), 1 - decay)


def _rng_state() -> dict:
    keys, pos = np.random.get_state()[1:3]
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "python": list(random.getstate()[1])}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def run(config: TrainConfig, make_task, device: str | None = None) -> dict[str, float]:
    """Train ``make_task(config, dist)`` for ``config.steps`` steps; returns the final evaluation."""
    dist = setup(device)
    try:
        return _run(config, make_task, dist)
    finally:
        teardown()


def _run(config: TrainConfig, make_task, dist: Distributed) -> dict[str, float]:
    out = config.output_dir
    state_path = out / STATE_FILE
    if state_path.exists() and not config.resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or choose another --output")
    if config.resume and not state_path.exists():
        raise ValueError(f"--resume: no checkpoint {state_path} to resume from")
    if dist.is_main:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        write_toml(config, out / "config.toml")
        if config.resume:  # a run killed while writing a checkpoint or a grid left its temporary file
            for folder in (out, out / "samples"):
                remove_stale_temporaries(folder)
    torch.manual_seed(config.seed)
    task = make_task(config, dist)
    model = task.model.to(dist.device)
    ema = EMA(model, config.ema_decay) if task.use_ema and config.ema_decay > 0 else None
    state = torch.load(state_path, map_location="cpu", weights_only=True) if config.resume else None
    if state is not None:  # whole tensors: loaded before any sharding
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
    # FSDP2: each rank holds a shard of the weights, gradients, optimizer state (and EMA); rank 0 keeps a plain
    # copy that the gathered weights are loaded into for samples, the evaluation and the export
    fsdp = config.fsdp and dist.enabled
    plain = copy.deepcopy(model) if fsdp and dist.is_main else None
    if fsdp:
        shard(model, task.shard_units(model))
        if ema is not None:
            shard(ema.model, task.shard_units(ema.model))
    groups = getattr(task, "param_groups", lambda _: None)(model) or \
        [{"params": [p for p in model.parameters() if p.requires_grad]}]
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))

    start = 0
    if state is not None:
        if fsdp:
            load_full_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        task.load_extra_state(state["task"])
        _restore_rng(state["rng"])
        start = state["step"]

    def evaluation_model() -> nn.Module | None:
        """The EMA (or the model) whole: under FSDP gathered by every rank into rank 0's plain copy, else None
        on the other ranks."""
        source = ema.model if ema is not None else model
        if not fsdp:
            return source
        whole = full_model_state(source)
        if plain is None:
            return None
        plain.load_state_dict(whole)
        return plain

    trained = DistributedDataParallel(model) if dist.enabled and not fsdp else model
    dataset = task.dataset()
    sampler = DistributedBatchSampler(len(dataset), config.batch_size, dist.rank, dist.world_size, config.seed,
                                      start, config.steps)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")

    def checkpoint(step: int) -> None:
        if fsdp:  # every rank takes part in gathering the whole tensors
            weights, moments = full_model_state(model), full_optimizer_state(model, optimizer)
            average = full_model_state(ema.model) if ema else {}
        elif dist.is_main:
            weights, moments = model.state_dict(), optimizer.state_dict()
            average = ema.model.state_dict() if ema else {}
        if not dist.is_main:
            return
        state = {"step": step, "model": weights, "optimizer": moments, "schedule": schedule.state_dict(),
                 "ema": average, "task": task.extra_state(), "rng": _rng_state()}
        with atomic_path(state_path) as tmp:
            torch.save(state, tmp)

    bar = _progress(config.steps, start) if dist.is_main else None
    metrics_file = out / "metrics.csv"
    t0, seen = time.perf_counter(), 0
    step = start
    for batch in loader:
        model.train()
        micro = _split(batch, config.grad_accum)
        logs: dict[str, float] = {}
        for i, part in enumerate(micro):
            sync = i == len(micro) - 1
            if fsdp:
                model.set_requires_gradient_sync(sync)  # FSDP's no_sync: reduce-scatter after the last part
            with autocast, (trained.no_sync() if dist.enabled and not fsdp and not sync else contextlib.nullcontext()):
                loss, logs = task.loss(trained, part, step)
                (loss / len(micro)).backward()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower --lr or use fp32")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        task.after_step(step)
        if ema is not None:
            ema.update(model, step)
        step += 1
        seen += len(batch[0]) * dist.world_size
        if dist.is_main:
            rate = seen / (time.perf_counter() - t0)
            row = {"step": step, "loss": loss_value, "lr": schedule.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "images_per_s": rate, **logs}
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.1f}")
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                _log(metrics_file, row)
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint(step)
        if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
            eval_model = evaluation_model()
            if dist.is_main:
                task.sample(eval_model, out / "samples" / f"step-{step:06d}.png")
    if bar is not None:
        bar.close()
    dist.barrier()
    results: dict[str, float] = {}
    eval_model = evaluation_model()
    if dist.is_main:
        results = task.evaluate(eval_model)
        paths = task.export(eval_model, out)
        _log(out / "eval.csv", {"step": step, **results})
        print(f"trained {config.task} for {step} steps: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        for path in paths:
            print(f"wrote {path}")
    return results


def collate(items):
    """(index, tensor, ..., caption) items -> (indices, stacked tensor, ..., captions)."""
    indices, *tensors, captions = zip(*items)
    return (list(indices), *(torch.stack(t) for t in tensors), list(captions))


def _split(batch, parts: int):
    if parts == 1:
        return [batch]
    size = math.ceil(len(batch[0]) / parts)
    return [tuple(part[i:i + size] for part in batch) for i in range(0, len(batch[0]), size)]


def _progress(total: int, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


def _log(path: Path, row: dict) -> None:
    new = not path.exists()
    fields = list(row) if new else next(csv.reader(open(path)))
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


class Indexed(Dataset):
    """(index, image, caption) items (or (index, image, control, caption)), so per-sample randomness can be keyed
    by the index."""

    def __init__(self, dataset: Dataset, limit: int | None = None):
        self.dataset = dataset
        self.length = min(len(dataset), limit) if limit else len(dataset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return (index, *self.dataset[index])

    def geometry(self, index: int):
        """SDXL's micro-conditioning of the item (``data.item_geometry``): None where it was made at its size."""
        from .data import item_geometry

        return item_geometry(self.dataset, index)


def lr_factor(config: TrainConfig, step: int) -> float:
    """The lr multiplier after ``step`` optimizer steps: linear warm-up, constant, then (``decay_steps``) a
    linear fall to 0 at ``steps``. The decay depends only on the final step count, so a constant-lr run can
    be resumed with more steps and a decay at its end."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.decay_steps == 0:
        return warm
    return min(warm, max(0.0, (config.steps - step) / config.decay_steps))


def save_grid(images: list, path: Path, columns: int = 8, captions: list[str] | None = None) -> None:
    """Tile PIL images into one PNG (written atomically)."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (w * min(columns, len(images)), h * rows), (0, 0, 0))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
