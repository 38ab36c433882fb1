"""Class names and colour palettes for segmentation masks.

The PASCAL VOC palette follows the devkit's bit-interleaving rule, so VOC ground-truth PNGs and
masks written by fcnseg look the same in any viewer. Other class sets get generated colours that
stay apart from each other.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np

from ._meta import VOC_CLASSES

VOID_INDEX = 255
VOID_COLOR: tuple[int, int, int] = (224, 224, 192)

# 1 / golden ratio: stepping hues by it spreads any prefix of the sequence nearly evenly round the
# circle.
_GOLDEN = 0.6180339887498949
_HUE0 = 0.15  # start hue (yellow); chosen for the largest minimum colour distance up to 256 rows
# Saturation alternates with period 2 and value cycles with period 3, so consecutive classes differ
# in more than hue. Saturation >= 0.6 and value >= 0.6 keep every colour away from black, white,
# grey and the void colour 224,224,192 (saturation 0.14).
_SATURATIONS = (0.95, 0.6)
_VALUES = (1.0, 0.8, 0.6)
# Golden-ratio hues of indices a Fibonacci number apart nearly coincide; 144 is the first such gap
# at which the period-6 saturation/value cycle repeats too, so the value cycle is shifted by one per
# block of 144 classes.
_FIB_BLOCK = 144


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"palette size must be a non-negative integer, got {n!r}")
    return int(n)


def voc_palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC colours for indices ``0 .. n-1``: uint8 array of shape ``(n, 3)``.

    Bits 0, 1, 2 of the index go to red, green, blue at bit 7 of each channel, bits 3, 4, 5 at bit
    6, and so on; index 255 comes out as the void colour 224,224,192.
    """
    n = _check_n(n)
    out = np.zeros((n, 3), dtype=np.uint8)
    for c in range(n):
        rgb = [0, 0, 0]
        cid = c
        shift = 7
        while cid and shift >= 0:
            for ch in range(3):
                rgb[ch] |= ((cid >> ch) & 1) << shift
            cid >>= 3
            shift -= 1
        out[c] = rgb
    return out


def generated_palette(n: int) -> np.ndarray:
    """``n`` distinct, well separated colours (uint8 ``(n, 3)``) for an arbitrary class set.

    Hues advance by the golden ratio and saturation and value alternate, so neighbouring indices
    differ clearly. Row ``i`` depends only on ``i``: a smaller palette is a prefix of a larger one.
    Rows are distinct for ``n <= 256``; no row is black or the void colour, so index 0 is an
    ordinary class here.
    """
    n = _check_n(n)
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (_HUE0 + i * _GOLDEN) % 1.0
        sat = _SATURATIONS[i % 2]
        val = _VALUES[(i + i // _FIB_BLOCK) % 3]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        out[i] = [round(r * 255), round(g * 255), round(b * 255)]
    return out


BACKGROUND_NAMES = frozenset({"background", "void", "unlabeled", "unlabelled", "none", "other", "bg", "_background_"})
"""Names that mark class 0 as "nothing here": it is drawn black, as VOC draws its background."""

BLACK: tuple[int, int, int] = (0, 0, 0)


def palette_for(classes: Sequence[str] | None, n: int) -> np.ndarray:
    """Colours for ``n`` classes: VOC's for the VOC class list, generated colours otherwise.

    A class 0 named background (any of :data:`BACKGROUND_NAMES`, in any case) is black, as in VOC's palette:
    masks then show only what was found, and overlays leave those pixels untinted (:func:`~fcnseg.imageio.overlay`
    tints no pixel of a black class). Without names (``None`` or empty), ``n == 21`` is taken to be VOC, since 21
    unnamed classes almost always are.
    """
    n = _check_n(n)
    if classes is not None and len(classes) > 0:
        if len(classes) != n:
            raise ValueError(f"got {len(classes)} class names for {n} classes; expected one name per class")
        is_voc = tuple(classes) == VOC_CLASSES
    else:
        is_voc = n == len(VOC_CLASSES)
    colors = voc_palette(n) if is_voc else generated_palette(n)
    if n and classes is not None and len(classes) and str(classes[0]).strip().lower() in BACKGROUND_NAMES:
        colors[0] = BLACK
    return colors


def full_palette(colors: np.ndarray) -> list[int]:
    """A 768-int flat palette for ``PIL.Image.putpalette``.

    The given colours fill the first entries, index 255 is the void colour 224,224,192 (unless
    ``colors`` itself has 256 rows, which then win) and the rest is black.
    """
    arr = np.asarray(colors)
    if arr.ndim != 2 or arr.shape[1] != 3 or arr.shape[0] > 256:
        raise ValueError(f"expected colours of shape (n, 3) with n <= 256, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("colour values must lie in 0..255")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[VOID_INDEX] = VOID_COLOR
    table[: arr.shape[0]] = arr.astype(np.uint8)
    return [int(v) for v in table.reshape(-1)]
