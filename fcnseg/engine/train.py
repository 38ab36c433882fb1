"""Training, top to bottom: :func:`train` builds a :class:`Run`, then runs the ``while`` loop over optimiser steps,
validating and checkpointing every ``val_every`` steps.

One iteration is one optimiser step (``accum_steps`` micro-batches of ``batch_size`` images per process).
Everything a run needs to continue exactly where it stopped -- weights, optimiser, scheduler, gradient scaler,
RNG states and the position in the data order -- goes into ``RUN/last.pt``; ``--resume`` restores it.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import read_checkpoint, save_checkpoint
from ..data import get_dataset
from ..data.base import IGNORE_INDEX, SegmentationDataset, check_data_options
from ..data.check import quick_problems
from ..data.loader import make_loader
from ..data.transforms import eval_transforms, train_transforms
from ..device import pick_device
from ..errors import CheckpointError, FcnsegError
from ..io import atomic_write, crash_point, remove_stale_temporaries
from ..kernels import use_measured_kernels
from ..models.multi import split_heads
from ..models.registry import once_ignored
from ..preprocessing import Preprocessing
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
from .fitting import build_model, fit_input, has_non_colour, head_classes, staged_init

__all__ = [  # build_model, head_classes and staged_init live in .fitting; importable from here as before
    "Run",
    "TrainConfig",
    "TrainState",
    "TrainingDivergedError",
    "build_model",
    "head_classes",
    "staged_init",
    "train",
    "train_step",
]


class TrainingDivergedError(FcnsegError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    iteration: int = 0
    samples_seen: int = 0  # per process, across epochs: fixes the position in the data order
    best_miou: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Run:
    """One training run's parts: what :func:`train`'s loop reads, advances and saves."""

    cfg: TrainConfig
    folder: Path  # RUN: config.yaml, last.pt, best.pt, log.csv, tensorboard/
    device: torch.device
    info: DistInfo
    train_ds: SegmentationDataset
    val_ds: SegmentationDataset
    model: nn.Module  # wrapped in DistributedDataParallel under torchrun; ``net`` is the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    state: TrainState = field(default_factory=TrainState)
    log: RunLog | None = None  # once the folder is ready
    bar: Any = None  # tqdm progress bar, once the folder is ready

    @property
    def net(self) -> nn.Module:
        return _unwrap(self.model)

    @property
    def classes(self) -> list[str]:
        return list(self.val_ds.classes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


# ---------------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig) -> TrainState:
    """Run (or resume) a training run as ``cfg`` describes; returns the final state."""
    cfg = cfg.resolved()
    device = pick_device(cfg.device)
    info = init_distributed(device.type)
    try:
        run = start_run(cfg, device, info)  # with --resume: the saved weights, optimiser, RNG and data position
        state = run.state
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


def _report(run: Run, loss: float, lr: float, seconds: float) -> None:
    """The progress bar every step; log.csv and TensorBoard every ``log_every`` steps."""
    cfg = run.cfg
    ips = cfg.batch_size * cfg.accum_steps * run.info.world_size / seconds
    run.bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{ips:.1f}")
    run.bar.update()
    if run.state.iteration % cfg.log_every == 0:
        run.log.row(iteration=run.state.iteration, loss=loss, lr=lr, images_per_s=ips)


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
        run.log.image("val/image_truth_prediction", _val_picture(run.net, run.val_ds), state.iteration)


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


# ---------------------------------------------------------------------------------------------------- one step


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


def summed_loss(model: nn.Module, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the valid pixels. A two-headed net (masks N x K x H x W) is trained with the sum
    of its heads' losses, the paper's SIFT Flow recipe: both label sets shape the one trunk."""
    if masks.dim() == 3:
        return F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
    heads = split_heads(model, logits).values()
    return sum(
        F.cross_entropy(s.float(), masks[:, k], ignore_index=IGNORE_INDEX, reduction="sum") for k, s in enumerate(heads)
    )


