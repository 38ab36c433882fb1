"""Distributed training through torchrun and DDP, and a sampler that makes data order resumable.

``torchrun --nproc_per_node N -m fcnseg train ...`` takes the same flags as one process: each rank sees its slice
of every epoch, rank 0 alone logs and writes checkpoints, and confusion matrices are summed across ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..errors import FcnsegError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the current group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(obj: object) -> list[object]:
    """Every process's ``obj`` (picklable), in rank order, on every process; ``[obj]`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Where ``sync`` is false, a DDP model's backward() keeps its gradients local (``no_sync``): accumulating
    micro-batches then costs one all-reduce per optimiser step, in the last backward, instead of one per
    micro-batch, and the summed gradient is the same. Other models: nothing to do."""
    if sync or not isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


class EpochSampler(Sampler):
    """Endless ``(epoch, index)`` pairs: a seeded shuffle per epoch, this rank's share, skipping ``start`` samples.

    The order depends only on (seed, epoch), so a run resumed after ``start`` samples continues with exactly the
    samples the interrupted one would have seen; the epoch travels with each index so that random transforms can
    be seeded per sample (:class:`SeededDataset`), whatever worker process loads it.
    """

    def __init__(self, size: int, *, info: DistInfo, seed: int = 0, start: int = 0, shuffle: bool = True) -> None:
        # Every rank gets the same number of samples per epoch (steps stay in lock-step): the tail is dropped.
        self.per_rank = size // info.world_size
        if self.per_rank < 1:
            raise FcnsegError(f"--split: {size} training sample(s) cannot be shared among {info.world_size} processes")
        self.size, self.info, self.seed, self.start, self.shuffle = size, info, seed, start, shuffle

    def epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        # Interleaved shares: with batch b per process, one step of N processes sees exactly the samples one process
        # with batch N x b would see, which is what makes DDP equal to the bigger batch.
        return order[: self.per_rank * self.info.world_size][self.info.rank :: self.info.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = divmod(self.start, self.per_rank)
        while True:
            for i in self.epoch_order(epoch)[skip:]:
                yield epoch, i
            epoch, skip = epoch + 1, 0


class SeededDataset(Dataset):
    """Wraps a dataset so that item ``(epoch, i)`` is transformed with random numbers seeded from (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            return self.dataset[index]


class ShardSampler(Sampler):
    """Evaluation: rank r takes items r, r + world, ...; nothing padded or repeated, so counts stay exact."""

    def __init__(self, size: int, info: DistInfo) -> None:
        self.indices = list(range(info.rank, size, info.world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
