"""Training, top to bottom: :func:`train` builds a :class:`~fcnseg.engine.run.Run`, then runs the ``while`` loop over
optimiser steps, validating and checkpointing every ``val_every`` steps.

One iteration is one optimiser step (``accum_steps`` micro-batches of ``batch_size`` images per process), as in
the paper's SGD with a minibatch of 20 images. The run's assembly is :mod:`fcnseg.engine.run`; its checkpoints,
exact resume and log are :mod:`fcnseg.engine.checkpointing`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import read_checkpoint
from ..data.base import IGNORE_INDEX, SegmentationDataset
from ..data.loader import make_loader
from ..device import pick_device
from ..errors import FcnsegError
from ..models.multi import split_heads
from .checkpointing import TrainState, save_run
from .config import TrainConfig
from .distributed import (
    DistInfo,
    EpochSampler,
    SeededDataset,
    ShardSampler,
    all_reduce_sum,
    cleanup_distributed,
    gradient_sync,
    init_distributed,
    world_size,
)
from .evaluate import evaluate_heads
from .fitting import head_classes
from .losses import pixel_loss
from .run import Run, start_run, unwrap

__all__ = ["TrainingDivergedError", "excluded_indices", "summed_loss", "train", "train_step", "validate"]


class TrainingDivergedError(FcnsegError):
    """The loss became NaN or infinite."""


# -------------------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> TrainState:
    """Run (or resume) a training run as ``cfg`` describes; returns the final state."""
    cfg = cfg.resolved()
    device = pick_device(cfg.device)
    info = init_distributed(device.type)
    try:
        run = start_run(cfg, device, info)  # with --resume: the saved weights, optimiser, RNG and data position
        cfg, state = run.cfg, run.state  # the configuration with the class weights the run trains with
        # Endless, seeded by (seed, epoch, index) alone: a resumed run sees exactly the samples and random crops the
        # interrupted one would have; under torchrun each process takes its share of every epoch.
        data = batches(run.train_ds, cfg, info, state)
        run.model.train()
        with contextlib.closing(run), _stop_on_sigint(info) as stop:
            while state.iteration < cfg.iters:
                t0 = time.perf_counter()
                # One optimiser step over accum_steps micro-batches, whose gradient is that of one batch that big:
                # the paper's minibatch of 20 images without holding them in memory at once.
                micro = [next(data) for _ in range(cfg.accum_steps)]
                loss = train_step(
                    run.model, micro, run.optimizer, run.scaler, cfg, device=device, autocast=run.autocast
                )
                if not math.isfinite(loss):  # stop before the damage reaches a checkpoint
                    raise TrainingDivergedError(_diverged_message(loss, state, run.folder))
                lr = run.optimizer.param_groups[0]["lr"]  # the rate this step used, for the log
                run.scheduler.step()
                state.iteration += 1
                _report(run, loss, lr, time.perf_counter() - t0)
                if state.iteration % cfg.val_every == 0 or state.iteration == cfg.iters:
                    validate_and_save(run)  # best.pt when the mean IU (the paper's main figure) improved; last.pt
                elif stop.is_set():  # Ctrl-C between validations: keep the steps done so far
                    save_run(run, best=False)
                if stop.is_set():
                    run.bar.close()
                    print(f"\ninterrupted at iteration {state.iteration}; saved {run.folder / 'last.pt'}; continue "
                          "with --resume", file=sys.stderr)  # fmt: skip
                    raise KeyboardInterrupt
        return state
    finally:
        cleanup_distributed()


# -------------------------------------------------------------------------------------------------------- one step


def train_step(
    model: nn.Module,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """One optimiser step over ``accum_steps`` micro-batches; returns the loss summed over this step's pixels
    (``loss_reduction`` ``sum``) or averaged over them (``mean``), as reported."""
    masks_all = [m for _, m in micro_batches]
    # The mean is taken over the valid pixels of the whole step on every process together, so that gradient
    # accumulation and DDP (which averages gradients over processes) give the gradient of one big batch (for the
    # per-pixel losses; Dice and Lovász are taken per micro-batch and per image: fcnseg.engine.losses).
    count = float(sum(int((m != IGNORE_INDEX).sum()) for m in masks_all))
    valid = all_reduce_sum(torch.tensor(count, device=device)).item()  # on the device: nccl reduces CUDA tensors
    summed = cfg.loss_reduction == "sum"
    scale = world_size() * (1.0 if summed else 1.0 / max(valid, 1.0))
    total = torch.zeros((), device=device)
    for i, (images, masks) in enumerate(micro_batches):
        # Under DDP the gradients are summed across processes once per step, in the last micro-batch's backward;
        # the earlier ones only accumulate locally (no_sync), which gives the same sum for a fraction of the traffic.
        with gradient_sync(model, i == len(micro_batches) - 1):
            with autocast():
                logits = model(images.to(device, non_blocking=True))
            loss = summed_loss(unwrap(model), logits, masks.to(device), cfg)
            scaler.scale(loss * scale).backward()
        total += loss.detach()
    total = all_reduce_sum(total) / (1.0 if summed else max(valid, 1.0))
    if not torch.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total.item()


def summed_loss(
    model: nn.Module, logits: torch.Tensor, masks: torch.Tensor, cfg: TrainConfig | None = None
) -> torch.Tensor:
    """``cfg``'s loss (cross-entropy without one) with its class weights, summed over the valid pixels
    (:mod:`fcnseg.engine.losses`), in fp32 whatever the forward pass computed in. A two-headed net (masks
    N x K x H x W) is trained with the sum of its heads' losses, the paper's SIFT Flow recipe: both label sets shape
    the one trunk; each head takes its label set's weights."""
    kind, gamma = (cfg.loss, cfg.focal_gamma) if cfg is not None else ("ce", 2.0)
    weights = (cfg.class_weight_values if cfg is not None else None) or {}

    def as_tensor(w: list[float] | None) -> torch.Tensor | None:
        return None if w is None else torch.tensor(w, dtype=torch.float32, device=logits.device)

    if masks.dim() == 3:  # one label set, whatever its name
        return pixel_loss(kind, logits.float(), masks, as_tensor(next(iter(weights.values()), None)), gamma)
    heads = split_heads(model, logits).items()
    return sum(
        pixel_loss(kind, s.float(), masks[:, k], as_tensor(weights.get(name)), gamma)
        for k, (name, s) in enumerate(heads)
    )


