"""A procedurally generated segmentation set for the embedded demo: no files, every image made on demand.

Each image holds several textured objects (3-5 large shapes and 2-4 sticks at 128 px), many touching or
overlapping, on a cluttered background. Every pixel is labelled (no void). Classes (index: name, shape, colour,
local cue):

0 ``background``: low-saturation grey/brown/olive ground with smooth blotches, distractor blobs and thin scribbles
1 ``disc``: wobbly-edged blob, red, horizontal stripes (period 4 px)
2 ``square``: rotated rectangle (sharp corners), red, vertical stripes
3 ``triangle``: irregular triangle, blue, 2 x 2 px checks
4 ``cross``: two crossing bars 9-16 px wide, blue, diagonal stripes
5 ``ring``: wobbly annulus with 5-10 px walls, yellow-green, dark dots
6 ``stick``: straight bar, cyan, plain; 2-10 px wide, one width per image, so some images hold only 2-4 px sticks

Every class can be told from a neighbourhood of a few pixels (colour plus stripe orientation or pattern), so a
small network learns what is where within a few hundred steps; yet colour alone cannot separate disc from square or
triangle from cross, and the clutter repeats the objects' shapes (blobs, thin lines) in background colours. What is
hard is *where*: sticks, ring walls and cross arms are thinner than one stride-8 cell, rectangles and triangles
have sharp corners, discs and rings wobbly outlines, and touching objects share boundaries. A stride-32 prediction
(a 4 x 4 grid at 128 px) finds the large shapes but smears all of that, and the pool4 / pool3 skips of FCN-16s /
FCN-8s win it back: the true class shares of each cell, upsampled bilinearly, reach 0.43 / 0.61 / 0.83 mean IU
(0.51 / 0.69 / 0.89 mean accuracy) at stride 32 / 16 / 8 on the first 100 validation images. The demo's staged
width-1/4 nets (AdamW, batches of 16, fixed bilinear upsampling; 800 / +200 / +500 steps) come close to those
figures: see the README's demo table.

Item ``i`` of split ``s`` with seed ``k`` is drawn from ``np.random.default_rng([k, code(s), i])`` alone: the
same bytes whatever the access order, and independent of every other item.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FcnsegError, shown
from .base import SegmentationDataset, check_split, register_dataset

CLASSES: tuple[str, ...] = ("background", "disc", "square", "triangle", "cross", "ring", "stick")
BACKGROUND, DISC, SQUARE, TRIANGLE, CROSS, RING, STICK = range(len(CLASSES))

SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
"""Split name -> code mixed into the seed, so splits never share an image."""
DEFAULT_SIZES: dict[str, int] = {"train": 400, "val": 100, "test": 100}
"""Images per split unless ``num_images`` says otherwise: enough for the demo, ~1-2 s to generate."""

# Light and dark colour of each object class's two-tone texture (RGB). Disc/square and triangle/cross share
# colours on purpose: only the texture's orientation/pattern tells them apart.
_COLOURS: dict[int, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    DISC: ((215, 75, 60), (130, 35, 35)),
    SQUARE: ((215, 75, 60), (130, 35, 35)),
    TRIANGLE: ((70, 110, 220), (30, 45, 125)),
    CROSS: ((70, 110, 220), (30, 45, 125)),
    RING: ((205, 200, 60), (140, 150, 35)),
    STICK: ((80, 215, 215), (80, 215, 215)),
}
_SHAPE_CLASSES = (DISC, SQUARE, TRIANGLE, CROSS, RING)
PALETTE = np.array(
    [(0, 0, 0), (230, 40, 40), (255, 150, 20), (40, 90, 240), (160, 70, 230), (235, 225, 40), (40, 225, 225)],
    np.uint8,
)
"""Mask colours: background black; each object in its drawn hue, the two classes that share a drawn colour told
apart by shade (disc red / square orange, triangle blue / cross violet), so that a predicted colour never names
another class's drawn colour."""
_REF = 128  # object sizes are given for 128 px images and scale with the shorter side; widths of thin parts don't
# Widths of the thin parts in pixels, whatever the image size (half widths for bars). Thinner than a stride-8 cell,
# yet mostly wide enough that bilinearly upsampled stride-8 scores can outline them: all 2-4 px would cap FCN-8s
# near 0.85 mean IU even with perfect scores, short of the demo's 0.80 once learning is imperfect.
STICK_HALF_WIDTH = (1.0, 5.0)
# Shapes are large next to a stride-32 cell (radius 24-44 px at 128 px: one to three cells across), so that FCN-32s
# can find them, coarsely, as in the paper's Figure 4; their thin parts and the sticks are what the skips add.
SHAPE_RADIUS = (24.0, 44.0)  # px at 128 px: discs, squares, triangles, crosses and rings
SHAPES_PER_IMAGE = (3, 6)  # at 128 px (numpy's integers: the upper bound is excluded); scaled with the area
STICKS_PER_IMAGE = (2, 5)
CROSS_HALF_WIDTH = (4.5, 8.0)
RING_WALL = (5.0, 10.0)
_PERIOD = 12  # every texture repeats after 12 px in both directions, so a random offset below 12 is a random phase