def train_step(model, micro_batches, optimizer, scaler, cfg: TrainConfig, device, autocast) -> float:
    """One optimiser step over ``accum_steps`` micro-batches; returns the loss summed over this step's pixels
    (``sum``) or averaged over them (``mean``), as reported."""
    masks_all = [m for _, m in micro_batches]
    # The mean is taken over the valid pixels of the whole step on every process together, so that gradient
    # accumulation and DDP (which averages gradients over processes) give the gradient of one big batch.
    count = float(sum(int((m != IGNORE_INDEX).sum()) for m in masks_all))
    valid = all_reduce_sum(torch.tensor(count, device=device)).item()  # on the device: nccl reduces CUDA tensors
    scale = world_size() * (1.0 if cfg.loss == "sum" else 1.0 / max(valid, 1.0))
    total = torch.zeros((), device=device)
    for i, (images, masks) in enumerate(micro_batches):
        # Under DDP the gradients are summed across processes once per step, in the last micro-batch's backward;
        # the earlier ones only accumulate locally (no_sync), which gives the same sum for a fraction of the traffic.
        with gradient_sync(model, i == len(micro_batches) - 1):
            with autocast():
                logits = model(images.to(device, non_blocking=True))
            loss = summed_loss(_unwrap(model), logits, masks.to(device))
            scaler.scale(loss * scale).backward()
        total += loss.detach()
    total = all_reduce_sum(total) / (1.0 if cfg.loss == "sum" else max(valid, 1.0))
    if not torch.isfinite(total):
        optimizer.zero_grad(set_to_none=True)
        return float("nan")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total.item()