def batches(ds: SegmentationDataset, cfg: TrainConfig, info: DistInfo, state: TrainState) -> Iterator[Any]:
    """Endless micro-batches continuing from ``state.samples_seen`` (which they advance)."""
    sampler = EpochSampler(len(ds), info=info, seed=cfg.seed, start=state.samples_seen)
    loader = make_loader(
        SeededDataset(ds, cfg.seed),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
    )
    for images, masks in loader:
        state.samples_seen += len(images)
        yield images, masks


# ------------------------------------------------------------------------------------------------- around the loop


def _report(run: Run, loss: float, lr: float, seconds: float) -> None:
    """The progress bar every step; log.csv and TensorBoard every ``log_every`` steps."""
    cfg = run.cfg
    ips = cfg.batch_size * cfg.accum_steps * run.info.world_size / seconds
    run.bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{ips:.1f}")
    run.bar.update()
    if run.state.iteration % cfg.log_every == 0:
        run.log.row(iteration=run.state.iteration, loss=loss, lr=lr, images_per_s=ips)


@contextlib.contextmanager
def _stop_on_sigint(info: DistInfo) -> Iterator[threading.Event]:
    """Ctrl-C asks the loop to stop after the current step and save; a second Ctrl-C interrupts at once.

    Under torchrun every process gets the signal at slightly different steps, which a collective cannot
    survive, so distributed runs keep Python's default (interrupt at once; resume from the last checkpoint).
    """
    stop = threading.Event()
    if info.enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _diverged_message(loss: float, state: TrainState, run: Path) -> str:
    kept = (
        f"{run / 'last.pt'} (iteration {read_checkpoint(run / 'last.pt')['extra']['train_state']['iteration']}) "
        "is the last good checkpoint"
        if (run / "last.pt").is_file()
        else "no checkpoint had been written yet"
    )
    return f"loss is {loss} at iteration {state.iteration + 1}: training stopped; {kept}. Lower --lr or check the data"


# ------------------------------------------------------------------------------------------------------ validation


def validate_and_save(run: Run) -> None:
    """Validate; the first head's mean IU decides whether this is the best checkpoint so far (rank 0 writes)."""
    state = run.state
    metrics = validate(run.model, run.val_ds, run.cfg, run.info, run.device)
    state.history.append({"iteration": state.iteration, **metrics})
    best = metrics["mean_iu"] > state.best_miou
    if best:
        state.best_miou = metrics["mean_iu"]
    run.log.row(iteration=state.iteration, **metrics)
    if run.info.is_main:
        save_run(run, best)
        run.log.val_picture(run.net, run.val_ds, state.iteration)


def validate(
    model: nn.Module, val_ds: SegmentationDataset, cfg: TrainConfig, info: DistInfo, device: torch.device
) -> dict[str, float]:
    """The validation set's figures (pixel accuracy, mean accuracy, mean IU, frequency-weighted IU), every
    process scoring its share."""
    ds = val_ds if cfg.val_images is None else torch.utils.data.Subset(val_ds, range(min(cfg.val_images, len(val_ds))))
    if len(ds) < info.world_size:  # a rank without images would skip the collectives the others wait in
        raise FcnsegError(
            f"--val-images: {len(ds)} validation image(s) cannot be shared among {info.world_size} processes"
        )
    loader = make_loader(ds, batch_size=1, sampler=ShardSampler(len(ds), info), num_workers=0, seed=cfg.seed)
    # Every head's figures are logged, the first head's as they are and the others' as head/figure; the first
    # head's mean IU picks the best checkpoint.
    cms = list(evaluate_heads(unwrap(model), loader, head_classes(val_ds), device=device,
                              exclude=excluded_indices(val_ds)).items())  # fmt: skip
    out = _figures(cms[0][1])
    for name, cm in cms[1:]:
        out.update({f"{name}/{k}": v for k, v in _figures(cm).items()})
    return out


def _figures(cm) -> dict[str, float]:
    return {k: v for k, v in cm.compute().items() if not isinstance(v, list)}


def excluded_indices(ds: SegmentationDataset) -> dict[str, list[int]]:
    """Per label set, the indices of the classes the dataset leaves out of the means (SIFT Flow's test set)."""
    heads = head_classes(ds)
    out = {}
    for name, excluded in (getattr(ds, "excluded_classes", None) or {}).items():
        key = name if name in heads else next(iter(heads))
        out[key] = [heads[key].index(c) for c in excluded]
    return out
