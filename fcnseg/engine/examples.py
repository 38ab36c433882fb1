"""The worst and the best images of an evaluation, for its HTML report (:mod:`fcnseg.engine.report`).

While the evaluation runs, :class:`ImageScores` keeps one ``(dataset index, mean IU)`` pair per image and head,
never an image or a prediction. Afterwards :func:`find_examples` ranks the pairs, reads the N worst and N best
images again and predicts them once more, on the same execution path and with the same test-time augmentation,
to draw them: memory stays bounded by 2N images whatever the size of the set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.base import SegmentationDataset
from ..inference import Predictor
from ..metrics import ConfusionMatrix
from .distributed import gather_objects
from .evaluate import predictor_for
from .fitting import head_classes

Scores = dict[str, list[tuple[int, float]]]
"""Per head, ``(dataset index, mean IU)`` of every image evaluated (NaN for an image without labelled pixels)."""


@dataclass(frozen=True)
class Example:
    """One image of the report: its dataset index and id, its mean IU, and image / truth / prediction arrays."""

    index: int
    name: str
    iu: float
    image: np.ndarray  # H x W x 3 uint8, as shown
    truth: np.ndarray  # H x W class indices, 255 = void
    pred: np.ndarray  # H x W class indices


@dataclass(frozen=True)
class Examples:
    """A head's worst images (lowest mean IU first) and best ones (highest first), and how many were ranked."""

    worst: list[Example]
    best: list[Example]
    ranked: int  # images with a mean IU
    unscored: int  # images without a labelled pixel: no IU, left out


def image_mean_iu(cm: ConfusionMatrix) -> float:
    """One image's mean IU: over the classes present in its truth or its prediction (IU is undefined for the
    others), less the classes ``cm`` leaves out of the means; void pixels are not counted. NaN for an image
    without a labelled pixel."""
    return cm.compute()["mean_iu"]


class ImageScores:
    """The ``on_image`` callback of :func:`~fcnseg.engine.evaluate.evaluate_heads` (and ``evaluate``): records
    ``(dataset index, mean IU)`` per image and head. ``indices``: the dataset index of each image in the order the
    loader yields them (a sampler's indices; ``range(n)`` for an unshuffled loader)."""

    def __init__(self, indices: Iterable[int]) -> None:
        self._indices = iter(indices)
        self.scores: Scores = {}

    def __call__(self, per_head: Mapping[str, ConfusionMatrix]) -> None:
        index = next(self._indices)
        for head, cm in per_head.items():
            self.scores.setdefault(head, []).append((index, image_mean_iu(cm)))

    def gathered(self) -> Scores:
        """Every process's scores merged (under ``torchrun`` each process scored its shard); every process must
        call it. Without torch.distributed: this process's."""
        merged: Scores = {}
        for part in gather_objects(self.scores):
            for head, pairs in part.items():  # type: ignore[union-attr]
                merged.setdefault(head, []).extend(pairs)
        return merged


def rank(pairs: Iterable[tuple[int, float]], n: int) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The ``n`` worst ``(index, iu)`` pairs (lowest IU first) and the ``n`` best (highest first), NaN left out,
    ties broken by index. The lists never share an image: with fewer than 2n ranked images the worst take the
    lower half (rounded up) and the best the rest."""
    ranked = sorted(((i, s) for i, s in pairs if not math.isnan(s)), key=lambda p: (p[1], p[0]))
    worst = ranked[: min(n, (len(ranked) + 1) // 2)]
    best = ranked[len(worst) :][::-1][:n]
    return worst, best


def shown(image: np.ndarray) -> np.ndarray:
    """The colour picture of a dataset image: its first three channels (colour comes first in depth and HHA
    inputs), a single channel repeated as grey."""
    a = np.asarray(image)
    a = a[:, :, None] if a.ndim == 2 else a
    a = np.repeat(a[:, :, :1], 3, axis=2) if a.shape[2] < 3 else a[:, :, :3]
    return np.ascontiguousarray(a, dtype=np.uint8)


@torch.no_grad()
def predict_items(
    model: nn.Module,
    ds: SegmentationDataset,
    indices: Iterable[int],
    *,
    device: torch.device | str = "cpu",
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    predictor: Predictor | None = None,
) -> dict[int, tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]]:
    """``{index: (image as shown, truth per head, prediction per head)}`` for items ``indices`` of ``ds``, each
    read once and predicted as the evaluation predicts it (``predictor``, or ``runner``, ``flip`` and ``scales``:
    as :func:`~fcnseg.engine.evaluate.evaluate`'s)."""
    predictor = predictor_for(model, predictor, runner=runner, flip=flip, scales=scales)
    out = {}
    for i in sorted(set(indices)):
        image, mask = ds[i]
        x = image.as_subclass(torch.Tensor)[None].to(device)
        preds = [pred[0].cpu().numpy() for pred in predictor.batch_masks(x).values()]
        mask = mask.as_subclass(torch.Tensor)
        truths = list((mask[None] if mask.dim() == 2 else mask).cpu().numpy())
        out[i] = (shown(ds.load_pair(i)[0]), truths, preds)
    return out


def find_examples(
    model: nn.Module, ds: SegmentationDataset, scores: Scores, n: int, **kwargs: Any
) -> dict[str, Examples]:
    """Per head of ``ds`` (:func:`~fcnseg.engine.fitting.head_classes`) that ``scores`` covers: its ``n`` worst
    and ``n`` best images (:func:`rank`), read and predicted again (:func:`predict_items`, keywords as there;
    an image picked by several heads once)."""
    heads = list(head_classes(ds))
    picks = {head: rank(pairs, n) for head, pairs in scores.items()}
    items = predict_items(model, ds, [i for w, b in picks.values() for i, _ in w + b], **kwargs)
    ids = getattr(ds, "ids", None)

    def example(i: int, iu: float, k: int) -> Example:
        name = str(ids[i]) if ids is not None else f"#{i}"
        image, truths, preds = items[i]
        return Example(index=i, name=name, iu=iu, image=image, truth=truths[k], pred=preds[k])

    out = {}
    for head, (worst, best) in picks.items():
        k = heads.index(head)
        ranked = sum(not math.isnan(s) for _, s in scores[head])
        out[head] = Examples(
            worst=[example(i, s, k) for i, s in worst],
            best=[example(i, s, k) for i, s in best],
            ranked=ranked,
            unscored=len(scores[head]) - ranked,
        )
    return out