@lru_cache(maxsize=16)
def _texture_bits(h: int, w: int) -> np.ndarray:
    """Every class's two-tone pattern on an (H + 12) x (W + 12) canvas, packed: bit c = 1 where class c is dark.

    Patterns live in image coordinates, so a texture's orientation never depends on its shape's; they are what
    tells disc from square and triangle from cross, which share colours. Packing them into one uint8 image makes
    "the pattern of each pixel's class" two cheap integer operations.
    """
    y, x = np.ogrid[: h + _PERIOD, : w + _PERIOD]
    dark = {
        DISC: y % 4 >= 2,  # horizontal stripes, period 4
        SQUARE: x % 4 >= 2,  # vertical stripes, period 4
        TRIANGLE: (y // 2 + x // 2) % 2 == 1,  # 2 x 2 checks
        CROSS: (x + y) % 6 >= 3,  # diagonal stripes, ~4 px apart
        RING: (y % 3 == 0) & (x % 3 == 0),  # dark dots 3 px apart: visible even in a 3 px wall
    }  # background and stick: plain (the ground gets noise instead; a stick is too thin for a pattern)
    bits = np.zeros((h + _PERIOD, w + _PERIOD), dtype=np.uint8)
    for cls, pattern in dark.items():
        bits |= pattern.astype(np.uint8) << cls
    bits.flags.writeable = False
    return bits


class _Polar:
    """Offsets, distance and angular harmonics around the centre of a (2R+1)^2 window, computed once per R.

    Shapes are centred on whole pixels and slice these tables instead of computing square roots and angles per
    shape, which used to be most of the generation time.
    """

    def __init__(self, radius: int) -> None:
        self.radius = radius
        dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float32)
        d = np.sqrt(dy * dy + dx * dx)
        inv = 1 / np.maximum(d, np.float32(1e-3))
        c1, s1 = dx * inv, dy * inv
        # cos and sin of 2, 3 and 5 theta by angle addition.
        c2, s2 = c1 * c1 - s1 * s1, 2 * c1 * s1
        c3, s3 = c2 * c1 - s2 * s1, s2 * c1 + c2 * s1
        c5, s5 = c3 * c2 - s3 * s2, s3 * c2 + c3 * s2
        self.dy, self.dx, self.d = dy, dx, d
        self.harmonics = (c2, s2, c3, s3, c5, s5)
        for a in (dy, dx, d, *self.harmonics):
            a.flags.writeable = False


@lru_cache(maxsize=8)
def _polar(radius: int) -> _Polar:
    return _Polar(radius)