def validate(model, val_ds, cfg: TrainConfig, info: DistInfo, device) -> dict[str, float]:
    ds = val_ds if cfg.val_images is None else torch.utils.data.Subset(val_ds, range(min(cfg.val_images, len(val_ds))))
    if len(ds) < info.world_size:  # a rank without images would skip the collectives the others wait in
        raise FcnsegError(
            f"--val-images: {len(ds)} validation image(s) cannot be shared among {info.world_size} processes"
        )
    loader = make_loader(ds, batch_size=1, sampler=ShardSampler(len(ds), info), num_workers=0, seed=cfg.seed)
    # Every head's figures are logged, the first head's as they are and the others' as head/figure; the first
    # head's mean IU picks the best checkpoint.
    cms = list(evaluate_heads(_unwrap(model), loader, head_classes(val_ds), device=device,
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


# ---------------------------------------------------------------------------------------------------- building


def start_run(cfg: TrainConfig, device: torch.device, info: DistInfo) -> Run:
    """The run's parts, fresh or (``--resume``) as the interrupted run left them, and its folder made ready."""
    from tqdm import tqdm

    run = _build_run(cfg, device, info)
    if cfg.resume:  # checked before the folder is touched: a refused --resume changes nothing
        run.state = restore_run(run.folder, run.model, run.optimizer, run.scheduler, run.scaler, cfg)
        attach_transforms(cfg, run.net, run.train_ds, run.val_ds)  # with the restored preprocessing
    if info.is_main:
        run.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.folder, RUN_FILES)  # left by writes a kill interrupted (each up to a checkpoint)
        cfg.save(run.folder / "config.yaml")
    run.log = RunLog(run.folder, info.is_main, run.state.iteration, list(getattr(run.net, "heads", {}))[1:])
    show = info.is_main and cfg.progress
    run.bar = tqdm(total=cfg.iters, initial=run.state.iteration, disable=not show, unit="it")
    return run


def _build_run(cfg: TrainConfig, device: torch.device, info: DistInfo) -> Run:
    # Seeded first: the model's random initialisation and everything after it repeat exactly.
    seed_everything(cfg.seed + info.rank, cfg.deterministic)
    train_ds, val_ds = build_data(cfg)
    model = build_model(cfg, train_ds)
    if cfg.init_from and not cfg.resume:  # staged training: start from the coarser net
        staged_init(model, cfg.init_from)
        fit_input(model, train_ds)
    attach_transforms(cfg, model, train_ds, val_ds)
    model.to(device)
    if measured_kernels_wanted(cfg, device):
        use_measured_kernels(model)  # the forward on each layer's fastest kernel: a CPU step 1.2-1.3x faster
    if info.enabled:
        ids = [info.local_rank] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    autocast, scaler = amp_context(cfg, device)
    return Run(
        cfg=cfg, folder=Path(cfg.out), device=device, info=info, train_ds=train_ds, val_ds=val_ds, model=model,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast,
    )  # fmt: skip


def measured_kernels_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs on :mod:`fcnseg.kernels`' measured kernels: on the CPU, not in deterministic mode
    (the choice depends on timing), with ``--conv-kernels measured``, or ``auto`` where ``--runtime auto`` takes
    winograd (benchmarks/vs_torchfcn.py measures the gain)."""
    if device.type != "cpu" or cfg.deterministic or cfg.conv_kernels == "onednn":
        return False
    if cfg.conv_kernels == "measured":
        return True
    from ..kernels import nnpack_ready
    from ..runtime import choose_path, cpu_features

    return choose_path(cpu_features(), nnpack=nnpack_ready())[0] == "winograd"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Weights decay at ``lr``; biases and normalisation parameters learn at ``bias_lr_mult`` x lr without decay
    (Caffe's lr_mult 2 / decay_mult 0 in the paper preset). Frozen upsampling kernels are left out."""
    weights, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (weights if p.dim() > 1 else others).append(p)
    return [
        {"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": others, "lr": cfg.lr * cfg.bias_lr_mult, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up, then polynomial decay (power 0 = constant, the paper's schedule)."""
    if it < cfg.warmup_iters:
        return (it + 1) / cfg.warmup_iters
    if not cfg.poly_power:
        return 1.0
    rest = max(1, cfg.iters - cfg.warmup_iters)
    return max(0.0, 1 - (it - cfg.warmup_iters) / rest) ** cfg.poly_power


def build_data(cfg: TrainConfig) -> tuple[SegmentationDataset, SegmentationDataset]:
    """Train and validation sets; transforms are attached once the model (and its preprocessing) exists."""
    options = {**(cfg.data_options or {}), **({"download": True} if cfg.download else {})}
    check_data_options(options)
    train_ds = get_dataset(cfg.dataset, root=cfg.root, split=cfg.split, **options)
    val_ds = get_dataset(cfg.dataset, root=cfg.root, split=cfg.val_split, **options)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise FcnsegError(f"--dataset {cfg.dataset}: split {cfg.split!r} or {cfg.val_split!r} is empty")
    if cfg.check_data:  # a bad file found now, not in a DataLoader worker an hour into the run
        problems = quick_problems(train_ds) + (quick_problems(val_ds) if cfg.val_split != cfg.split else [])
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise FcnsegError(f"{problems[0].line()}{more}; fcnseg check-data --dataset {cfg.dataset} lists every "
                              "problem, --no-check-data skips this check")  # fmt: skip
    return train_ds, val_ds


def attach_transforms(cfg: TrainConfig, model: nn.Module, train_ds, val_ds) -> None:
    """Normalise the way the model's weights expect (``model.preprocessing``), never a hard-coded mean."""
    if cfg.jitter and has_non_colour(train_ds):
        raise FcnsegError(f"--jitter: colour jitter is for colour images; --dataset {cfg.dataset} gives depth or HHA "
                          "channels: expected --jitter 0")  # fmt: skip
    scale = None if cfg.scale_min == cfg.scale_max == 1.0 else (cfg.scale_min, cfg.scale_max)
    train_ds.transforms = train_transforms(
        model.preprocessing, crop_size=cfg.crop_size or None, scale_range=scale, flip=cfg.flip, jitter=cfg.jitter
    )
    val_ds.transforms = eval_transforms(model.preprocessing)


def amp_context(cfg: TrainConfig, device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """Mixed precision on GPUs only (bf16 where supported, else fp16 with loss scaling); CPU runs stay fp32 so
    that they are exactly reproducible."""
    use = bool(cfg.amp) and device.type == "cuda"
    dtype = torch.bfloat16 if use and torch.cuda.is_bf16_supported() else torch.float16
    ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if use else contextlib.nullcontext
    return ctx, torch.amp.GradScaler(device.type, enabled=use and dtype == torch.float16)


# ------------------------------------------------------------------------------------------ checkpoints & logs


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


def save_run(run: Run, best: bool) -> None:
    """Write RUN/best.pt when ``best``, then RUN/last.pt with the full training state, each atomically.

    The order matters for a kill at any instant: last.pt records the best score so far, so it may only land once
    best.pt itself has. A kill before it leaves the previous last.pt, and the resumed run redoes the validation
    and writes best.pt again.
    """
    cfg, state, folder = run.cfg, run.state, run.folder
    if best:
        extra = {"config": cfg.to_dict(), "iteration": state.iteration, "mean_iu": state.best_miou}
        save_checkpoint(run.net, folder / "best.pt", classes=run.classes, extra=extra)
    extra = {
        "train_state": {
            "iteration": state.iteration,
            "samples_seen": state.samples_seen,
            "best_miou": state.best_miou,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng_state(),
        },
        "config": cfg.to_dict(),
    }
    # The previous last.pt is kept as last.prev.pt, so that --resume has a fallback if the newest is ever lost or
    # damaged (a crash between the two renames, a bad disk). A file that is not even a whole zip archive (what
    # torch.save writes) is never rotated over the fallback: it would replace the one good checkpoint.
    last = folder / "last.pt"
    if zipfile.is_zipfile(last):
        os.replace(last, folder / "last.prev.pt")
    save_checkpoint(run.net, last, classes=run.classes, extra=extra)


def _resume_checkpoint(run: Path) -> tuple[Path, dict[str, Any]]:
    """RUN/last.pt, or RUN/last.prev.pt with a warning when last.pt is missing or damaged."""
    last, prev = run / "last.pt", run / "last.prev.pt"
    if not last.is_file() and not prev.is_file():
        raise FcnsegError(f"--resume: {last} not found; nothing to resume")
    try:
        return last, read_checkpoint(last)
    except CheckpointError as e:
        if not prev.is_file():
            raise FcnsegError(f"--resume: {e}") from None
        ckpt = read_checkpoint(prev)
        it = ckpt["extra"].get("train_state", {}).get("iteration")
        reason = "missing" if not last.exists() else "damaged"
        print(f"fcnseg: warning: {last} is {reason}; resuming from {prev} (iteration {it})", file=sys.stderr)
        return prev, ckpt


# Options that fix the shape of the weights or of the optimiser state: a resumed run cannot change them.
FIXED_ON_RESUME = ("model", "dataset", "alignment", "width", "fc_dim", "batch_norm", "learnable_upsampling",
                   "optimizer")  # fmt: skip


def check_resume_config(path: Path, ckpt: Mapping[str, Any], cfg: TrainConfig, model: nn.Module) -> None:
    """Refuse, in one line naming the flag, an option that differs from the run being resumed and that its
    weights or optimiser state cannot follow. Model options are compared as the builders took them, defaults
    filled in: an option left unset (None) means the builder's default, which may equal the value saved."""
    saved = ckpt["extra"].get("config") or {}
    old_kwargs, new_kwargs = ckpt.get("config") or {}, _unwrap(model).build_config["kwargs"]
    for name in FIXED_ON_RESUME:
        if name not in saved or name in once_ignored(cfg.model):  # an option the builder has not: nothing to fit
            continue
        old, new = saved[name], getattr(cfg, name)
        if name in new_kwargs:
            old, new = old_kwargs.get(name, old), new_kwargs[name]
        if old != new:
            flag = "--" + name.replace("_", "-")
            raise FcnsegError(
                f"--resume: {flag} {new} does not fit the run in {path.parent}, trained with {flag} {old}; drop "
                f"{flag} to continue it, or start a new run with another --out"
            )


def restore_run(run: Path, model, optimizer, scheduler, scaler, cfg: TrainConfig) -> TrainState:
    path, ckpt = _resume_checkpoint(run)
    ts = ckpt["extra"].get("train_state")
    if ts is None:
        raise FcnsegError(f"--resume: {path} holds no training state")
    check_resume_config(path, ckpt, cfg, model)
    try:
        _unwrap(model).load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ts["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # options the check above does not cover (e.g. the data)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FcnsegError(f"--resume: {path} does not fit the options given ({reason})") from None
    # The run may have started from weights with their own input (--init-from a Caffe model): keep it.
    _unwrap(model).preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    scheduler.load_state_dict(ts["scheduler"])
    if ts["scaler"]:  # empty when the interrupted run had no fp16 loss scaling
        scaler.load_state_dict(ts["scaler"])
    set_rng_state(ts["rng"])
    state = TrainState(ts["iteration"], ts["samples_seen"], ts["best_miou"])
    _apply_rates(cfg, optimizer, scheduler, state.iteration)
    if path.name != "last.pt" and (run / "last.pt").exists():
        # Set the damaged file aside, so that the next save does not rotate it over the good fallback.
        os.replace(run / "last.pt", run / "last.damaged.pt")
    return state


def _apply_rates(cfg: TrainConfig, optimizer, scheduler, iteration: int) -> None:
    """The optimiser's saved state carries the old run's rates; a resumed run uses the ones asked for now (e.g. a
    lower --lr after a divergence)."""
    bases = [cfg.lr, cfg.lr * cfg.bias_lr_mult]
    decays = [cfg.weight_decay, 0.0]
    scheduler.base_lrs = bases
    for group, base, decay in zip(optimizer.param_groups, bases, decays, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * lr_factor(cfg, iteration)
        group["weight_decay"] = decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# What a run folder holds (besides tensorboard/): the names whose temporary files a new start clears.
RUN_FILES = ("last.pt", "last.prev.pt", "best.pt", "log.csv", "config.yaml")
LOG_FIELDS = ["iteration", "loss", "lr", "images_per_s", "pixel_acc", "mean_acc", "mean_iu", "fw_iu"]


class RunLog:
    """log.csv (one row per logged step or validation) and TensorBoard scalars/images; rank 0 only."""

    def __init__(self, run: Path, enabled: bool, start_iteration: int, heads: Sequence[str] = ()) -> None:
        self.enabled = enabled
        self.writer = None
        # A two-headed model's further heads get their own columns: geometric/pixel_acc, ...
        self.fields = LOG_FIELDS + [f"{h}/{k}" for h in heads for k in LOG_FIELDS[4:]]
        if not enabled:
            return
        self.path = run / "log.csv"
        rows = self._kept_rows(start_iteration)
        # Never rewritten in place: a kill at any instant leaves either the old log or the new one.
        with atomic_write(self.path, "w") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
            crash_point("rewrite:log.csv")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=start_iteration or None)
        except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
            self.writer = None

    def _kept_rows(self, start_iteration: int) -> list[dict[str, str]]:
        """On resume, the rows up to the checkpoint's iteration; the interrupted run's later rows are redone, and
        a row cut short by a kill (fields missing) is dropped."""
        if start_iteration <= 0 or not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        whole = [r for r in rows if None not in r and None not in r.values() and r["iteration"].isdigit()]
        return [r for r in whole if int(r["iteration"]) <= start_iteration]

    def row(self, **values: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow({k: values.get(k, "") for k in self.fields})
        if self.writer is not None:
            it = values["iteration"]
            for k, v in values.items():
                if k != "iteration" and isinstance(v, float) and math.isfinite(v):
                    val = k.rsplit("/", 1)[-1] in LOG_FIELDS[4:]
                    self.writer.add_scalar(("val/" if val else "train/") + k, v, it)

    def image(self, tag: str, picture: np.ndarray, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, picture, iteration, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _val_picture(model: nn.Module, val_ds: SegmentationDataset) -> np.ndarray:
    """The first validation image beside its ground truth and the current prediction, colour-coded."""
    from ..imageio import colorize
    from ..predict import predict_mask

    image, mask = val_ds.load_pair(0)  # decoded once; predict_mask normalises as the model expects
    pred = model.predict(image) if len(getattr(model, "heads", {})) > 1 else predict_mask(model, image)
    if isinstance(pred, dict):  # a two-headed model: the first head's labels, which load_pair returns
        pred = next(iter(pred.values()))
    colours = np.asarray(val_ds.palette, np.uint8)
    return np.concatenate([image[:, :, :3], colorize(mask, colours), colorize(pred, colours)], axis=1)


def _diverged_message(loss: float, state: TrainState, run: Path) -> str:
    kept = (
        f"{run / 'last.pt'} (iteration {read_checkpoint(run / 'last.pt')['extra']['train_state']['iteration']}) "
        "is the last good checkpoint"
        if (run / "last.pt").is_file()
        else "no checkpoint had been written yet"
    )
    return f"loss is {loss} at iteration {state.iteration + 1}: training stopped; {kept}. Lower --lr or check the data"
