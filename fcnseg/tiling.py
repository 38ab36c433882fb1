"""Tiled inference for images too large to run whole: overlapping windows, blended logits, band-wise argmax.

A window's logits are wrong near its edges that lie inside the image (the network sees zero padding there instead
of the neighbouring pixels), and right everywhere else: the FCN is translation-equivariant for shifts that are
multiples of its stride. So window origins are multiples of the stride (``align``), windows overlap, and each
window's logits are weighted by a ramp that falls towards its inner edges; the result is the weighted mean over
the windows covering a pixel. Weights are strictly positive, so every pixel is covered by some nonzero weight.

:func:`tiled_logits` keeps C x H x W logits; :func:`tiled_mask` keeps only one band of rows of logits (about a
tile high) at a time and writes labels, so its memory grows with the image's width, not its area.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .errors import FcnsegError
from .runtime.compare import class_labels

Window = tuple[int, int, int, int]  # (y0, x0, h, w)


def check_tiling(tile: int, overlap: int, align: int) -> None:
    """``--tile`` / ``--overlap`` fit a model of stride ``align``; else an FcnsegError naming the flag."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if tile < 1 or tile % align:
        raise FcnsegError(f"--tile must be a positive multiple of {align} (the model's stride), got {tile}")
    # Origins step by whole multiples of `align`, so a step of at least `align` must remain after the overlap.
    if not 0 <= overlap <= tile - align:
        raise FcnsegError(
            f"--overlap must be between 0 and {tile - align} (--tile {tile} minus one {align}-px step), got {overlap}"
        )