@lru_cache(maxsize=32)
def _interp(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resampling of n_in samples to n_out: (lower index, upper index, weight of upper), each n_out long."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    for a in (lo, hi, frac):
        a.flags.writeable = False
    return lo, hi, frac


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a gh x gw x C grid to H x W x C by separable gathers, columns first."""
    # Columns first, while the grid is small; the full-size pass then moves and blends whole rows (long contiguous
    # runs), which is several times faster than gathering single pixels. (A BLAS product was slower still: at this
    # size it is mostly thread start-up.)
    lo, hi, f = _interp(w, grid.shape[1])
    a, b = grid.take(lo, axis=1), grid.take(hi, axis=1)
    b -= a
    b *= f[None, :, None]
    a += b
    lo, hi, f = _interp(h, grid.shape[0])
    out, b = a.take(lo, axis=0), a.take(hi, axis=0)
    b -= out
    b *= f[:, None, None]
    out += b
    return out


def _noise_grid(rng: np.random.Generator, h: int, w: int, cell: int, channels: int) -> np.ndarray:
    """Unit normal values on a grid of one point per ``cell`` px (plus a margin), (H/cell+2) x (W/cell+2) x C."""
    return rng.standard_normal((h // cell + 2, w // cell + 2, channels), dtype=np.float32)


class _Window:
    """The part of the image within ``radius`` of a whole-pixel centre, with the polar tables cut to match."""

    def __init__(self, h: int, w: int, cy: float, cx: float, radius: float) -> None:
        r = int(radius) + 2
        polar = _polar(max(32, 1 << (r - 1).bit_length()))  # a few sizes, shared by every shape
        iy, ix = round(cy), round(cx)
        y0, y1 = max(iy - r, 0), min(iy + r + 1, h)
        x0, x1 = max(ix - r, 0), min(ix + r + 1, w)
        self.empty = y0 >= y1 or x0 >= x1
        self.image = slice(y0, y1), slice(x0, x1)
        o = polar.radius
        tab = slice(y0 - iy + o, y1 - iy + o), slice(x0 - ix + o, x1 - ix + o)
        self.dy, self.dx, self.d = polar.dy[tab], polar.dx[tab], polar.d[tab]
        self.harmonics = tuple(a[tab] for a in polar.harmonics)

    def wobbly_radius(self, r0: float, coef: np.ndarray) -> np.ndarray:
        """r(theta) = r0 + the harmonics weighted by ``coef`` (from :func:`_wobble`)."""
        r = self.harmonics[0] * coef[0]
        tmp = np.empty_like(r)
        for c, h in zip(coef[1:], self.harmonics[1:], strict=True):
            r += np.multiply(h, c, out=tmp)
        r += np.float32(r0)
        return r

    def segment_distance2(self, angle: float, half_len: float) -> np.ndarray:
        """Squared distance to a segment through the centre (a stadium-shaped field)."""
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        along = np.clip(self.dx * c + self.dy * s, -half_len, half_len)
        ey, ex = self.dy - along * s, self.dx - along * c
        return ey * ey + ex * ex


def _wobble(rng: np.random.Generator, r0: float, amp: float) -> tuple[np.ndarray, float]:
    """Random cos/sin weights (up to ``amp`` x r0 each) of harmonics 2, 3 and 5 for a wobbly outline r(theta),
    irregular and never a circle, and a bound on the largest radius it can reach."""
    coef = (rng.uniform(-amp * r0, amp * r0, 6)).astype(np.float32)
    return coef, r0 + float(np.abs(coef).sum())


class _Scene:
    """An id map (which drawn thing covers each pixel; later ones occlude earlier) and each thing's look.

    Shapes only write their id into the map; colours are filled in once for the whole image at the end, which
    keeps the per-shape work to one boolean mask over its bounding box.
    """

    def __init__(self, h: int, w: int, ground: np.ndarray) -> None:
        self.h, self.w = h, w
        self.ids = np.zeros((h, w), dtype=np.uint16)
        # Thing 0 is the ground: class background, light = dark = its base colour, plus the noise field.
        self.cls: list[int] = [BACKGROUND]
        self.colors: list[np.ndarray] = [ground, ground]  # light, dark of thing 0, then of thing 1, ...
        self.field: list[float] = [1.0]

    def window(self, cy: float, cx: float, radius: float) -> _Window | None:
        win = _Window(self.h, self.w, cy, cx, radius)
        return None if win.empty else win

    def add(
        self, win: _Window, inside: np.ndarray, cls: int, light: np.ndarray, dark: np.ndarray, field: float
    ) -> None:
        """Put a new thing where ``inside``; ``field`` = how much of the ground's noise shows through it."""
        self.ids[win.image][inside] = len(self.cls)
        self.cls.append(cls)
        self.colors += [light, dark]
        self.field.append(field)


def _object_colors(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    light, dark = (np.asarray(c, dtype=np.float32) for c in _COLOURS[cls])
    # Per-object jitter: objects of one class differ in shade, so the net must not memorise exact RGB values.
    shift = rng.normal(0, 12, 3).astype(np.float32)
    gain = np.float32(rng.uniform(0.85, 1.15))
    return light * gain + shift, dark * gain + shift


def _draw_object(rng: np.random.Generator, sc: _Scene, cls: int, at: tuple[float, float, float, float]) -> float:
    """Add one object of class ``cls``; ``at`` = (cy, cx, scale, stick half width). Returns its radius (for placing
    neighbours)."""
    cy, cx, scale, stick_half_w = at
    if cls == STICK:
        radius = rng.uniform(14, 45) * scale
        half_w = stick_half_w
    elif cls == CROSS:
        radius = rng.uniform(*SHAPE_RADIUS) * scale
        half_w = rng.uniform(*CROSS_HALF_WIDTH)
    else:
        radius = rng.uniform(*SHAPE_RADIUS) * scale
        half_w = 0.0
    shape = _shape(rng, cls, radius, half_w)
    win = sc.window(cy, cx, shape["extent"])
    if win is None:
        return radius
    sc.add(win, _inside(win, cls, shape), cls, *_object_colors(rng, cls), field=0.0)
    return radius


def _shape(rng: np.random.Generator, cls: int, radius: float, half_w: float) -> dict[str, Any]:
    """The shape's parameters, drawn before its window so that the window is no larger than the shape can reach."""
    angle = rng.uniform(0, np.pi)
    p: dict[str, Any] = {"radius": radius, "half_w": half_w, "angle": angle}
    if cls in (DISC, RING):
        p["coef"], p["extent"] = _wobble(rng, radius, 0.12 if cls == DISC else 0.08)
        p["wall"] = np.float32(rng.uniform(*RING_WALL))
    elif cls == SQUARE:
        p["half_a"] = radius * 0.8
        p["half_b"] = p["half_a"] * rng.uniform(0.6, 1.0)
        p["extent"] = float(np.hypot(p["half_a"], p["half_b"]))
    elif cls == TRIANGLE:
        p["angles"] = angle + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        p["radii"] = radius * rng.uniform(0.8, 1.1, 3)
        p["extent"] = float(p["radii"].max())
    elif cls == CROSS:
        p["second_angle"] = angle + np.pi / 2 + rng.uniform(-0.3, 0.3)
        p["second_len"] = radius * rng.uniform(0.6, 1.0)
        p["extent"] = radius + half_w
    else:  # STICK
        p["extent"] = radius + half_w
    return p


def _inside(win: _Window, cls: int, p: dict[str, Any]) -> np.ndarray:
    """The window's pixels inside the shape ``p`` of class ``cls``."""
    dy, dx, radius, angle = win.dy, win.dx, p["radius"], p["angle"]
    if cls == DISC:
        return win.d <= win.wobbly_radius(radius, p["coef"])
    if cls == RING:
        r = win.wobbly_radius(radius, p["coef"])
        return (win.d <= r) & (win.d > r - p["wall"])
    if cls == SQUARE:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        return (np.abs(dx * c + dy * s) <= np.float32(p["half_a"])) & (
            np.abs(dy * c - dx * s) <= np.float32(p["half_b"])
        )
    if cls == TRIANGLE:
        angles, radii = p["angles"], p["radii"]
        vy, vx = (radii * np.sin(angles)).astype(np.float32), (radii * np.cos(angles)).astype(np.float32)
        # Vertices go round in angle order, so inside = on the same (inner) side of all three edges.
        inside = np.ones(dy.shape, dtype=bool)
        for k in range(3):
            inside &= (dx - vx[k]) * (vy[k - 2] - vy[k]) - (dy - vy[k]) * (vx[k - 2] - vx[k]) <= 0
        return inside
    hw2 = np.float32(p["half_w"] * p["half_w"])
    inside = win.segment_distance2(angle, radius) <= hw2
    if cls == CROSS:
        inside |= win.segment_distance2(p["second_angle"], p["second_len"]) <= hw2
    return inside


def _draw_clutter(rng: np.random.Generator, sc: _Scene, base: np.ndarray, scale: float, area: float) -> None:
    """Distractor blobs and thin scribbles in background colours (class background)."""
    h, w = sc.h, sc.w
    # Blobs: wobbly patches lighter or darker than the ground, some of them object-sized; the ground's noise
    # shows through, so they are as blotchy as the ground around them.
    for _ in range(max(1, round(rng.integers(4, 9) * area))):
        cy, cx, r0 = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 18) * scale
        coef, extent = _wobble(rng, r0, 0.25)
        win = sc.window(cy, cx, extent)
        if win is None:
            continue
        inside = win.d <= win.wobbly_radius(r0, coef)
        tone = (base + (1 if rng.random() < 0.5 else -1) * rng.uniform(20, 50) + rng.normal(0, 10, 3)).astype(
            np.float32
        )
        sc.add(win, inside, BACKGROUND, tone, tone, field=1.0)
    # Scribbles: thin background lines, so that "thin" alone never means "stick".
    for _ in range(max(1, round(rng.integers(2, 6) * area))):
        cy, cx, half = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30) * scale
        win = sc.window(cy, cx, half + 1.6)
        if win is None:
            continue
        inside = win.segment_distance2(rng.uniform(0, np.pi), half) <= np.float32(rng.uniform(0.7, 1.6) ** 2)
        tone = (base + (1 if rng.random() < 0.5 else -1) * rng.uniform(30, 60)).astype(np.float32)
        sc.add(win, inside, BACKGROUND, tone, tone, field=0.5)


