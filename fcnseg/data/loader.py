"""The DataLoader every command uses: padded batches of whole images, reproducible shuffling and augmentation."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .transforms import pad_collate

__all__ = ["default_num_workers", "make_loader", "seed_worker"]


def default_num_workers() -> int:
    """Two workers (or fewer where the machine has fewer cores): enough to keep decoding and augmentation off the
    training loop's critical path for FCN-sized batches without oversubscribing a small machine."""
    return min(2, os.cpu_count() or 1)


def seed_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` in a worker from the torch seed the DataLoader gave it.

    torch seeds each worker with ``base_seed + worker_id`` (``base_seed`` drawn from the loader's generator, so it
    follows ``seed``). Recent torch also reseeds numpy and ``random`` in workers; doing it here states the
    guarantee explicitly rather than relying on a DataLoader internal — without it, workers forked from one
    parent would share numpy's state and repeat each other's augmentations.
    """
    seed = torch.initial_seed() % 2**32  # numpy accepts 32-bit seeds only
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    shuffle: bool = False,
    num_workers: int | None = None,
    drop_last: bool = False,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader yielding ``(images N x 3 x H x W, masks N x H x W)`` batches padded by :func:`pad_collate`.

    ``num_workers=None`` means :func:`default_num_workers` (0 loads in the main process). ``seed`` fixes the
    shuffle order and the workers' random transforms; with ``num_workers=0`` transforms draw from the global torch
    RNG instead, so seed that with ``torch.manual_seed``. ``sampler`` (e.g. a DistributedSampler) replaces
    shuffling and cannot be combined with ``shuffle=True``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sampler is not None and shuffle:
        raise ValueError("shuffle=True cannot be combined with a sampler; let the sampler shuffle (set_epoch)")
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra: dict[str, Any] = {}
    if workers > 0:
        # Persistent workers skip the process start-up at every epoch; prefetching 2 batches per worker keeps
        # both cores busy while the model runs. DataLoader rejects these options when there are no workers.
        extra = {"persistent_workers": True, "prefetch_factor": 2}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=pad_collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker,
        **extra,
    )
