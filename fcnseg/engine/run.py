"""A training run's assembly: the datasets, the model fitted to them, the optimiser and its schedule, mixed
precision, the distributed wrapper, and the run folder (config.yaml, the log) made ready -- fresh, or as an
interrupted run left it (``--resume``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._memory import keep_freed_memory
from ..data import get_dataset
from ..data.base import SegmentationDataset, check_data_options
from ..data.check import quick_problems
from ..data.transforms import eval_transforms, train_transforms
from ..errors import FcnsegError
from ..io import atomic_write, remove_stale_temporaries
from ..runtime import NATIVE_BF16, bf16_is_native, cpu_features
from ..runtime.kernels import kernels_pay, use_measured_kernels
from .checkpointing import RunLog, TrainState, restore_run
from .config import TrainConfig
from .distributed import DistInfo
from .fitting import build_model, fit_input, has_non_color, head_classes, staged_init
from .losses import class_pixel_counts, median_frequency, read_class_weights

__all__ = [
    "CLASS_WEIGHTS_FILE",
    "RUN_FILES",
    "Precision",
    "Run",
    "amp_context",
    "attach_transforms",
    "build_data",
    "build_optimizer",
    "class_weights",
    "lr_factor",
    "measured_kernels_wanted",
    "param_groups",
    "place_model",
    "save_class_weights",
    "seed_everything",
    "start_run",
    "training_precision",
    "unwrap",
]


@dataclass(frozen=True)
class Precision:
    """The arithmetic a run's forward pass trains in (``dtype`` on ``device_type``), and why. The weights, the
    optimiser state and the loss stay fp32 whatever it is."""

    dtype: torch.dtype
    device_type: str
    reason: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def describe(self) -> str:
        return f"{self.name}{' autocast' if self.dtype != torch.float32 else ''} ({self.reason})"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


@dataclass
class Run:
    """One training run's parts: what :func:`fcnseg.engine.train.train`'s loop reads, advances and saves."""

    cfg: TrainConfig
    folder: Path  # RUN: config.yaml, last.pt, best.pt, log.csv, class_weights.json, tensorboard/
    device: torch.device
    info: DistInfo
    train_ds: SegmentationDataset
    val_ds: SegmentationDataset
    model: nn.Module  # wrapped in DistributedDataParallel under torchrun; ``net`` is the model itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    precision: Precision
    state: TrainState = field(default_factory=TrainState)
    log: RunLog | None = None  # once the folder is ready
    bar: Any = None  # tqdm progress bar, once the folder is ready

    @property
    def net(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def classes(self) -> list[str]:
        return list(self.val_ds.classes)

    @property
    def label_mapping(self) -> dict[str, Any] | None:
        return self.train_ds.label_mapping()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of its DistributedDataParallel wrapper if it has one."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# What a run folder holds (besides tensorboard/): the names whose temporary files a new start clears.
CLASS_WEIGHTS_FILE = "class_weights.json"
RUN_FILES = ("last.pt", "last.prev.pt", "best.pt", "log.csv", "config.yaml", CLASS_WEIGHTS_FILE)


def start_run(cfg: TrainConfig, device: torch.device, info: DistInfo) -> Run:
    """The run's parts, fresh or (``--resume``) as the interrupted run left them, and its folder made ready."""
    from tqdm import tqdm

    run = _build_run(cfg, device, info)
    if cfg.resume:  # checked before the folder is touched: a refused --resume changes nothing
        run.state = restore_run(run.folder, run.net, run.optimizer, run.scheduler, run.scaler, cfg)
        attach_transforms(cfg, run.net, run.train_ds, run.val_ds)  # with the restored preprocessing
        _note_precision_change(run)
    run.state.precision = run.precision.name  # saved with every checkpoint
    # Before the folder is touched: a bad --class-weights file changes nothing. The weights go into the config,
    # so that config.yaml and every checkpoint record them.
    weights = class_weights(cfg, run.train_ds, run.folder, progress=info.is_main and cfg.progress, warn=info.is_main)
    run.cfg = cfg = dataclasses.replace(cfg, class_weight_values=weights)
    if info.is_main:
        run.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.folder, RUN_FILES)  # left by writes a kill interrupted (each up to a checkpoint)
        save_class_weights(run.folder / CLASS_WEIGHTS_FILE, cfg, head_classes(run.train_ds))
        cfg.save(run.folder / "config.yaml", precision=run.precision.name, precision_reason=run.precision.reason)
        if cfg.progress:  # with the progress bar: --no-progress runs stay quiet
            print(f"fcnseg: training in {run.precision.describe()}", file=sys.stderr)
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
    model = place_model(model, cfg, device)
    precision = training_precision(cfg, device)
    if info.enabled:
        ids = [info.local_rank] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    autocast, scaler = amp_context(cfg, device)
    return Run(
        cfg=cfg, folder=Path(cfg.out), device=device, info=info, train_ds=train_ds, val_ds=val_ds, model=model,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, autocast=autocast, precision=precision,
    )  # fmt: skip


