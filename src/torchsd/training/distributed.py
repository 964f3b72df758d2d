"""PyTorch DDP or FSDP2 (``fully_shard``, with ``--fsdp``) through torchrun: NCCL on GPUs, gloo on CPUs.
torchsd adds no engine of its own.

Single machine:  torchrun --nproc_per_node 2 -m torchsd train unet ...
Several machines (run on each, same --rdzv-endpoint):
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
           --rdzv-id myrun -m torchsd train unet ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device: str | None = None) -> Distributed:
    """Join the process group that torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DistributedBatchSampler(Sampler[list[int]]):
    """Global batches from a seeded permutation per epoch; each rank takes every world_size-th item.

    Batch k of the run is a pure function of (seed, k): resuming at step k needs no saved state, and
    the union of the ranks' shares equals the single-process batch of the same global size."""

    def __init__(self, dataset_size: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start_step: int, total_steps: int):
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} must be divisible by the number of processes {world_size}")
        if dataset_size < global_batch:
            raise ValueError(f"the dataset has {dataset_size} items, fewer than one batch of {global_batch}")
        self.n, self.batch, self.rank, self.world = dataset_size, global_batch, rank, world_size
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.per_epoch = dataset_size // global_batch

    def global_batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return perm[k * self.batch:(k + 1) * self.batch].tolist()

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.global_batch(step)[self.rank::self.world]

    def __len__(self) -> int:
        return self.total - self.start


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, keeping the gradient path to the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


# --- FSDP2 ------------------------------------------------------------------------------------------------
# Checkpoints hold full (unsharded) tensors in the layout a single process writes (the optimizer's state by
# parameter index), so a run can be resumed with or without --fsdp and on any number of processes.

def shard(model: torch.nn.Module, units: list[torch.nn.Module]) -> None:
    """``fully_shard`` each unit (its weights gathered just for its own forward and backward), then the rest
    with the root."""
    from torch.distributed.fsdp import fully_shard

    for unit in units:
        fully_shard(unit)
    fully_shard(model)


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict:
    """The sharded model's whole state dict on rank 0 (on the CPU); empty elsewhere. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full())


def _optimizer_names(model: torch.nn.Module) -> list[str]:
    """The optimizer's parameters by name, in the order the loop gave them (its indices)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state on rank 0, keyed by parameter index as ``optimizer.state_dict()``; empty
    elsewhere. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full())
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(model))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``full_optimizer_state``'s layout (or a single process's) into a sharded model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_names(model)
    by_name = {"state": {names[int(i)]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
