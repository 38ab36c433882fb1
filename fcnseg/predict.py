"""Predictions of whole images as arrays and as files: thin functions over :class:`fcnseg.inference.Predictor`.

``predict_mask``, ``predict_proba`` and ``predict_logits`` are the functional forms of ``model.predict``,
``model.predict_proba`` and the Predictor's logits, with the same options and the same results; ``save_prediction``
writes what ``fcnseg predict`` writes (``write_prediction``, from predictions already made). ``batch_groups`` puts
images of one size together, bounded in count and in the pixels one forward pass computes on (``forward_size``), as
``fcnseg predict --batch`` and ``fcnseg serve --batch`` run them.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from . import _memory
from .imageio import add_legend, overlay, save_mask_png, save_rgb
from .inference import Outputs, Predictor, model_input
from .io import atomic_write, remove_stale_temporaries
from .models.base import SegmentationModel

__all__ = [
    "BATCH_PIXELS",
    "batch_groups",
    "confidence_png",
    "forward_area",
    "forward_size",
    "mask_colors",
    "model_input",
    "output_names",
    "output_stems",
    "predict_logits",
    "predict_mask",
    "predict_proba",
    "save_prediction",
    "write_prediction",
]

T = TypeVar("T")

# The padded pixels one forward pass of `fcnseg predict --batch` may compute on, all its images together: 8 MP, the
# server's default --max-pixels for one image (about 3 GB of activations in VGG16's fp32 forward pass).
BATCH_PIXELS = 8_388_608


def _predictor(model: SegmentationModel, runner: Callable | None, options: dict[str, Any]) -> Predictor:
    # ``runner``: a built execution path (fcnseg.runtime.make_runner); a path's name goes in ``runtime``.
    if runner is not None:
        options = {**options, "runtime": runner}
    options.setdefault("runtime", "eager")
    return Predictor(model, **options)


def predict_logits(
    model: SegmentationModel, image: Any, *, runner: Callable | None = None, **options: Any
) -> dict[str, torch.Tensor]:
    """``{head: classes x H x W}`` float logits of one image (path, PIL image or array), preprocessed as the model
    expects. Options as :class:`~fcnseg.inference.Predictor` (default runtime: eager); ``runner``: a built path."""
    return _predictor(model, runner, options).logits([image])[0]


def predict_proba(
    model: SegmentationModel, image: Any, *, head: str | None = None, runner: Callable | None = None, **options: Any
) -> np.ndarray | dict[str, np.ndarray]:
    """As ``model.predict_proba`` (C x H x W float32; ``{head: ...}`` for several heads unless ``head`` names one),
    on the eager path unless ``runtime`` or ``runner`` says otherwise."""
    return model._one(_predictor(model, runner, options).proba([image])[0], head)


def predict_mask(
    model: SegmentationModel, image: Any, *, head: str | None = None, runner: Callable | None = None, **options: Any
) -> np.ndarray:
    """One H x W mask (uint8 for up to 256 classes): the model's only head's, or ``head``'s. A model of several
    heads without ``head`` is a one-line error (``model.predict`` gives every head's). With ``tile`` alone, labels
    are made band by band, so memory stays bounded by the tile height, not the image."""
    name = model.check_head(head)
    return _predictor(model, runner, options).masks([image])[0][name]


# ---------------------------------------------------------------------------------------------- writing masks


def output_names(
    model: SegmentationModel,
    stem: str,
    *,
    overlay_format: str | None = None,
    probs: bool = False,
    confidence: bool = False,
) -> list[str]:
    """Every file name :func:`save_prediction` writes for ``stem``: the mask, and the overlay, probabilities and
    confidence when asked for, of each head of the model (the first head's under ``stem``, the others' under
    ``STEM_<head>``)."""
    names = []
    for i, head in enumerate(model.heads):
        name = _head_stem(stem, i, head)
        names.append(f"{name}.png")
        if overlay_format:
            names.append(f"{name}_overlay.{overlay_format}")
        if probs:
            names.append(f"{name}.npy")
        if confidence:
            names.append(f"{name}_confidence.png")
    return names


def _head_stem(stem: str, index: int, head: str) -> str:
    return stem if index == 0 else f"{stem}_{head}"


def output_stems(files: Sequence[Path], names: Callable[[str], Sequence[str]] | None = None) -> list[str]:
    """The output name of each input: its stem, else ``STEM-2``, ``STEM-3``, ... the first under which none of the
    files it writes (``names(stem)``, default ``STEM.png``; see :func:`output_names`) is written for an earlier
    input. So two inputs of one stem (a/x.jpg, b/x.png), or an input whose stem is another's output (x.png and
    x_overlay.png, x-2.png), never write over each other's files. Names are compared case-folded, as a
    case-insensitive file system compares them."""
    names = names or (lambda stem: [f"{stem}.png"])
    taken: set[str] = set()
    stems = []
    for f in files:
        stem, n = f.stem, 1
        while any(name.casefold() in taken for name in names(stem)):
            n += 1
            stem = f"{f.stem}-{n}"
        taken.update(name.casefold() for name in names(stem))
        stems.append(stem)
    return stems


def mask_colors(model: SegmentationModel) -> np.ndarray:
    """The colours of the model's first head's classes, N x 3 uint8 (its palette, else colours for its names)."""
    return next(iter(model.class_colors().values()))


def confidence_png(confidence: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of an H x W confidence map in [0, 1]: pixel value = round(confidence x 65535)."""
    levels = np.rint(np.clip(confidence, 0.0, 1.0) * 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(levels).save(buf, format="PNG")
    return buf.getvalue()


def save_prediction(
    predictor: Predictor,
    image: Any,
    out: str | Path,
    stem: str,
    *,
    colors: np.ndarray | None = None,
    probs: bool = False,
    confidence: bool = False,
    overlay_on: np.ndarray | None = None,
    overlay_format: str = "jpg",
) -> None:
    """Segment ``image`` with ``predictor`` and write ``out/STEM.png``, a palette mask in ``colors`` (default: the
    model's, :meth:`~fcnseg.models.base.SegmentationModel.class_colors`).

    ``probs``: also ``STEM.npy``, C x H x W float32 probabilities. ``confidence``: also ``STEM_confidence.png``
    (:func:`confidence_png`). ``overlay_on``: also ``STEM_overlay.<format>``, the mask blended over this H x W x 3
    image (the colour part of ``image``). Every further head writes the same files under ``STEM_<head>``
    (``STEM_geometric.png``, ...), in its classes' colours; the names are :func:`output_names`'.
    """
    result = predictor.outputs([image], proba=probs, confidence=confidence)[0]
    options = {"colors": colors, "overlay_on": overlay_on, "overlay_format": overlay_format}
    write_prediction(predictor.model, result, out, stem, **options)


def write_prediction(
    model: SegmentationModel,
    result: Outputs,
    out: str | Path,
    stem: str,
    *,
    colors: np.ndarray | None = None,
    overlay_on: np.ndarray | None = None,
    overlay_format: str = "jpg",
) -> None:
    """Write the files :func:`save_prediction` writes from ``model``'s predictions ``result`` of one image (its
    probabilities and confidence maps where ``result`` holds them)."""
    out = Path(out)
    palettes, names = model.class_colors(), model.class_names()
    if colors is not None:
        palettes[next(iter(palettes))] = colors
    files = []
    for i, (head, mask) in enumerate(result.masks.items()):
        name = _head_stem(stem, i, head)
        files.append(f"{name}.png")
        save_mask_png(out / files[-1], mask, palettes[head])
        if overlay_on is not None:
            blended = add_legend(overlay(overlay_on, mask, palettes[head]), mask, palettes[head], names[head])
            files.append(f"{name}_overlay.{overlay_format}")
            save_rgb(out / files[-1], blended)
        if head in result.proba:
            files.append(f"{name}.npy")
            with atomic_write(out / files[-1]) as f:
                np.save(f, result.proba[head])
        if head in result.confidence:
            files.append(f"{name}_confidence.png")
            with atomic_write(out / files[-1]) as f:
                f.write(confidence_png(result.confidence[head]))
    remove_stale_temporaries(out, files)  # what a run killed while writing these files left


# ---------------------------------------------------------------------------------------------- batches


def forward_area(predictor: Predictor, size: tuple[int, int] | None) -> int:
    """Pixels of :func:`forward_size` for an image of ``size`` (height, width); 0 for an image whose header could
    not be read (its file fails before the model runs, so it costs a batch nothing)."""
    if size is None:
        return 0
    rows, cols = forward_size(predictor, *size)
    return rows * cols


def forward_size(predictor: Predictor, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the largest array, in input pixels, that ``predictor`` computes on at once for an image
    of ``height`` x ``width``: the model's padded size (its padding step and first layer's) of the image at the
    largest test-time scale; with tiling, the image's own size (each window's is bounded by the tile)."""
    if predictor.tile:
        return height, width
    scale = max(predictor.scales)  # the largest copy test-time augmentation runs
    return predictor.model.padded_size(math.ceil(height * scale), math.ceil(width * scale))


class MemoryCheck:
    """Whether the forward pass of images of given sizes fits in memory, told before their pixels are read (by the
    time the kernel's OOM killer acts, the process just ends). The need is estimated: the eager forward pass's peak
    bytes per padded pixel (:func:`~fcnseg.models.complexity.meta_peak_bytes` at 256 x 256) times the padded area
    (:func:`forward_area`), plus the weights once more (oneDNN lays them out anew for its kernels). For VGG16's nets
    that is 536 bytes a pixel (the input, its padded copy, conv1_1's and conv1_2's outputs); on a 2-core Sapphire
    Rapids, FCN-8s's memory peak rose by 1,170 MB for one 1000 x 1500 image, against an estimate of 1,300 MB. What
    is free: :func:`~fcnseg._memory.available_memory`, plus the largest pass already run, whose memory this process
    keeps for reuse (:mod:`fcnseg._memory`)."""

    CEILING = 8192
    """Bytes a padded pixel under which a pass is let through without counting (the count's first run imports
    PyTorch's meta kernels, about a second): the registered models need 200-640."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.weights = sum(p.numel() * p.element_size() for p in predictor.model.parameters())
        self.largest = 0  # the padded area of the largest pass run

    @functools.cached_property
    def per_pixel(self) -> float | None:
        """Peak bytes per padded pixel, counted on first use; None for a model with an operation that has no meta
        kernel (then nothing is checked)."""
        from .models.complexity import meta_peak_bytes

        rows, cols = self.predictor.model.padded_size(256, 256)
        try:
            return meta_peak_bytes(self.predictor.model, rows, cols) / (rows * cols)
        except (RuntimeError, NotImplementedError):
            return None

    def need(self, sizes: Sequence[tuple[int, int] | None]) -> int:
        """Estimated bytes of one forward pass of images of ``sizes`` (height, width) together."""
        return self._bytes(self._area(sizes))

    def _area(self, sizes: Sequence[tuple[int, int] | None]) -> int:
        return sum(forward_area(self.predictor, size) for size in sizes)

    def _bytes(self, area: int) -> int:
        return math.ceil((self.per_pixel or 0) * area) + self.weights

    def free(self) -> int | None:
        available = _memory.available_memory()
        return None if available is None else available + self._reusable()

    def _reusable(self) -> int:
        """What the largest pass run took, kept by this process for reuse; nothing before the first."""
        return self._bytes(self.largest) if self.largest else 0

    def fits(self, sizes: Sequence[tuple[int, int] | None]) -> bool:
        area, available = self._area(sizes), _memory.available_memory()
        if available is None or area * self.CEILING + self.weights <= available:
            return True  # far within what is free: not counted
        return self.per_pixel is None or self._bytes(area) <= available + self._reusable()

    def ran(self, sizes: Sequence[tuple[int, int] | None]) -> None:
        """Note a pass that ran: its memory is this process's to reuse."""
        self.largest = max(self.largest, self._area(sizes))

    def refusal(self, path: Path, size: tuple[int, int]) -> str:
        return (f"{path}: an image of {size[1]} x {size[0]} needs about {_bytes_text(self.need([size]))} for its "
                f"forward pass, more than the {_bytes_text(self.free() or 0)} of memory free; run it in tiles "
                "(--tile 512)")  # fmt: skip


def _bytes_text(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def batch_groups(
    items: Iterable[T],
    key: Callable[[T], Hashable],
    cost: Callable[[T], int],
    *,
    batch: int,
    max_pixels: int,
    window: int | None = None,
) -> Iterator[list[T]]:
    """``items`` in groups of one ``key`` (an image size), each of at most ``batch`` items whose ``cost`` (pixels
    computed on) sums to at most ``max_pixels``; an item costing more on its own is a group alone. Each group keeps
    the input order; every item is in exactly one group.

    Items of one key need not be consecutive: each waits in its key's bucket, given out when full (``batch`` items,
    or the next item would pass ``max_pixels``), when ``window`` items wait in all (the oldest bucket first: a
    bounded look-ahead), or at the end (oldest first)."""
    buckets: dict[Hashable, list[T]] = {}  # insertion order: the oldest waiting item's bucket first
    spent: dict[Hashable, int] = {}
    waiting = 0
    for item in items:
        k, c = key(item), cost(item)
        if k in buckets and spent[k] + c > max_pixels:
            waiting -= len(buckets[k])
            yield _given_out(buckets, spent, k)
        buckets.setdefault(k, []).append(item)
        spent[k] = spent.get(k, 0) + c
        waiting += 1
        if len(buckets[k]) >= batch:
            waiting -= len(buckets[k])
            yield _given_out(buckets, spent, k)
        elif window is not None and waiting >= window:
            oldest = next(iter(buckets))
            waiting -= len(buckets[oldest])
            yield _given_out(buckets, spent, oldest)
    while buckets:
        yield _given_out(buckets, spent, next(iter(buckets)))


def _given_out(buckets: dict[Hashable, list[T]], spent: dict[Hashable, int], key: Hashable) -> list[T]:
    del spent[key]
    return buckets.pop(key)
