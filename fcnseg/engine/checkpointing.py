"""A run's checkpoints and its log: RUN/best.pt and RUN/last.pt, exact resume from them, and RUN/log.csv with
TensorBoard beside it.

Everything a run needs to continue exactly where it stopped -- weights, optimiser, scheduler, gradient scaler,
RNG states and the position in the data order -- goes into ``RUN/last.pt``; ``--resume`` restores it.
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..checkpoint import read_checkpoint, save_checkpoint
from ..data.base import SegmentationDataset
from ..errors import CheckpointError, FcnsegError, first_line
from ..io import atomic_write, crash_point
from ..models.registry import once_ignored
from ..preprocessing import Preprocessing
from .config import TrainConfig

__all__ = [
    "FIXED_ON_RESUME",
    "LOG_FIELDS",
    "RunLog",
    "TrainState",
    "check_resume_config",
    "restore_run",
    "rng_state",
    "save_run",
    "set_rng_state",
]


@dataclass
class TrainState:
    iteration: int = 0
    samples_seen: int = 0  # per process, across epochs: fixes the position in the data order
    best_miou: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # What the forward pass computes in (fp32, bf16, fp16; fcnseg.engine.run.Precision): saved with each checkpoint,
    # so that a resume in another one is noticed. Empty for checkpoints written before it was recorded.
    precision: str = ""


class Saved(Protocol):
    """What :func:`save_run` reads of a run; :class:`fcnseg.engine.run.Run` has it all."""

    cfg: TrainConfig
    folder: Path
    state: TrainState
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @property
    def net(self) -> nn.Module: ...

    @property
    def classes(self) -> list[str]: ...

    @property
    def label_mapping(self) -> dict[str, Any] | None: ...


# ----------------------------------------------------------------------------------------------------- checkpoints


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


def save_run(run: Saved, best: bool) -> None:
    """Write RUN/best.pt when ``best``, then RUN/last.pt with the full training state, each atomically.

    The order matters for a kill at any instant: last.pt records the best score so far, so it may only land once
    best.pt itself has. A kill before it leaves the previous last.pt, and the resumed run redoes the validation
    and writes best.pt again.
    """
    cfg, state, folder = run.cfg, run.state, run.folder
    # How the data's own labels (COCO category ids, Cityscapes label ids) became the model's classes.
    mapping = {"label_mapping": run.label_mapping} if run.label_mapping else {}
    if best:
        extra = {"config": cfg.to_dict(), "iteration": state.iteration, "mean_iu": state.best_miou,
                 "precision": state.precision, **mapping}  # fmt: skip
        save_checkpoint(run.net, folder / "best.pt", classes=run.classes, extra=extra)
    extra = {
        "train_state": {
            "iteration": state.iteration,
            "samples_seen": state.samples_seen,
            "best_miou": state.best_miou,
            "precision": state.precision,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng_state(),
        },
        "config": cfg.to_dict(),
        **mapping,
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
    old_kwargs, new_kwargs = ckpt.get("config") or {}, model.build_config["kwargs"]
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


def restore_run(
    run: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
) -> TrainState:
    """Load RUN's last checkpoint into the (unwrapped) ``model`` and the run's other parts; returns its state."""
    path, ckpt = _resume_checkpoint(run)
    ts = ckpt["extra"].get("train_state")
    if ts is None:
        raise FcnsegError(f"--resume: {path} holds no training state")
    check_resume_config(path, ckpt, cfg, model)
    try:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ts["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # options the check above does not cover (e.g. the data)
        reason = first_line(e)
        raise FcnsegError(f"--resume: {path} does not fit the options given ({reason})") from None
    # The run may have started from weights with their own input (--init-from a Caffe model): keep it.
    model.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    scheduler.load_state_dict(ts["scheduler"])
    if ts["scaler"]:  # empty when the interrupted run had no fp16 loss scaling
        scaler.load_state_dict(ts["scaler"])
    set_rng_state(ts["rng"])
    state = TrainState(ts["iteration"], ts["samples_seen"], ts["best_miou"], precision=ts.get("precision", ""))
    _apply_rates(cfg, optimizer, scheduler, state.iteration)
    if path.name != "last.pt" and (run / "last.pt").exists():
        # Set the damaged file aside, so that the next save does not rotate it over the good fallback.
        os.replace(run / "last.pt", run / "last.damaged.pt")
    return state


def _apply_rates(cfg: TrainConfig, optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, iteration: int) -> None:
    """The optimiser's saved state carries the old run's rates; a resumed run uses the ones asked for now (e.g. a
    lower --lr after a divergence), at the point of the scheduler's own schedule where the run stopped."""
    bases = [cfg.lr, cfg.lr * cfg.bias_lr_mult]
    decays = [cfg.weight_decay, 0.0]
    scheduler.base_lrs = bases
    for group, base, decay, factor in zip(optimizer.param_groups, bases, decays, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(iteration)
        group["weight_decay"] = decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum


# ------------------------------------------------------------------------------------------------------------ logs

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

    def val_picture(self, model: nn.Module, val_ds: SegmentationDataset, iteration: int) -> None:
        """The first validation image, its ground truth and ``model``'s prediction, side by side in TensorBoard."""
        self.image("val/image_truth_prediction", _val_picture(model, val_ds), iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _val_picture(model: nn.Module, val_ds: SegmentationDataset) -> np.ndarray:
    """The first validation image beside its ground truth and the current prediction, colour-coded."""
    from ..imageio import colorize
    from ..inference import Predictor

    image, mask = val_ds.load_pair(0)  # decoded once; the Predictor normalises as the model expects
    # Eager: the weights change at every step, and a faster path would be rebuilt for each picture. The first
    # head's labels, which load_pair returns.
    pred = next(iter(Predictor(model, runtime="eager").masks([image])[0].values()))
    colors = np.asarray(val_ds.palette, np.uint8)
    return np.concatenate([image[:, :, :3], colorize(mask, colors), colorize(pred, colors)], axis=1)
