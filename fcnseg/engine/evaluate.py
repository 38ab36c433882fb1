"""Evaluation: one confusion matrix over a whole split, optional test-time augmentation, report files."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._meta import IGNORE_INDEX
from ..inference import Predictor
from ..io import atomic_write
from ..metrics import ConfusionMatrix


def boundary_band(target: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within ``width`` pixels (Chebyshev distance) of a class edge of ``target`` (N x H x W or H x W).

    An edge pixel is one whose 3 x 3 neighbourhood holds another label; void pixels are never in the band. IU
    inside this band measures how well a model localises boundaries (the "trimap" evaluation).
    """
    t = target if target.dim() == 3 else target[None]
    x = t[:, None].float()
    hi = F.max_pool2d(x, 3, 1, 1)
    lo = -F.max_pool2d(-x, 3, 1, 1)
    edge = (hi != lo).float()
    band = F.max_pool2d(edge, 2 * width + 1, 1, width) > 0 if width > 0 else edge > 0
    band = band[:, 0] & (t != IGNORE_INDEX)
    return band if target.dim() == 3 else band[0]


def predictor_for(
    model: nn.Module,
    predictor: Predictor | None,
    *,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Predictor:
    """``predictor``, else one of ``model`` on ``runner`` (default eager) with ``flip`` and ``scales``."""
    if predictor is not None:
        return predictor
    return Predictor(model, runtime=runner or "eager", flip=flip, scales=scales)


ImageCallback = Callable[[dict[str, ConfusionMatrix]], None]
"""Called with one image's confusion matrices, ``{head: matrix}`` (see :func:`count`)."""


def count(
    cms: Mapping[str, ConfusionMatrix],
    preds: Sequence[torch.Tensor],
    truths: Sequence[torch.Tensor],
    on_image: ImageCallback | None = None,
) -> None:
    """Add a batch to ``cms``: per head (in ``cms``' order) its N x H x W predicted labels against its truth.

    With ``on_image`` the batch is counted image by image instead: each image's own matrices go to ``on_image``
    and are then added to ``cms``, so the totals are the same and no pixel is counted twice. Nothing but the
    matrices is kept: a caller records what it needs of them (e.g. a score per image)."""
    if on_image is None:
        for cm, pred, truth in zip(cms.values(), preds, truths, strict=True):
            cm.update(pred, truth)
        return
    for i in range(len(truths[0])):
        own = {
            name: ConfusionMatrix(cm.num_classes, cm.class_names, device=truth.device, exclude=cm.exclude)
            for (name, cm), truth in zip(cms.items(), truths, strict=True)
        }
        for (name, cm), pred, truth in zip(cms.items(), preds, truths, strict=True):
            cm.merge(own[name].update(pred[i], truth[i]))
        on_image(own)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    *,
    device: torch.device | str = "cpu",
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    boundary_width: int | None = None,
    class_names: Sequence[str] | None = None,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    exclude: Sequence[int] = (),
    on_image: ImageCallback | None = None,
    predictor: Predictor | None = None,
) -> ConfusionMatrix | tuple[ConfusionMatrix, ConfusionMatrix]:
    """Accumulate one confusion matrix over ``loader`` (summed across ranks under DDP).

    With ``boundary_width`` also returns the matrix restricted to pixels within that distance of a class edge.
    ``predictor``: how to predict (:class:`~fcnseg.inference.Predictor`: execution path, tiling, test-time
    augmentation); by default one of ``model`` on ``runner`` (eager when None) with ``flip`` and ``scales``.
    ``exclude``: class indices left out of the mean accuracy and mean IU (classes a test set lacks).
    ``on_image``: called once per image with ``{"out": that image's matrix}`` (:func:`count`).
    """
    predictor = predictor_for(model, predictor, runner=runner, flip=flip, scales=scales)
    cm = ConfusionMatrix(num_classes, class_names, exclude=exclude)
    band_cm = ConfusionMatrix(num_classes, class_names, exclude=exclude) if boundary_width is not None else None
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        pred = next(iter(predictor.batch_masks(images).values())).to(masks.device)
        count({"out": cm}, [pred], [masks], on_image)
        if band_cm is not None:
            band = boundary_band(masks, boundary_width)
            band_cm.update(pred[band], masks[band])
    cm.all_reduce()
    if band_cm is not None:
        band_cm.all_reduce()
        return cm, band_cm
    return cm