def _note_precision_change(run: Run) -> None:
    """One warning line when a resumed run continues in another precision than it was trained in (another machine,
    --no-amp): it goes on, but no longer exactly as the uninterrupted run would have."""
    saved = run.state.precision
    if saved and saved != run.precision.name and run.info.is_main:
        print(f"fcnseg: warning: {run.folder} was trained in {saved} up to iteration {run.state.iteration}; it "
              f"continues in {run.precision.describe()}", file=sys.stderr)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- class weights


def class_weights(
    cfg: TrainConfig, ds: SegmentationDataset, folder: Path, *, progress: bool = False, warn: bool = False
) -> dict[str, list[float]] | None:
    """The class weights ``--class-weights`` asks for, {label set: one per class}: none; ``median-freq`` from the
    training masks (every label set; ``progress``: a bar, ``warn``: a line naming classes that never occur); a
    file's (the first label set, the dataset's ``classes``). A resumed run takes them from RUN/class_weights.json
    while it names the same source, so they are computed once per run."""
    if cfg.class_weights == "none":
        return None
    sets = head_classes(ds)
    if cfg.resume:
        kept = _saved_class_weights(folder / CLASS_WEIGHTS_FILE, cfg.class_weights, sets)
        if kept is not None:
            return kept
    if cfg.class_weights != "median-freq":
        name, classes = next(iter(sets.items()))
        return {name: read_class_weights(cfg.class_weights, classes)}
    weights = _median_frequency_weights(ds, sets, progress)
    absent = [c for name, w in weights.items() for c, v in zip(sets[name], w, strict=True) if v == 0]
    if absent and warn:
        more = " ..." if len(absent) > 5 else ""
        print(f"fcnseg: warning: --class-weights median-freq: {len(absent)} class(es) never occur in the training "
              f"masks and get weight 0: {', '.join(absent[:5])}{more}", file=sys.stderr)  # fmt: skip
    return weights


def _median_frequency_weights(
    ds: SegmentationDataset, sets: dict[str, tuple[str, ...]], progress: bool
) -> dict[str, list[float]]:
    """Median frequency weights of every label set, from one pass over the training masks."""
    counts: dict[str, list[np.ndarray]] = {name: [] for name in sets}
    for mask in _raw_masks(ds, progress):
        planes = mask[None] if mask.ndim == 2 else mask  # K x H x W: one plane per label set
        for (name, classes), plane in zip(sets.items(), planes, strict=True):
            counts[name].append(class_pixel_counts(plane, len(classes)))
    return {name: median_frequency(c) or [0.0] * len(sets[name]) for name, c in counts.items()}


def _raw_masks(ds: SegmentationDataset, progress: bool) -> Iterator[np.ndarray]:
    """Every item's mask as the files give it, before augmentation: only the mask file is read where the dataset
    reads its items the base class's way, the whole item (with its transforms off) elsewhere."""
    from tqdm import tqdm

    base = SegmentationDataset
    masks_only = type(ds).__getitem__ is base.__getitem__ and type(ds).load_pair is base.load_pair
    kept, ds.transforms = ds.transforms, None
    try:
        for i in tqdm(range(len(ds)), desc="class weights", unit="mask", disable=not progress, file=sys.stderr):
            yield ds.read_mask(ds.mask_path(i)) if masks_only else np.asarray(ds[i][1])
    finally:
        ds.transforms = kept


