"""Training configuration: one dataclass, filled from a preset, an optional YAML file and command-line flags.

Precedence, lowest first: the dataclass defaults, the preset (``paper`` or ``modern``), the YAML file given with
``--config``, the flags typed on the command line. The resolved configuration is saved as ``RUN/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..errors import FcnsegError, clipped, shown
from ..io import atomic_write, load_yaml
from ..models.registry import saved_options
from .losses import LOSSES

MAX_CONFIG_BYTES = 1 << 20
"""An options file is a few hundred bytes; anything past a mebibyte is not one."""
MAX_OPTION_CHARS = 4096
"""The longest text option accepted from a file (a path at most: PATH_MAX on Linux)."""

# The release's learning rates (its solver.prototxt files) go with an unnormalised (summed) loss over ~500 x 375
# images, batch 1; each finer stage starts from the previous one and moves much less (PAMI 2016, section 4).
PAPER_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s_atonce": 1e-10}

REDUCTIONS = ("sum", "mean")
"""How a step's pixel losses are reduced (``loss_reduction``); also the values ``loss`` held before it named the
loss itself, read as ``loss: ce`` with that reduction (:func:`legacy_loss`)."""
RUN_WRITTEN = ("class_weight_values",)
"""Fields the run fills in for the record (config.yaml, checkpoints): no flag or option file sets them."""


@dataclass
class TrainConfig:
    """Everything ``fcnseg train`` needs. Fields left as None are filled from the preset."""

    # data
    dataset: str = "synthetic"
    root: str | None = None
    split: str = "train"
    val_split: str = "val"
    download: bool = False  # voc / sbd: fetch the data first with torchvision's downloader
    data_options: dict | None = None  # extra dataset arguments, e.g. {size: 96} for synthetic, {year: "2011"} for voc
    # model
    model: str = "fcn8s"
    alignment: str = "aligned"
    width: float = 1.0
    # VGG's options: None leaves the builder's default, and a backbone without fully connected layers (or with
    # batch norm always) is never given them; see model_options().
    fc_dim: int | None = None
    batch_norm: bool | None = None
    dropout: float | None = None
    backbone_weights: str | None = None
    learnable_upsampling: bool = False
    init_from: str | None = None
    # recipe
    preset: str = "modern"
    iters: int = 1000
    batch_size: int | None = None
    accum_steps: int = 1
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    bias_lr_mult: float | None = None
    # What is minimised (fcnseg.engine.losses): the loss (ce, focal, dice, lovasz), how a step's pixel losses are
    # reduced (sum: the paper's unnormalised loss; mean: over the step's valid pixels), per-class weights.
    loss: str = "ce"
    loss_reduction: str | None = None
    focal_gamma: float = 2.0
    class_weights: str = "none"  # none, median-freq (computed from the training masks) or a file of weights
    # The weights the run trains with, {label set: [one per class]}, written by the run from class_weights: a
    # record in config.yaml and the checkpoints, never an option.
    class_weight_values: dict | None = None
    warmup_iters: int | None = None
    poly_power: float | None = None
    amp: bool | None = None
    crop_size: int | None = None  # 0 = whole images
    scale_min: float | None = None
    scale_max: float | None = None
    flip: bool | None = None
    jitter: float | None = None
    # run
    out: str = "runs/train"
    resume: bool = False
    val_every: int = 500
    val_images: int | None = None
    log_every: int = 10
    seed: int = 0
    deterministic: bool = False
    # Convolution kernels on the CPU: "auto" takes the measured ones (Winograd, im2col + GEMM, oneDNN: the fastest
    # per layer, fcnseg.runtime.kernels) where the CPU has AVX2 and FMA; "measured" always, "onednn" never.
    conv_kernels: str = "auto"
    num_workers: int | None = None
    device: str = "auto"
    progress: bool = True
    # Before the run folder is made: every image has its mask, every file decodes, sizes match (--no-check-data
    # skips it, for large sets already checked with fcnseg check-data).
    check_data: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the preset's values in every field left as None, checked for consistency."""
        if self.preset not in PRESETS:
            raise FcnsegError(f"--preset {shown(self.preset)}: expected one of {', '.join(PRESETS)}")
        values = PRESETS[self.preset](self)
        given = dataclasses.replace(self, **legacy_loss({"loss": self.loss, "loss_reduction": self.loss_reduction}))
        cfg = dataclasses.replace(given, **{k: v for k, v in values.items() if getattr(given, k) is None})
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        checks = [
            (self.iters >= 1, "--iters must be >= 1"),
            (self.batch_size is not None and self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.accum_steps >= 1, "--accum-steps must be >= 1"),
            (
                self.conv_kernels in ("auto", "measured", "onednn"),
                f"--conv-kernels {shown(self.conv_kernels)}: expected auto, measured or onednn",
            ),
            (self.optimizer in ("sgd", "adamw"), f"--optimizer {shown(self.optimizer)}: expected sgd or adamw"),
            (self.loss in LOSSES, f"--loss {shown(self.loss)}: expected ce, focal, dice or lovasz"),
            (self.loss_reduction in REDUCTIONS, f"--loss-reduction {shown(self.loss_reduction)}: expected sum or mean"),
            (0 <= self.focal_gamma < math.inf, "--focal-gamma must be >= 0"),
            (self.class_weights != "", "--class-weights: expected none, median-freq or a file of weights"),
            (self.lr is not None and self.lr > 0, "--lr must be > 0"),
            (self.val_every >= 1, "--val-every must be >= 1"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (self.num_workers is None or self.num_workers >= 0, "--num-workers must be >= 0"),
            (self.crop_size is not None and self.crop_size >= 0, "--crop-size must be >= 0 (0 = whole images)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FcnsegError(msg)

    def model_options(self) -> dict[str, Any]:
        """The model builder's keywords this configuration sets (the data adds classes and input channels):
        alignment, width and learnable upsampling always, every builder takes them; the other options only when
        set, so that a builder refuses, naming it, an option it does not have instead of ignoring it."""
        always = {"alignment": self.alignment, "width": self.width, "learnable_upsampling": self.learnable_upsampling}
        when_set = {
            "fc_dim": self.fc_dim,
            "batch_norm": self.batch_norm,
            "dropout": self.dropout,
            "backbone_weights": self.backbone_weights,
        }
        return {**always, **{k: v for k, v in when_set.items() if v is not None}}

    # -- YAML ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> dict[str, Any]:
        """The options a YAML file sets, checked against the fields and their types (not yet applied)."""
        data = _read_yaml(path, "--config")
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise FcnsegError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        out = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise FcnsegError(f"--config {path}: option names are text; got {shown(key)}")
            name = key.replace("-", "_")
            if name not in known:
                raise FcnsegError(f"--config {path}: unknown option {shown(key)}")
            if name in RUN_WRITTEN:
                raise FcnsegError(f"--config {path}: option {shown(key)} is written by the run; set class_weights "
                                  "to a file of weights instead")  # fmt: skip
            out[name] = _coerce(value, hints[name], f"--config {path}: option {shown(key)}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path, **notes: Any) -> None:
        """Write the configuration with the fcnseg version and git commit that ran it, and ``notes`` on how it ran
        (a training run's precision): read back for the record, never as options."""
        doc = {"fcnseg_version": __version__, "git_commit": _git_hash(), **notes, **self.to_dict()}
        with atomic_write(path, "w") as f:
            yaml.dump(doc, f, Dumper=_PlainDumper, sort_keys=False)


class _PlainDumper(yaml.SafeDumper):
    """Writes a value met twice out again instead of as an alias: the file is read back without aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation like ``int | None``; ints are accepted for floats."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    if isinstance(value, str) and len(value) > MAX_OPTION_CHARS:
        raise FcnsegError(f"{where}: a text of {len(value)} characters; expected at most {MAX_OPTION_CHARS}")
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool) and _fits_float(value):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if t is dict and isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
    names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
    raise FcnsegError(f"{where}: expected {names}, got {shown(value)}")


def _fits_float(value: int | float) -> bool:
    # An int of a few hundred digits is valid YAML but no float (float() would raise OverflowError).
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _read_yaml(path: str | Path, flag: str) -> Any:
    """The YAML document of an options file: plain data, no aliases (:func:`fcnseg.io.load_yaml`), at most
    :data:`MAX_CONFIG_BYTES`; every problem an :class:`FcnsegError` naming ``flag`` and the file."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise FcnsegError(f"{flag} {path}: {size} bytes; expected a YAML file of options (at most 1 MiB)")
        return load_yaml(Path(path).read_text())
    except FileNotFoundError:
        raise FcnsegError(f"{flag} {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e.__class__.__name__
        raise FcnsegError(f"{flag} {path}: cannot read ({reason})") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise FcnsegError(f"{flag} {path}: not valid YAML ({clipped(first, 200)})") from None


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _paper(cfg: TrainConfig) -> dict[str, Any]:
    # SGD, momentum 0.99, summed loss over one whole image: the release's recipe. Biases learn at twice the rate
    # without decay (Caffe's lr_mult 2 / decay_mult 0); the upsampling stays frozen.
    return {
        "optimizer": "sgd",
        "lr": PAPER_LR.get(cfg.model, 1e-10),
        "momentum": 0.99,
        "weight_decay": 5e-4,
        "bias_lr_mult": 2.0,
        "loss_reduction": "sum",
        "batch_size": 1,
        "warmup_iters": 0,
        "poly_power": 0.0,
        "amp": False,
        "crop_size": 0,  # whole images
        "scale_min": 1.0,
        "scale_max": 1.0,
        "flip": False,  # "mirroring and jitter gave no noticeable gain"
        "jitter": 0.0,
    }


def _modern(cfg: TrainConfig) -> dict[str, Any]:
    # Loss averaged over valid pixels, so the learning rate does not depend on image size; poly decay after a
    # linear warm-up, batches of random crops, mixed precision: bf16 autocast on GPUs and on CPUs that compute bf16
    # natively, whose loss curves stay within the seed-to-seed spread of fp32's (benchmarks/train_precision.py).
    adamw = cfg.optimizer == "adamw"
    return {
        "optimizer": "sgd",
        "lr": 1e-3 if adamw else 0.01,
        "momentum": 0.9,
        "weight_decay": 0.01 if adamw else 5e-4,
        "bias_lr_mult": 1.0,
        "loss_reduction": "mean",
        "batch_size": 8,
        "warmup_iters": min(100, cfg.iters // 10),
        "poly_power": 0.9,
        "amp": True,
        "crop_size": 320,
        "scale_min": 0.5,
        "scale_max": 2.0,
        "flip": True,
        "jitter": 0.0,
    }


PRESETS = {"paper": _paper, "modern": _modern}


def legacy_loss(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the former ``loss: sum`` / ``mean`` (the reduction, before ``loss`` named the loss) read as
    ``loss: ce`` with ``loss_reduction`` that: old option files, saved runs and ``--loss sum`` keep their meaning."""
    old = options.get("loss")
    if not isinstance(old, str) or old not in REDUCTIONS:
        return options
    given = options.get("loss_reduction")
    if given is not None and given != old:
        raise FcnsegError(f"--loss {old} (the former spelling of --loss-reduction {old}) contradicts "
                          f"--loss-reduction {shown(given)}")  # fmt: skip
    return {**options, "loss": "ce", "loss_reduction": old}


def layered_config(flags: dict[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """The configuration of ``fcnseg train``: defaults < the run's saved ``config.yaml`` (when resuming) < the YAML
    ``config_file`` < ``flags``, the options typed on the command line (field name: value)."""
    # Each layer's former loss: sum / mean is read on its own, so that a later layer's loss or loss_reduction
    # overrides it as it would the new spelling.
    from_file = TrainConfig.from_yaml(config_file) if config_file else {}
    merged: dict[str, Any] = {**legacy_loss(from_file), **legacy_loss(flags)}
    if merged.get("resume"):
        saved = Path(merged.get("out", TrainConfig.out)) / "config.yaml"
        if not saved.is_file():
            raise FcnsegError(f"--resume: {saved} not found; nothing to resume")
        base = _read_yaml(saved, "--resume")
        if not isinstance(base, dict):
            raise FcnsegError(f"--resume: {saved} holds a {type(base).__name__}; expected a run's saved options")
        base = saved_options(base.get("model", ""), base)  # fc_dim & co. saved for a builder without them
        base = {k: v for k, v in base.items() if k in {f.name for f in fields(TrainConfig)}}
        merged = {**legacy_loss(base), **merged}
    return TrainConfig(**merged)
