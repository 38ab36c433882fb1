"""Fitting a model to a training run: the network ``TrainConfig`` names, sized for the data (its label sets, its
input channels), then optionally started from a coarser net (staged training, the paper's 32s -> 16s -> 8s).

The pure state-dict part of staged initialisation is :func:`fcnseg.models.adapt.fit_state_dict`; the rest reads
files and sets the model's preprocessing.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.base import SegmentationDataset
from ..errors import FcnsegError
from ..models import get_model
from ..models.adapt import fit_state_dict
from ..preprocessing import Preprocessing
from .config import TrainConfig


def build_model(cfg: TrainConfig, ds: SegmentationDataset) -> nn.Module:
    """The model ``cfg`` names, fitted to the data: its classes, its input channels (NYUDv2 RGBD widens the
    first layer: early fusion) and, for a two-headed model, both label sets."""
    model = get_model(cfg.model, **cfg.model_options(), **_data_options(cfg, ds))
    model.classes = list(ds.classes)
    if getattr(ds, "palette", None) is not None:  # the data's own colours (a folder set's mask colours), kept
        model.palette = [[int(v) for v in c] for c in np.asarray(ds.palette)[: len(ds.classes)]]
    if len(model.heads) > 1:  # several label sets: every head's class names
        model.head_classes = {k: list(v) for k, v in head_classes(ds).items()}
    fit_input(model, ds)
    return model


def _data_options(cfg: TrainConfig, ds: SegmentationDataset) -> dict[str, Any]:
    """The builder options the data decides (classes, heads, input channels), checked against the model."""
    from ..models.registry import get_builder

    accepted = inspect.signature(get_builder(cfg.model)).parameters
    heads = head_classes(ds)
    options: dict[str, Any] = {"num_classes": len(next(iter(heads.values())))}
    _check_heads(cfg, heads, accepted)
    if len(heads) > 1:
        options["heads"] = {name: len(classes) for name, classes in heads.items()}
    channels = getattr(ds, "channels", 3)
    # 3: any one-stream model, whose first layer widens (early fusion); a builder without the option takes colour.
    fixed = accepted["in_channels"].default if "in_channels" in accepted else 3
    if "in_channels" not in accepted and channels != 3:
        raise FcnsegError(f"--model {cfg.model} takes colour images only; --dataset {cfg.dataset} gives {channels} "
                          "channels")  # fmt: skip
    if fixed not in (3, channels):
        raise FcnsegError(
            f"--model {cfg.model} takes {fixed} input channels but --dataset {cfg.dataset} gives {channels}; "
            "pick a model or a --data-option modality that match"
        )
    if channels != fixed:
        options["in_channels"] = channels
    return options


def _check_heads(cfg: TrainConfig, heads: Mapping[str, Any], accepted: Mapping[str, Any]) -> None:
    """One label set for a one-headed model; as many as it has heads for a builder of several (one that takes
    ``heads``, {label set: classes}; its default model, built on the meta device, says how many)."""
    with torch.device("meta"):
        own = len(get_model(cfg.model).heads) if "heads" in accepted else 1
    word = {2: "two", 3: "three"}.get(own, str(own))
    if len(heads) > 1 and own == 1:
        raise FcnsegError(
            f"--model {cfg.model}: --dataset {cfg.dataset} gives {len(heads)} label sets ({', '.join(heads)}); "
            "expected a two-headed model (fcn16s_twohead) or one label set (e.g. --data-option target=semantic)"
        )
    if len(heads) != own and own > 1:
        raise FcnsegError(
            f"--model {cfg.model} is {word}-headed: expected a dataset with {word} label sets "
            "(SIFT Flow: --data-option target=both)"
        )


def head_classes(ds: SegmentationDataset) -> dict[str, tuple[str, ...]]:
    """Class names per label set of ``ds``: ``{"out": classes}`` for one, SIFT Flow's two with target=both."""
    return dict(getattr(ds, "head_classes", None) or {"out": tuple(ds.classes)})


def fit_input(model: nn.Module, ds: SegmentationDataset) -> None:
    """Normalise the channels that are not colour (depth, HHA) with the dataset's means (``channel_means``), scaled
    like the model's colour channels and never reversed; colour channels keep the model's own normalisation."""
    means = tuple(getattr(ds, "channel_means", ()) or ())
    if not means or all(m is None for m in means) or len(means) != model.preprocessing.channels:
        return
    pp = model.preprocessing.color()
    if means[:3] == (None, None, None):  # colour first, then depth / HHA
        model.preprocessing = pp.with_extra_channels(means[3:])
    elif None not in means:  # no colour at all (HHA alone): every channel is an "extra" one
        scale = sum(pp.std) / 3
        mean = tuple(m * pp.value_range / 255.0 for m in means)
        model.preprocessing = Preprocessing(mean, (scale,) * len(means), "RGB", pp.value_range)


def has_non_color(ds: SegmentationDataset) -> bool:
    """Whether ``ds`` gives channels other than colour (depth, HHA)."""
    return any(m is not None for m in (getattr(ds, "channel_means", ()) or ()))


def staged_init(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise from a coarser net's checkpoint (32s -> 16s -> 8s) or from published weights by name: copy
    every layer both nets have, with the same shape; the new score layers (and score layers for another number of
    classes) keep their zero initialisation. A colour net's first layer is widened for an early-fusion net (the
    paper's RGBD from its RGB FCN-32s), and a one-stream net starts every stream of a late-fusion one. The model
    takes over the source's preprocessing, which its weights were trained with. ``path``: a checkpoint file, a
    published weights name, a Hugging Face Hub model ``hf:USER/NAME[@REVISION]`` or a folder written by
    ``save_pretrained``. Returns the names left as they were."""
    from ..hub import checkpoint_of

    ckpt = checkpoint_of(path)
    own = model.state_dict()
    src = fit_state_dict(ckpt["state_dict"], own)
    model.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"]).for_channels(model.preprocessing.channels)
    shared = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    if not any(".backbone." in f".{k}" for k in shared):
        raise FcnsegError(f"--init-from {path}: shares no backbone layer with {model.build_config['name']}")
    model.load_state_dict(shared, strict=False)
    left = sorted(set(own) - set(shared))
    missed = [k for k in left if ".backbone." in f".{k}"]
    if missed:  # a trunk layer of another shape (e.g. another width) keeps its random start: say so
        print(f"fcnseg: warning: --init-from {path}: {len(missed)} backbone tensor(s) do not fit and keep their "
              f"initialisation, e.g. {missed[0]}", file=sys.stderr)  # fmt: skip
    return left
