"""A training run's assembly: the datasets, the model fitted to them, the optimiser and its schedule, mixed
precision, the distributed wrapper, and the run folder (config.yaml, the log) made ready -- fresh, or as an
interrupted run left it (``--resume``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import get_dataset
from ..data.base import SegmentationDataset, check_data_options
from ..data.check import quick_problems
from ..data.transforms import eval_transforms, train_transforms
from ..errors import FcnsegError
from ..io import remove_stale_temporaries
from ..runtime import cpu_features
from ..runtime.kernels import nnpack_ready, use_measured_kernels
from .checkpointing import RunLog, TrainState, restore_run
from .config import TrainConfig
from .distributed import DistInfo
from .fitting import build_model, fit_input, has_non_color, staged_init

__all__ = [
    "RUN_FILES",
    "Run",
    "amp_context",
    "attach_transforms",
    "build_data",
    "build_optimizer",
    "lr_factor",
    "measured_kernels_wanted",
    "param_groups",
    "seed_everything",
    "start_run",
    "unwrap",
]


@dataclass
class Run:
    """One training run's parts: what :func:`fcnseg.engine.train.train`'s loop reads, advances and saves."""

    cfg: TrainConfig
    folder: Path  # RUN: config.yaml, last.pt, best.pt, log.csv, tensorboard/
    device: torch.device
    info: DistInfo
    train_ds: SegmentationDataset
    val_ds: SegmentationDataset
    model: nn.Module  # wrapped in DistributedDataParallel under torchrun; ``net`` is the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    state: TrainState = field(default_factory=TrainState)
    log: RunLog | None = None  # once the folder is ready
    bar: Any = None  # tqdm progress bar, once the folder is ready

    @property
    def net(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def classes(self) -> list[str]:
        return list(self.val_ds.classes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of its DistributedDataParallel wrapper if it has one."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# What a run folder holds (besides tensorboard/): the names whose temporary files a new start clears.
RUN_FILES = ("last.pt", "last.prev.pt", "best.pt", "log.csv", "config.yaml")


def start_run(cfg: TrainConfig, device: torch.device, info: DistInfo) -> Run:
    """The run's parts, fresh or (``--resume``) as the interrupted run left them, and its folder made ready."""
    from tqdm import tqdm

    run = _build_run(cfg, device, info)
    if cfg.resume:  # checked before the folder is touched: a refused --resume changes nothing
        run.state = restore_run(run.folder, run.net, run.optimizer, run.scheduler, run.scaler, cfg)
        attach_transforms(cfg, run.net, run.train_ds, run.val_ds)  # with the restored preprocessing
    if info.is_main:
        run.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.folder, RUN_FILES)  # left by writes a kill interrupted (each up to a checkpoint)
        cfg.save(run.folder / "config.yaml")
    run.log = RunLog(run.folder, info.is_main, run.state.iteration, list(unwrap(run.net).heads)[1:])
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
    """Whether training runs on :mod:`fcnseg.runtime.kernels`' measured kernels: on the CPU, not in deterministic mode
    (the choice depends on timing), with ``--conv-kernels measured``, or ``auto`` where ``--runtime auto`` takes
    winograd (benchmarks/vs_torchfcn.py measures the gain)."""
    if device.type != "cpu" or cfg.deterministic or cfg.conv_kernels == "onednn":
        return False
    if cfg.conv_kernels == "measured":
        return True
    # --runtime auto's fp32 rule: NNPACK's Winograd and GEMM kernels need AVX2 and FMA, and a torch built with it.
    return {"avx2", "fma"} <= cpu_features() and nnpack_ready()


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


def attach_transforms(
    cfg: TrainConfig, model: nn.Module, train_ds: SegmentationDataset, val_ds: SegmentationDataset
) -> None:
    """Normalise the way the model's weights expect (``model.preprocessing``), never a hard-coded mean."""
    if cfg.jitter and has_non_color(train_ds):
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
