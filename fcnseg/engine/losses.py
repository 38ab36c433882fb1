"""Training losses over logits (N x C x H x W) and masks (N x H x W, 255 = void), and per-class weights for them.

Every loss returns a SUM over the batch's valid pixels, so that :func:`fcnseg.engine.train.train_step` reduces it
as it reduces the cross-entropy: ``--loss-reduction sum`` keeps the sum, ``mean`` divides by the valid pixels of
the whole step (every micro-batch, every process). Void pixels never count, in a loss or in its pixel count.

- ``ce``: cross-entropy, ``-w[y] log p_y`` per pixel. With class weights, ``mean`` still divides by the number of
  valid pixels, not by the sum of their weights as PyTorch's ``cross_entropy(weight=..., reduction="mean")`` does:
  the divisor of a step then does not depend on which classes its pixels hold, and stays the one number that
  gradient accumulation and DDP share.
- ``focal``: Lin et al. 2017 (RetinaNet), ``-alpha[y] (1 - p_y)^gamma log p_y`` per pixel, alpha = the class
  weights (1 without); gamma 0 is the cross-entropy.
- ``dice``: soft Dice of Milletari et al. 2016 (V-Net) per class over the batch's valid pixels,
  ``D_c = 2 sum p_c g_c / (sum p_c^2 + sum g_c)`` (``g_c`` 0/1, so ``g_c^2 = g_c``); the loss is
  ``1 - D_c`` averaged over the classes present in the batch's ground truth (weighted by the class weights when
  given), times the batch's valid pixels.
- ``lovasz``: Lovász-Softmax of Berman et al. 2018, per image: for each class present in the image's ground truth,
  the Lovász extension of its Jaccard loss evaluated at the pixel errors ``|g_c - p_c|``; averaged over those
  classes (weighted by the class weights when given), times the image's valid pixels.

Dice and Lovász are set functions, not sums over pixels: scaling them by the valid pixels they were computed on
makes ``mean`` the valid-pixel-weighted average of the micro-batches' (Dice) or images' (Lovász) losses -- exactly
the Dice loss of the batch for one micro-batch on one process -- and keeps ``sum`` on the cross-entropy's scale.
With gradient accumulation the Dice is taken per micro-batch, so it is not the Dice of the bigger batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._meta import IGNORE_INDEX
from ..errors import FcnsegError, clipped

__all__ = [
    "LOSSES",
    "MAX_WEIGHTS_BYTES",
    "class_pixel_counts",
    "cross_entropy",
    "dice_loss",
    "focal_loss",
    "lovasz_jaccard",
    "lovasz_softmax",
    "median_frequency",
    "median_frequency_weights",
    "pixel_loss",
    "read_class_weights",
]

LOSSES = ("ce", "focal", "dice", "lovasz")
MAX_WEIGHTS_BYTES = 1 << 20
"""A file of class weights holds a few numbers per class; anything past a mebibyte is not one."""


def pixel_loss(
    kind: str, logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None, gamma: float = 2.0
) -> torch.Tensor:
    """The loss ``kind`` (one of :data:`LOSSES`) of ``logits`` against ``masks``, summed over the valid pixels."""
    if kind == "ce":
        return cross_entropy(logits, masks, weights)
    if kind == "focal":
        return focal_loss(logits, masks, weights, gamma=gamma)
    if kind == "dice":
        return dice_loss(logits, masks, weights)
    if kind == "lovasz":
        return lovasz_softmax(logits, masks, weights)
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")


def _picked(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log p_y`` at every pixel (0 at void ones), the valid pixels, and the labels with void replaced by 0."""
    valid = masks != IGNORE_INDEX
    labels = torch.where(valid, masks, 0)
    logp = F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
    return torch.where(valid, logp, 0.0), valid, labels