def render(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One (H x W x 3 uint8 image, H x W uint8 mask) pair drawn from ``rng``."""
    scale = min(height, width) / _REF
    area = height * width / _REF**2
    base = (rng.uniform(85, 165) + rng.normal(0, 14, 3)).astype(np.float32)  # grey tinted to brown/olive/slate
    sc = _Scene(height, width, base)
    _draw_clutter(rng, sc, base, scale, area)

    n_shapes = max(1, round(rng.integers(*SHAPES_PER_IMAGE) * area))
    n_sticks = max(1, round(rng.integers(*STICKS_PER_IMAGE) * area))
    classes = np.concatenate([rng.choice(_SHAPE_CLASSES, n_shapes), np.full(n_sticks, STICK)])
    rng.shuffle(classes)  # sticks lie on top of some shapes and under others
    # One stick width per image: some images have only hair-thin sticks (2-4 px), others only bolder ones.
    stick_half_w = rng.uniform(*STICK_HALF_WIDTH)
    placed: list[tuple[float, float, float]] = []
    for cls in classes:
        if placed and rng.random() < 0.5:
            # Next to an earlier object, so that objects touch and overlap and share boundaries; clipped so that
            # a neighbour never lands (mostly) off the image.
            py, px, pr = placed[rng.integers(len(placed))]
            theta, dist = rng.uniform(0, 2 * np.pi), pr + rng.uniform(4, 16) * scale
            cy = float(np.clip(py + dist * np.sin(theta), 0.05 * height, 0.95 * height))
            cx = float(np.clip(px + dist * np.cos(theta), 0.05 * width, 0.95 * width))
        else:
            cy, cx = rng.uniform(0.05, 0.95) * height, rng.uniform(0.05, 0.95) * width
        placed.append((cy, cx, _draw_object(rng, sc, int(cls), (cy, cx, scale, stick_half_w))))

    return _color(rng, sc, height, width)


def _color(rng: np.random.Generator, sc: _Scene, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene's image and mask: colours by class pattern, ground noise, lighting and sensor noise."""
    # Colour everything at once. Each thing has a light and a dark colour; its class's pattern picks one.
    ids = sc.ids
    label = np.take(np.asarray(sc.cls, dtype=np.uint8), ids)
    oy, ox = rng.integers(0, _PERIOD, 2)
    dark = (_texture_bits(height, width)[oy : oy + height, ox : ox + width] >> label) & 1
    image = np.take(np.stack(sc.colors), (ids << 1) | dark, axis=0)
    # Ground noise: blotches ~16 px across in brightness plus ~4 px colour grain, summed on the fine grid so that
    # only one full-size upsampling is paid for, and weighted by how much of it shows through each thing.
    grid = 7 * _noise_grid(rng, height, width, 4, 3)
    grid += 22 * _upsample(_noise_grid(rng, height // 4, width // 4, 4, 1), *grid.shape[:2])
    ground = _upsample(grid, height, width)
    ground *= np.take(np.repeat(np.asarray(sc.field, dtype=np.float32)[:, None], 3, axis=1), ids, axis=0)
    image += ground
    # Lighting that varies across the image. (Every full-size array here is H x W x 3 and contiguous: numpy is
    # far slower on strided channel slices or per-pixel broadcasts with an innermost dimension of 3.)
    light = 1 + 0.12 * _noise_grid(rng, height, width, 32, 1)
    image *= _upsample(np.repeat(light, 3, axis=2), height, width)
    # Sensor noise, the sum of two uniform 0..15 nibbles of random bytes (the cheapest source; triangular, sd 6.5):
    # exact colours are never a reliable cue. Its mean only brightens every image by 15.
    noise = np.frombuffer(rng.bytes(3 * height * width), dtype=np.uint8).reshape(height, width, 3)
    image += noise & 15
    image += noise >> 4
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8), label


@register_dataset("synthetic")
class SyntheticShapes(SegmentationDataset):
    """Generated textured shapes on clutter: 7 classes, every pixel labelled, no files.

    Args:
        root: ignored (accepted so that every dataset is built the same way).
        split: ``train`` (400 images by default), ``val`` (100) or ``test`` (100).
        transforms: paired ``transforms(image, mask)``, as for every dataset.
        num_images: images in the split instead of the default count.
        size: image size, ``S`` for S x S or ``(height, width)``; object sizes scale with the shorter side and
            object counts with the area, while the widths of thin parts stay in pixels.
        seed: picks the whole set; a split's items depend only on ``(seed, split, index)``.
        cache: keep generated items in memory (each worker process keeps its own).
    """

    disjoint_splits = ("train", "val", "test")

    classes = CLASSES
    palette = PALETTE

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        num_images: int | None = None,
        size: int | tuple[int, int] = 128,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__(transforms)
        check_split(split, tuple(SPLITS), "synthetic")
        if num_images is None:
            num_images = DEFAULT_SIZES[split]
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 0:
            raise FcnsegError(f"num_images must be a non-negative integer, got {shown(num_images)}")
        hw: tuple[Any, ...] = ()
        if isinstance(size, (int, np.integer)):
            hw = (size, size)
        elif isinstance(size, (tuple, list)):
            hw = tuple(size)
        if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 8 for v in hw):
            raise FcnsegError(f"size must be an integer >= 8 or a (height, width) pair of them, got {shown(size)}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise FcnsegError(f"seed must be a non-negative integer, got {shown(seed)}")
        self.root = root
        self.split = split
        self.size = (int(hw[0]), int(hw[1]))
        self.seed = int(seed)
        self.ids = [f"{split}_{i:05d}" for i in range(int(num_images))]
        # Generated items are kept in memory (49 KiB each at 128 x 128): training revisits them every epoch.
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def image_path(self, index: int) -> Path:
        raise NotImplementedError("synthetic images are generated on demand; they have no files")

    def mask_path(self, index: int) -> Path:
        raise NotImplementedError("synthetic masks are generated on demand; they have no files")

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate item ``index``: (H x W x 3 uint8 RGB, H x W uint8 class indices, no void)."""
        n = len(self.ids)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        if index not in self._cache:
            rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
            image, mask = render(rng, *self.size)
            if not self.cache:
                return image, mask
            self._cache[index] = (image, mask)
        # Copies: callers (transforms, tests) may write into what they get.
        image, mask = self._cache[index]
        return image.copy(), mask.copy()