def _saved_class_weights(path: Path, source: str, sets: dict[str, tuple[str, ...]]) -> dict[str, list[float]] | None:
    """The weights of a run's class_weights.json when it was made from ``source`` for these label sets and
    classes; None otherwise (then they are made again)."""
    try:
        doc = json.loads(path.read_text())
        saved = doc["label_sets"]
        if doc["source"] != source or list(saved) != list(sets):
            return None
        if any(saved[name]["classes"] != list(classes) for name, classes in sets.items()):
            return None
        return {name: [float(v) for v in s["weights"]] for name, s in saved.items() if s["weights"] is not None}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_class_weights(path: Path, cfg: TrainConfig, sets: dict[str, tuple[str, ...]]) -> None:
    """Write RUN/class_weights.json: the source, and each label set's classes and weights (null: unweighted);
    remove a stale one when the run trains without weights."""
    if cfg.class_weight_values is None:
        path.unlink(missing_ok=True)
        return
    doc = {
        "source": cfg.class_weights,
        "label_sets": {
            name: {"classes": list(classes), "weights": cfg.class_weight_values.get(name)}
            for name, classes in sets.items()
        },
    }
    with atomic_write(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def measured_kernels_wanted(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training runs on :mod:`fcnseg.runtime.kernels`' measured kernels: on the CPU, not in deterministic mode
    (the choice depends on timing), with ``--conv-kernels measured``, or ``auto`` where ``--runtime auto`` takes
    winograd (benchmarks/vs_torchfcn.py measures the gain). In bf16 they choose between oneDNN's bf16 convolution
    and an fp32 GEMM per layer."""
    if device.type != "cpu" or cfg.deterministic or cfg.conv_kernels == "onednn":
        return False
    if cfg.conv_kernels == "measured":
        return True
    return kernels_pay(cpu_features())


def place_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """``model`` on ``device``, laid out and on the kernels that its training precision runs fastest on: what
    ``fcnseg train`` steps (benchmarks/vs_torchfcn.py times the same)."""
    model.to(device)
    if device.type == "cpu":
        keep_freed_memory()  # each step reuses the last one's buffers instead of faulting them in again
    precision = training_precision(cfg, device)
    if precision.device_type == "cpu" and precision.dtype == torch.bfloat16:
        # oneDNN's bf16 convolutions (AMX) and their backward run fastest on NHWC activations, which an NHWC input
        # gives every layer. The parameters stay NCHW: the fused optimiser steps a channels_last one through a
        # copy in and out, which on fc6 costs more than the layout saves. fp32's NCHW path is faster in NCHW.
        model.register_forward_pre_hook(_nhwc_input)
    if measured_kernels_wanted(cfg, device):
        use_measured_kernels(model)  # each layer on its fastest kernel, forward and backward timed
    return model


def _nhwc_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest)


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
    """SGD with momentum or AdamW over :func:`param_groups`, fused where PyTorch has the kernel (CPU and CUDA)."""
    groups = param_groups(model, cfg)
    # The fused step reads and writes each parameter once for decay, momentum and update together. The plain one
    # makes a new tensor for the decayed gradient and passes over memory three times more: on a CPU FCN-VGG16's fc6
    # (102M weights, 411 MB) alone then costs ~0.3 s per step.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)


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


def training_precision(cfg: TrainConfig, device: torch.device) -> Precision:
    """What ``amp`` gives on ``device``. On a GPU: bf16 autocast where supported, else fp16 with loss scaling. On a
    CPU: bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16 or AMX; ``FCNSEG_CPU_FEATURES`` overrides
    the probe) and torch's oneDNN uses it, else fp32 -- emulated bf16 is slower than fp32. Without ``amp``, fp32."""
    if not cfg.amp:
        return Precision(torch.float32, device.type, "amp off")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "cuda", "amp on; the GPU computes bf16")
        return Precision(torch.float16, "cuda", "amp on; the GPU has no bf16: fp16 with loss scaling")
    if device.type != "cpu":
        return Precision(torch.float32, device.type, "amp on, but mixed precision is for CUDA and bf16-native CPUs")
    native = sorted(cpu_features() & NATIVE_BF16)
    if not native:
        why = "this CPU has no native bf16 (AVX-512 BF16 or AMX), and emulated bf16 is slower than fp32"
    elif not bf16_is_native():
        why = f"the CPU lists {', '.join(native)}, but torch's oneDNN does not compute bf16 natively on it"
    else:
        return Precision(torch.bfloat16, "cpu", f"amp on; the CPU computes bf16 natively: {', '.join(native)}")
    return Precision(torch.float32, "cpu", f"amp on, but {why}")


def amp_context(cfg: TrainConfig, device: torch.device) -> tuple[Any, torch.amp.GradScaler]:
    """The run's autocast context (a callable giving a fresh one per forward pass; :func:`training_precision`) and
    its gradient scaler, enabled for fp16 only: bf16 has fp32's exponent range, so its gradients need no scaling
    (the torch.amp docs: mixed precision training "on CPU with datatype of torch.bfloat16 only uses
    torch.autocast")."""
    precision = training_precision(cfg, device)
    return precision.autocast, torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