def cross_entropy(logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``sum over valid pixels of -w[y] log p_y`` (``w`` = 1 without weights)."""
    if weights is None:  # the original code path, bit for bit: runs started before class weights resume unchanged
        return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    logp, valid, labels = _picked(logits, masks)
    return -(weights[labels] * logp)[valid].sum()


def focal_loss(
    logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None, gamma: float = 2.0
) -> torch.Tensor:
    """``sum over valid pixels of -alpha[y] (1 - p_y)^gamma log p_y`` (Lin et al. 2017; alpha = 1 without
    weights)."""
    logp, valid, labels = _picked(logits, masks)
    # 1 - p_y >= 0 in exact arithmetic. The clamp keeps a rounding past it from giving a negative base, and a
    # p_y of exactly 1 from an infinite derivative of (1 - p_y)^gamma for gamma < 1 (times log p_y = 0: NaN).
    per_pixel = -((1 - logp.exp()).clamp(min=torch.finfo(logp.dtype).tiny) ** gamma) * logp
    if weights is not None:
        per_pixel = per_pixel * weights[labels]
    return per_pixel[valid].sum()


def _class_mean(per_class: torch.Tensor, present: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``per_class`` (one value per ``present`` class), weighted by ``weights`` (one per class) when
    given."""
    if weights is None:
        return per_class.mean()
    w = weights[present].to(per_class.dtype)
    # All-zero weights on the present classes (a user's file) give 0, not 0 / 0.
    return (w * per_class).sum() / w.sum().clamp(min=torch.finfo(per_class.dtype).tiny)


def _valid_columns(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (C x P) and one-hot ground truth (C x P) of the valid pixels of ``logits`` / ``masks``
    (one image, C x H x W / H x W, or a batch, N x C x H x W / N x H x W)."""
    channels = 0 if logits.dim() == 3 else 1
    probs = F.softmax(logits, dim=channels).movedim(channels, 0)
    valid = masks != IGNORE_INDEX
    p = probs[:, valid]
    classes = torch.arange(logits.shape[channels], device=masks.device)
    return p, (masks[valid][None] == classes[:, None]).to(p.dtype)


def dice_loss(logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - D_c`` averaged over the classes present in the batch's valid ground truth, ``D_c`` Milletari et al.'s
    soft Dice over the whole batch, times the number of valid pixels (0 when there is none)."""
    p, g = _valid_columns(logits, masks)
    if g.shape[1] == 0:
        return logits.sum() * 0.0  # no valid pixel: no loss, and a gradient of zeros
    present = g.sum(1) > 0
    p, g = p[present], g[present]  # sum g >= 1 on these rows: no division by zero
    dice = 2 * (p * g).sum(1) / ((p * p).sum(1) + g.sum(1))
    return _class_mean(1 - dice, present, weights) * g.shape[1]


def lovasz_softmax(logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Berman et al.'s Lovász-Softmax per image, averaged over the classes present in the image's valid ground
    truth, times the image's valid pixels, summed over the batch."""
    total = logits.sum() * 0.0  # keeps the graph (and a zero gradient) when no image has a valid pixel
    for image_logits, image_mask in zip(logits, masks, strict=True):
        p, g = _valid_columns(image_logits, image_mask)
        if g.shape[1] == 0:
            continue
        present = g.sum(1) > 0
        per_class = lovasz_jaccard((g[present] - p[present]).abs(), g[present])
        total = total + _class_mean(per_class, present, weights) * g.shape[1]
    return total


def lovasz_jaccard(errors: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The Lovász extension of the Jaccard loss of each row (class) at ``errors`` (C x P, in [0, 1]), ``truth``
    the rows' 0/1 ground truth.

    The Jaccard loss of a set M of mispredicted pixels is ``|M| / |G u M|`` (G: the class's pixels), and its
    Lovász extension at m is ``sum_i m_(i) (J({1..i}) - J({1..i-1}))`` with the errors sorted in decreasing order
    (Berman et al. 2018, eq. 8-9). The first i sorted pixels as M: ``|G u M| = |G| + `` the pixels of other
    classes among them.
    """
    sorted_errors, order = errors.sort(dim=1, descending=True)
    outside = (1 - truth.gather(1, order)).cumsum(1)
    count = torch.arange(1, errors.shape[1] + 1, device=errors.device, dtype=errors.dtype)
    jaccard = count / (truth.sum(1, keepdim=True) + outside)
    steps = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)
    return (sorted_errors * steps).sum(1)


# ----------------------------------------------------------------------------------------------------- class weights


def class_pixel_counts(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of each class in ``mask`` (void and values past the classes left out)."""
    return np.bincount(np.asarray(mask, dtype=np.int64).ravel(), minlength=256)[:num_classes]


def median_frequency(counts: Iterable[np.ndarray]) -> list[float]:
    """Median frequency balancing (Eigen & Fergus 2015) from each mask's :func:`class_pixel_counts`:
    ``w_c = median(freq) / freq_c``, where ``freq_c`` is the pixels of class c divided by the labelled (non-void)
    pixels of the masks in which c occurs. The median is taken over the classes that occur (numpy's: the mean of
    the middle two for an even count); a class that never occurs gets 0, a weight no training pixel ever meets."""
    pixels: np.ndarray | None = None
    holding: np.ndarray | None = None  # labelled pixels of the masks in which each class occurs
    for c in counts:
        if pixels is None:
            pixels, holding = np.zeros(len(c), np.int64), np.zeros(len(c), np.int64)
        pixels += c
        holding[c > 0] += int(c.sum())
    if pixels is None or not pixels.any():
        return [0.0] * (0 if pixels is None else len(pixels))
    seen = pixels > 0
    freq = pixels / np.maximum(holding, 1)
    median = float(np.median(freq[seen]))
    return [median / f if s else 0.0 for f, s in zip(freq.tolist(), seen.tolist(), strict=True)]


def median_frequency_weights(masks: Iterable[np.ndarray], num_classes: int) -> list[float]:
    """:func:`median_frequency` of ``masks`` (H x W class indices, 255 = void) for ``num_classes`` classes."""
    return median_frequency(class_pixel_counts(m, num_classes) for m in masks) or [0.0] * num_classes


def read_class_weights(path: str | Path, classes: Sequence[str], flag: str = "--class-weights") -> list[float]:
    """One weight per class from ``path``: a JSON list, a text file of one number per line (blank lines and lines
    starting with ``#`` skipped), or a run's ``class_weights.json`` (its first label set). Every problem is an
    :class:`FcnsegError` of one line naming the file."""
    where = f"{flag} {path}"
    values = _parse_weights(_read_text(path, where), where)
    if len(values) != len(classes):
        names = clipped(", ".join(classes), 120)
        raise FcnsegError(f"{where}: {len(values)} weight(s); expected {len(classes)}, one per class ({names})")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise FcnsegError(f"{where}: weight {i + 1} ({classes[i]}) is {clipped(repr(v), 40)}; expected a "
                              "finite number >= 0")  # fmt: skip
    if not any(values):
        raise FcnsegError(f"{where}: every weight is 0; expected at least one above 0")
    return [float(v) for v in values]


def _read_text(path: str | Path, where: str) -> str:
    try:
        size = Path(path).stat().st_size
        if size > MAX_WEIGHTS_BYTES:
            raise FcnsegError(f"{where}: {size} bytes; expected a short file of class weights (at most 1 MiB)")
        return Path(path).read_text()
    except FileNotFoundError:
        raise FcnsegError(f"{where}: file not found; expected none, median-freq or a file of weights") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"{where}: cannot read ({getattr(e, 'strerror', None) or type(e).__name__})") from None


def _parse_weights(text: str, where: str) -> list:
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            data = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError) as e:
            raise FcnsegError(f"{where}: not valid JSON ({clipped(str(e).splitlines()[0], 120)})") from None
        if isinstance(data, Mapping):  # a run's class_weights.json: the first label set's weights
            sets = data.get("label_sets")
            first = next(iter(sets.values()), None) if isinstance(sets, Mapping) and sets else None
            data = first.get("weights") if isinstance(first, Mapping) else None
            if not isinstance(data, list):
                raise FcnsegError(f"{where}: a JSON object without label_sets.*.weights; expected a JSON list of "
                                  "weights or a run's class_weights.json")  # fmt: skip
        return data
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            values.append(float(line))
        except ValueError:
            raise FcnsegError(f"{where}: line {number} is {clipped(repr(line), 40)}; expected one number") from None
    return values
