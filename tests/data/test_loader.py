"""make_loader: padded batches, seeded shuffling, the same batches with or without workers."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, SequentialSampler

from fcnseg.data.loader import default_num_workers, make_loader, seed_worker

SIZES = [(4, 6), (7, 3), (5, 5), (6, 8), (3, 3), (8, 4), (5, 7), (6, 6)]


class Sized(Dataset):
    """Item i: a float image filled with i + 1 and a mask filled with i, of size SIZES[i]."""

    def __len__(self) -> int:
        return len(SIZES)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = SIZES[i]
        return torch.full((3, h, w), float(i + 1)), torch.full((h, w), i, dtype=torch.int64)


class Noisy(Sized):
    """Like Sized, with one draw from each RNG (torch, numpy, random) stored in the image's first pixel."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = super().__getitem__(i)
        image[0, 0, 0] = float(torch.rand(()))
        image[1, 0, 0] = float(np.random.rand())
        image[2, 0, 0] = random.random()
        return image, mask


def _order(loader) -> list[int]:
    # Each item's mask is filled with its index; the top-left pixel is never padding.
    return [int(i) for _, masks in loader for i in masks[:, 0, 0]]


def test_batches_are_padded():
    loader = make_loader(Sized(), batch_size=3, num_workers=0)
    batches = list(loader)
    assert [tuple(images.shape) for images, _ in batches] == [(3, 3, 7, 6), (3, 3, 8, 8), (2, 3, 6, 7)]
    images, masks = batches[0]
    assert masks.dtype == torch.int64 and images.dtype == torch.float32
    assert bool((masks[0, 4:] == 255).all()) and bool((images[0, :, 4:] == 0).all())
    assert bool((masks[1, :, 3:] == 255).all()) and bool((masks[1, :, :3] == 1).all())
    assert _order(loader) == list(range(8))
    assert len(make_loader(Sized(), batch_size=3, num_workers=0, drop_last=True)) == 2


def test_shuffle_order_follows_the_seed():
    a = _order(make_loader(Sized(), batch_size=2, shuffle=True, num_workers=0, seed=1))
    b = _order(make_loader(Sized(), batch_size=2, shuffle=True, num_workers=0, seed=1))
    c = _order(make_loader(Sized(), batch_size=2, shuffle=True, num_workers=0, seed=2))
    assert a == b
    assert a != c
    assert sorted(a) == sorted(c) == list(range(8))


def test_workers_give_the_same_batches_and_seeded_worker_rngs():
    # One worker pool for both checks: starting workers is the slow part.
    ref = list(make_loader(Sized(), batch_size=2, shuffle=True, num_workers=0, seed=5))
    got = list(make_loader(Sized(), batch_size=2, shuffle=True, num_workers=2, seed=5))
    assert len(ref) == len(got) == 4
    for (ri, rm), (gi, gm) in zip(ref, got, strict=True):
        assert torch.equal(ri, gi) and torch.equal(rm, gm)

    runs = [[images[:, :, 0, 0] for images, _ in make_loader(Noisy(), batch_size=2, num_workers=2, seed=7)]]
    runs.append([images[:, :, 0, 0] for images, _ in make_loader(Noisy(), batch_size=2, num_workers=2, seed=7)])
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))  # reproducible run to run
    # Batches 0 and 1 come from different workers: every RNG (numpy and random included) must differ.
    assert bool((runs[0][0][0] != runs[0][1][0]).all())


def test_loader_settings():
    loader = make_loader(Sized(), num_workers=2)
    assert loader.persistent_workers and loader.prefetch_factor == 2
    assert loader.pin_memory == torch.cuda.is_available()
    assert make_loader(Sized()).num_workers == default_num_workers() == min(2, os.cpu_count() or 1)
    assert make_loader(Sized(), num_workers=0).num_workers == 0
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(Sized(), num_workers=-1)


def test_sampler_replaces_shuffle():
    sampler = list(reversed(range(8)))  # any iterable of indices is a sampler
    assert _order(make_loader(Sized(), batch_size=3, num_workers=0, sampler=sampler)) == sampler
    assert _order(make_loader(Sized(), num_workers=0, sampler=SequentialSampler(range(8)))) == list(range(8))
    with pytest.raises(ValueError, match="sampler"):
        make_loader(Sized(), shuffle=True, sampler=sampler)


def test_seed_worker_seeds_numpy_and_random_from_torch():
    states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        torch.manual_seed(2**40 + 3)  # larger than numpy accepts: must be reduced mod 2**32
        seed_worker(0)
        a = (np.random.rand(), random.random())
        np.random.seed((2**40 + 3) % 2**32)
        random.seed((2**40 + 3) % 2**32)
        assert a == (np.random.rand(), random.random())
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