def _axis_windows(n: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """(start, length) along one axis; see :func:`tile_windows`."""
    # The largest step that is a multiple of `align` and still leaves `overlap` shared pixels (>= align by the check).
    step = (tile - overlap) // align * align
    # The last window ends at the edge: its origin is n - tile rounded down to `align` (so it may be up to align - 1
    # pixels longer than the tile); 0 when the image is no longer than the tile (plus less than one step of align).
    last = max(0, (n - tile) // align * align)
    # Every earlier origin is < last, so its window [o, o + tile) ends inside the image; the gap between the last
    # regular origin and `last` is <= step, so that pair overlaps by >= overlap too.
    starts = [*range(0, last, step), last]
    return [(s, tile) for s in starts[:-1]] + [(last, n - last)]


def tile_windows(height: int, width: int, tile: int, overlap: int, align: int = 32) -> list[Window]:
    """(y0, x0, h, w) windows covering the image, row by row (y0, then x0, ascending).

    Window origins are multiples of ``align`` (so every tile's stride-32 grid coincides with the full image's grid);
    consecutive windows overlap by >= ``overlap``; the last window in each direction ends at the image edge (its
    origin rounded down to ``align``, so it may be up to ``align - 1`` pixels longer than ``tile``); an image smaller
    than the tile gives one window of the image's size.

    Raises FcnsegError naming --tile unless tile is a positive multiple of align, and naming --overlap unless
    0 <= overlap <= tile - align (a smaller step could not keep origins on the align grid).
    """
    check_tiling(tile, overlap, align)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1 x 1, got {height} x {width}")
    rows = _axis_windows(height, tile, overlap, align)
    cols = _axis_windows(width, tile, overlap, align)
    return [(y0, x0, h, w) for (y0, h), (x0, w) in itertools.product(rows, cols)]


def _profile(n: int, ramp_start: bool, ramp_end: bool, overlap: int) -> torch.Tensor:
    weight = torch.ones(n, dtype=torch.float32)
    if overlap == 0:
        return weight
    # Pixel i of a ramp gets (i + 0.5) / overlap: never 0 (every pixel keeps some weight), 1 past the overlap.
    ramp = (torch.arange(n, dtype=torch.float32) + 0.5) / overlap
    if ramp_start:
        weight = torch.minimum(weight, ramp)
    if ramp_end:
        weight = torch.minimum(weight, ramp.flip(0))
    return weight


def blend_weights(window: Window, height: int, width: int, overlap: int) -> torch.Tensor:
    """h x w float32 weight of each pixel of ``window`` in a height x width image.

    A linear ramp from ~0 to 1 across ``overlap`` pixels along the window's edges inside the image, where its logits
    are least trustworthy; edges on the image border keep full weight (no other window covers them). Separable
    (outer product of the row and column ramps) and strictly positive: ramp pixel i weighs (i + 0.5) / overlap.
    """
    y0, x0, h, w = window
    rows = _profile(h, y0 > 0, y0 + h < height, overlap)
    cols = _profile(w, x0 > 0, x0 + w < width, overlap)
    return rows[:, None] * cols[None, :]


def _progress_bar(total: int, progress: bool) -> Any:
    # tqdm only when asked for: library callers get no output and no import.
    if not progress:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, unit="tile", file=sys.stderr, leave=False)


def _check_input(x: torch.Tensor, num_classes: int) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be a C x H x W tensor, got shape {tuple(x.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _add_window(
    acc: torch.Tensor,
    wsum: torch.Tensor,
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    window: Window,
    *,
    overlap: int,
    row0: int,
) -> None:
    """acc[:, rows] += weight * logits and wsum[rows] += weight for one window; acc's row 0 is image row ``row0``."""
    y0, x0, h, w = window
    height, width = x.shape[-2:]
    logits = run(x[:, y0 : y0 + h, x0 : x0 + w].unsqueeze(0))
    if logits.shape[0] != 1 or logits.shape[2:] != (h, w) or logits.shape[1] != acc.shape[0]:
        raise ValueError(f"run must map 1 x C x {h} x {w} to 1 x {acc.shape[0]} x {h} x {w}, got {tuple(logits.shape)}")
    weight = blend_weights(window, height, width, overlap).to(acc.device)
    # Multiply, then add, as two separately rounded steps (no fused multiply-add): tiled_mask and tiled_logits then
    # get bit-identical sums whatever shape their accumulators have, so their argmaxes agree exactly.
    logits = logits[0].to(device=acc.device, dtype=torch.float32) * weight
    rows = slice(y0 - row0, y0 - row0 + h)
    acc[:, rows, x0 : x0 + w] += logits
    wsum[rows, x0 : x0 + w] += weight
    # `logits` goes out of scope here: no window's logits outlive its own accumulation.


def tiled_logits(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_classes: int,
    *,
    tile: int,
    overlap: int,
    align: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """C x H x W float32 blended logits (weighted mean over the windows of :func:`tile_windows`).

    ``x``: 3 x H x W normalised float tensor; ``run`` maps 1 x 3 x h x w -> 1 x C x h x w logits (a model in eval
    mode). Memory is image-sized (C x H x W on x's device) plus one window's logits.
    """
    _check_input(x, num_classes)
    height, width = x.shape[-2:]
    windows = tile_windows(height, width, tile, overlap, align)
    with torch.inference_mode(), _progress_bar(len(windows), progress) as bar:
        acc = torch.zeros(num_classes, height, width, dtype=torch.float32, device=x.device)
        wsum = torch.zeros(height, width, dtype=torch.float32, device=x.device)
        for window in windows:
            _add_window(acc, wsum, run, x, window, overlap=overlap, row0=0)
            if bar is not None:
                bar.update()
        return acc.div_(wsum)


def tiled_mask(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_classes: int,
    *,
    tile: int,
    overlap: int,
    align: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """H x W argmax labels (uint8 when num_classes <= 256, else int64), the same as ``tiled_logits(...).argmax(0)``,
    in memory bounded by the tile height (:func:`tiled_masks`, one head)."""
    return tiled_masks(run, x, [num_classes], tile=tile, overlap=overlap, align=align, progress=progress)[0]


def tiled_masks(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    heads: Sequence[int],
    *,
    tile: int,
    overlap: int,
    align: int = 32,
    progress: bool = False,
) -> list[np.ndarray]:
    """Each head's H x W argmax labels, where ``run`` gives the heads' scores concatenated (``heads``: their class
    counts in order): the same as splitting ``tiled_logits(...)`` and taking each part's argmax.

    Windows are processed one row of windows at a time; output rows are argmax'ed and their logits released as soon
    as no later window touches them (the rows above the next row of windows). Peak memory is about
    C x (tile + align) x W floats plus H x W label bytes: bounded by the tile height, not by the image's.
    """
    _check_input(x, sum(heads))
    height, width = x.shape[-2:]
    windows = tile_windows(height, width, tile, overlap, align)
    masks = [np.empty((height, width), dtype=np.uint8 if k <= 256 else np.int64) for k in heads]
    bands = [list(group) for _, group in itertools.groupby(windows, key=lambda win: win[0])]
    # One buffer a band high, reused: band i covers image rows [y0, y0 + h) and all earlier rows are written out
    # by then, so buffer row 0 is image row y0. Rows shared with the next band carry over to the buffer's top.
    band_h = max(band[0][2] for band in bands)
    with torch.inference_mode(), _progress_bar(len(windows), progress) as bar:
        acc = torch.zeros(sum(heads), band_h, width, dtype=torch.float32, device=x.device)
        wsum = torch.zeros(band_h, width, dtype=torch.float32, device=x.device)
        for i, band in enumerate(bands):
            y0, _, h, _ = band[0]  # every window of a band has the same rows
            for window in band:
                _add_window(acc, wsum, run, x, window, overlap=overlap, row0=y0)
                if bar is not None:
                    bar.update()
            # Later bands start at the next band's y0: every row above it is final. Dividing in place (the rows are
            # done with) spares a band-sized temporary and rounds exactly as tiled_logits does.
            done = bands[i + 1][0][0] if i + 1 < len(bands) else height
            n = done - y0
            for mask, scores in zip(masks, acc[:, :n].div_(wsum[:n]).split(list(heads)), strict=True):
                mask[y0:done] = class_labels(scores, 0).cpu().numpy()
            _carry_over(acc, wsum, n, y0 + h - done)
    return masks


def _carry_over(acc: torch.Tensor, wsum: torch.Tensor, n: int, kept: int) -> None:
    """Move the ``kept`` rows after the first ``n`` (shared with the next band) to the buffer's top; zero the rest."""
    if kept:  # >= 0: consecutive bands overlap or abut
        # Source and destination rows may overlap in memory: copy through a (overlap-sized) clone.
        acc[:, :kept] = acc[:, n : n + kept].clone()
        wsum[:kept] = wsum[n : n + kept].clone()
    acc[:, kept:].zero_()
    wsum[kept:].zero_()