@torch.no_grad()
def evaluate_heads(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    head_classes: Mapping[str, Sequence[str]],
    *,
    device: torch.device | str = "cpu",
    exclude: Mapping[str, Sequence[int]] | None = None,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    on_image: ImageCallback | None = None,
    predictor: Predictor | None = None,
) -> dict[str, ConfusionMatrix]:
    """One confusion matrix per head of ``model`` (one for most models; SIFT Flow's semantic and geometric), in
    one pass over ``loader``, summed across ranks under DDP.

    ``loader`` yields masks N x H x W for one head, N x K x H x W for K heads (the k-th map labels the k-th head);
    ``head_classes`` names each head's classes in the model's head order; ``exclude`` maps a head to class indices
    left out of its means; ``predictor`` (or ``runner``, ``flip`` and ``scales``): as :func:`evaluate`'s;
    ``on_image``: called once per image, in the loader's order, with ``{head: that image's matrix}`` (see
    :func:`count`).
    """
    if len(model.heads) != len(head_classes):
        raise ValueError(f"the model has heads {list(model.heads)}, the data {list(head_classes)}")
    cms = {
        name: ConfusionMatrix(len(names), list(names), exclude=(exclude or {}).get(name, ()))
        for name, names in head_classes.items()
    }
    predictor = predictor_for(model, predictor, runner=runner, flip=flip, scales=scales)
    for images, masks in loader:
        per_head = masks[:, None] if masks.dim() == 3 else masks
        preds = [pred.to(masks.device) for pred in predictor.batch_masks(images.to(device)).values()]
        count(cms, preds, per_head.unbind(1), on_image)
    for cm in cms.values():
        cm.all_reduce()
    return cms


def _clean(v: float) -> float | None:
    return None if math.isnan(v) else v


def metrics_dict(cm: ConfusionMatrix, class_names: Sequence[str]) -> dict[str, Any]:
    """The ``metrics.json`` document: the four figures (fractions) and a per-class table."""
    r = cm.compute()
    excluded = {"excluded_from_means": [class_names[i] for i in cm.exclude]} if cm.exclude else {}
    return {
        **excluded,
        "pixel_acc": _clean(r["pixel_acc"]),
        "mean_acc": _clean(r["mean_acc"]),
        "mean_iu": _clean(r["mean_iu"]),
        "fw_iu": _clean(r["fw_iu"]),
        "per_class": {
            name: {"iu": _clean(iu), "acc": _clean(acc), "pixels": px}
            for name, iu, acc, px in zip(class_names, r["per_class_iu"], r["per_class_acc"], r["pixels"], strict=True)
        },
    }


def write_report(
    cm: ConfusionMatrix, class_names: Sequence[str], out: str | Path, *, evaluated_on: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write metrics.json, confusion.csv, confusion.png and per_class.png into ``out``; returns the metrics.
    ``evaluated_on`` (``{"dataset": ..., "split": ...}``) is recorded in metrics.json: a model card that shows the
    figures names what they were measured on."""
    from .plots import plot_confusion, plot_per_class

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**(evaluated_on or {}), **metrics_dict(cm, class_names)}
    with atomic_write(out / "metrics.json", "w") as f:
        json.dump(doc, f, indent=2)
    with atomic_write(out / "confusion.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(["ground truth \\ predicted", *class_names])
        for name, row in zip(class_names, cm.mat.cpu().tolist(), strict=True):
            w.writerow([name, *row])
    plot_confusion(cm.mat.cpu().numpy(), class_names, out / "confusion.png")
    plot_per_class(doc, out / "per_class.png")
    return doc
