"""A folder of labelme annotations: one JSON file beside each image, drawn into class masks as labelme draws them.

Layout::

    ROOT/<stem>.json          labelme's file: shapes, imagePath, imageData (the image file's bytes, base64) or null
    ROOT/<stem>.jpg           the image, where imageData is null (found through imagePath, relative to the JSON)
    ROOT/labels.txt           optional, labelme's labels file: one label a line, '__ignore__' (void, no class)
                              and '_background_' (class 0) first; without it the labels of all JSON files are
                              gathered, sorted, after '_background_' (with a warning: their order may change)
    ROOT/train.txt, val.txt   optional: stems, one a line; without them a seeded split is drawn

Masks are drawn on every access (a few PIL calls per shape), by the rules of labelme's own converter
(``shapes_to_label`` and ``shape_to_mask`` in labelme 7.1's ``labelme/_utils/shape.py``):

* Pixels no shape covers are ``_background_``, class 0. Shapes are drawn in file order, a later one over an
  earlier one; a shape labelled ``__ignore__`` draws void (255).
* ``polygon`` (also a missing shape_type) and ``oriented_rectangle``: PIL's polygon, filled, outline included.
* ``rectangle``: PIL's rectangle between the two corners (either order), filled, outline included.
* ``circle``: PIL's ellipse in the square around the centre (point 1) whose half side is the distance to the rim
  point (point 2), filled, outline included.
* ``line`` (2 points) and ``linestrip``: PIL's line 10 pixels wide, a linestrip's joints rounded ("curve").
* ``point``: PIL's ellipse of radius 5 around it, filled.
* ``mask``: the shape's own boolean image (a base64 PNG, non-zero = inside) placed with its top-left pixel at
  the first point rounded (half to even); with integer corners it is cut to the box the two points span, and
  everywhere to the image. (labelme 6 and earlier drew linestrip joints square and truncated a mask's corner.)

Points may lie on the image's edges (0 <= x <= width, 0 <= y <= height, labelme's canvas bound); one beyond is
``annotation-out-of-bounds`` for ``check-data`` and is drawn cut to the image. A shape with the wrong number of
points (a polygon of fewer than 3, a rectangle, circle, line or mask of other than 2, a point of other than 1, an
oriented rectangle of other than 4, a linestrip of fewer than 2) or of shape_type ``points`` (which labelme draws
no mask for) is skipped and reported as ``degenerate-annotation``. A file labelme would refuse to open is
``unreadable-annotations``, a label missing from labels.txt ``unknown-category``, an image that is not there
``listed-image-missing``: reading such an item is an error. The image comes from imageData as stored (labelme has
already turned it upright), or from imagePath upright per its EXIF orientation, as labelme opens it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import FcnsegError, shown
from ..imageio import IMAGE_FORMATS, image_to_array, load_image
from ..palette import palette_for
from .base import IGNORE_INDEX, SegmentationDataset, SplitError, check_split, read_split_file, register_dataset
from .check import Problem
from .folder import check_fraction, open_root, seeded_split

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "LabelmeDataset",
    "LabelmeError",
    "load_annotation_image",
    "paint_shapes",
    "read_annotation",
    "read_labels_file",
    "shape_problem",
]

BACKGROUND = "_background_"
IGNORE = "__ignore__"
SPLITS = ("train", "val", "all")
LINE_WIDTH = 10  # labelme's shape_to_mask defaults
POINT_RADIUS = 5
# labelme's shape types (its loader refuses any other); "points" it stores but draws no mask for.
SHAPE_TYPES = ("polygon", "rectangle", "oriented_rectangle", "point", "line", "circle", "linestrip", "points", "mask")
_POINT_COUNTS = {"point": 1, "rectangle": 2, "line": 2, "circle": 2, "mask": 2, "oriented_rectangle": 4}
_MIN_POINTS = {"polygon": 3, "linestrip": 2}
_LAYOUT = "ROOT/<stem>.json (labelme's files) beside their images"
_LABELS_FORMAT = f"one label a line, {IGNORE} (optional) and {BACKGROUND} first"


class LabelmeError(FcnsegError):
    """An item that cannot be read; ``kind`` says how ``check-data`` files it."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# -- labels -------------------------------------------------------------------------------------------------


def read_labels_file(path: str | Path) -> tuple[str, ...]:
    """The classes of a labelme ``labels.txt``: its lines without ``__ignore__`` (void), ``_background_`` first."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"{path}: cannot read labels file ({e.__class__.__name__}); expected UTF-8 text") from None
    classes: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        name = raw.strip()
        if not name or name == IGNORE:
            continue
        if name in classes:
            raise FcnsegError(f"{path}:{lineno}: label {shown(name)} is listed twice; expected each label once")
        if not classes and name != BACKGROUND:
            raise FcnsegError(
                f"{path}:{lineno}: first class {shown(name)}; expected {BACKGROUND} (pixels outside every shape are "
                "class 0), as labelme's labels files have it"
            )
        classes.append(name)
    if not classes:
        raise FcnsegError(f"{path}: lists no labels; expected {_LABELS_FORMAT}")
    if len(classes) > IGNORE_INDEX:
        raise FcnsegError(f"{path}: lists {len(classes)} classes; at most {IGNORE_INDEX} fit (255 is void)")
    return tuple(classes)


# -- the JSON file ------------------------------------------------------------------------------------------


def _bad(path: Path, why: str) -> LabelmeError:
    return LabelmeError("unreadable-annotations", f"{path}: {why}; expected a labelme JSON file")


def _check_points(points: Any, where: str, path: Path) -> list[tuple[float, float]]:
    ok = isinstance(points, list) and points
    ok = ok and all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in p)
        for p in points
    )
    if not ok:
        raise _bad(path, f"{where}: points {shown(points)} are not a list of [x, y] numbers")
    return [(float(x), float(y)) for x, y in points]


def _decode_mask(text: Any, where: str, path: Path) -> np.ndarray:
    """A mask shape's boolean image: a base64 PNG decoding to one channel, non-zero inside."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True)), formats=("PNG",)) as img:
            arr = np.array(img)
    except Exception as e:  # binascii, PIL and numpy raise many types on a damaged string
        raise _bad(path, f"{where}: mask is not a base64 PNG ({type(e).__name__})") from None
    if arr.ndim != 2:
        raise _bad(path, f"{where}: mask decodes to shape {arr.shape}; expected a one-channel image")
    return arr != 0


def _parse_shape(shape: Any, i: int, path: Path) -> dict[str, Any]:
    """One shape, checked as labelme's loader checks it: label, shape type, points and a mask shape's mask."""
    where = f"shapes[{i}]"
    if not isinstance(shape, dict):
        raise _bad(path, f"{where} is not an object")
    if not isinstance(shape.get("label"), str):
        raise _bad(path, f"{where}: label {shown(shape.get('label'))} is not a string")
    shape_type = shape.get("shape_type") or "polygon"  # labelme reads a missing type as a polygon
    if shape_type not in SHAPE_TYPES:
        raise _bad(path, f"{where}: shape_type {shown(shape_type)} is none of labelme's {', '.join(SHAPE_TYPES)}")
    out = {"label": shape["label"], "type": shape_type, "points": _check_points(shape.get("points"), where, path)}
    if shape_type == "mask":
        out["mask"] = _decode_mask(shape.get("mask"), where, path)
    return out


def read_annotation(path: Path) -> dict[str, Any]:
    """A labelme JSON file's shapes (checked), imagePath, imageData (decoded to bytes or None) and declared size."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"cannot read it ({type(e).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise _bad(path, "no 'shapes' list at its top level")
    shapes = [_parse_shape(s, i, path) for i, s in enumerate(doc["shapes"])]
    image_path, data = doc.get("imagePath"), doc.get("imageData")
    if not isinstance(image_path, str | type(None)) or not isinstance(data, str | type(None)):
        raise _bad(path, "imagePath and imageData are not strings (or null)")
    size = [doc.get("imageHeight"), doc.get("imageWidth")]
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in size):
        raise _bad(path, f"imageHeight / imageWidth {shown(size)} are not integers")
    if data is not None:
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(path, "imageData is not base64") from None
    return {"shapes": shapes, "imagePath": image_path or "", "imageData": data, "size": size}


def _decode_image_data(data: bytes, path: Path) -> np.ndarray:
    """The image stored in imageData, as stored (labelme stores it upright, so no EXIF orientation is applied)."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise ValueError(f"{img.width}x{img.height} is above PIL's limit of {limit:,} pixels")
            img.load()
            return image_to_array(img)
    except Exception as e:  # PIL raises many types on damaged data
        text = " ".join(str(e).split()) or type(e).__name__
        raise LabelmeError("unreadable-image", f"{path}: cannot read the image in imageData ({text})") from None


def load_annotation_image(path: Path, doc: dict[str, Any]) -> np.ndarray:
    """The image of annotation ``doc`` (read from ``path``): imageData, else imagePath relative to the JSON."""
    if doc["imageData"] is not None:
        image = _decode_image_data(doc["imageData"], path)
    else:
        # labelme writes imagePath with the separators of the system it ran on.
        file = path.parent / PureWindowsPath(doc["imagePath"]).as_posix()
        if not doc["imagePath"] or not file.is_file():
            raise LabelmeError(
                "listed-image-missing", f"{path}: imageData is null and its imagePath {file} is not a file"
            )
        try:
            image = load_image(file)
        except FcnsegError as e:
            raise LabelmeError("unreadable-image", f"{path}: {e}") from None
    height, width = doc["size"]
    if (height is not None and height != image.shape[0]) or (width is not None and width != image.shape[1]):
        raise LabelmeError(
            "size-mismatch",
            f"{path}: imageWidth x imageHeight is {width}x{height} but the image is {image.shape[1]}x{image.shape[0]}",
        )
    return image


# -- drawing ------------------------------------------------------------------------------------------------


def shape_problem(shape: dict[str, Any], width: int, height: int) -> tuple[str, str] | None:
    """(kind, why) when labelme would draw ``shape`` as nothing or out of the image; None when it is fine."""
    kind, n = shape["type"], len(shape["points"])
    if kind == "points":
        return "degenerate-annotation", "shape_type 'points' has no mask in labelme"
    if kind in _POINT_COUNTS and n != _POINT_COUNTS[kind]:
        return "degenerate-annotation", f"{kind} with {n} points; expected {_POINT_COUNTS[kind]}"
    if kind in _MIN_POINTS and n < _MIN_POINTS[kind]:
        return "degenerate-annotation", f"{kind} with {n} point(s); expected at least {_MIN_POINTS[kind]}"
    if any(x < 0 or y < 0 or x > width or y > height for x, y in shape["points"]):
        return "annotation-out-of-bounds", f"a point lies outside the {width}x{height} image"
    return None


def _place_mask(canvas: np.ndarray, shape: dict[str, Any], value: int) -> None:
    """A mask shape's image written into ``canvas`` at its first point (labelme 7.1's placement)."""
    patch, points = shape["mask"], np.asarray(shape["points"])
    (x1, y1), (x2, y2) = np.round(points).astype(int)  # numpy rounds half to even, as labelme does
    ph, pw = patch.shape
    if np.array_equal(points, np.trunc(points)):  # integer corners: the patch is cut to the box they span
        ph, pw = min(ph, y2 - y1 + 1), min(pw, x2 - x1 + 1)
    height, width = canvas.shape
    ys, ye, xs, xe = max(y1, 0), min(y1 + ph, height), max(x1, 0), min(x1 + pw, width)
    if ys < ye and xs < xe:
        region = patch[ys - y1 : ye - y1, xs - x1 : xe - x1]
        canvas[ys:ye, xs:xe][region] = value


def _draw(draw: ImageDraw.ImageDraw, shape: dict[str, Any], value: int) -> None:
    kind, xy = shape["type"], shape["points"]
    if kind in ("polygon", "oriented_rectangle"):
        draw.polygon(xy, fill=value, outline=value)
    elif kind == "rectangle":
        (x0, y0), (x1, y1) = xy
        draw.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=value, outline=value)
    elif kind == "circle":
        (cx, cy), (px, py) = xy
        r = math.hypot(cx - px, cy - py)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=value, outline=value)
    elif kind == "line":
        draw.line(xy, fill=value, width=LINE_WIDTH)
    elif kind == "linestrip":
        draw.line(xy, fill=value, width=LINE_WIDTH, joint="curve")
    elif kind == "point":
        (cx, cy) = xy[0]
        draw.ellipse(
            (cx - POINT_RADIUS, cy - POINT_RADIUS, cx + POINT_RADIUS, cy + POINT_RADIUS), fill=value, outline=value
        )


def paint_shapes(canvas: np.ndarray, shapes: list[tuple[dict[str, Any], int]]) -> None:
    """Draw each ``(shape, value)`` into the uint8 ``canvas`` in order, later over earlier; degenerate shapes skipped.

    Drawing every shape with its own value into one picture covers the same pixels as labelme's one boolean mask
    per shape assigned in order: the value does not change which pixels PIL's primitives touch."""
    height, width = canvas.shape
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for shape, value in shapes:
        problem = shape_problem(shape, width, height)
        if problem is not None and problem[0] == "degenerate-annotation":
            continue
        if shape["type"] == "mask":
            canvas[...] = np.asarray(img)
            _place_mask(canvas, shape, value)
            img = Image.fromarray(canvas)
            draw = ImageDraw.Draw(img)
        else:
            _draw(draw, shape, value)
    canvas[...] = np.asarray(img)


# -- the dataset --------------------------------------------------------------------------------------------


def _listed(items: list[str], limit: int = 3) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


@register_dataset("labelme")
class LabelmeDataset(SegmentationDataset):
    """labelme JSON files in ``ROOT`` (one per image), classes from ``ROOT/labels.txt`` or gathered from the files.

    Splits are ``train`` and ``val`` (from ``train.txt`` / ``val.txt`` when either exists, else drawn with
    ``seed``, ``val_fraction`` of the files to val) and ``all`` (every JSON file).
    """

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(transforms)
        check_split(split, SPLITS, "the labelme dataset")
        self.root = open_root(root, "labelme", _LAYOUT)
        check_fraction(val_fraction)
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.files = {p.stem: p for p in sorted(self.root.glob("*.json")) if p.is_file() and not p.name.startswith(".")}
        self.labels_file = self.root / "labels.txt"
        self.classes = read_labels_file(self.labels_file) if self.labels_file.exists() else self._gather_labels()
        self.palette = palette_for(self.classes, len(self.classes))
        self._values = {name: i for i, name in enumerate(self.classes)} | {IGNORE: IGNORE_INDEX}
        self.ids = self._split_ids(split)
        if not self.ids:
            where = self.split_file(split) if split != "all" and self.uses_split_files else self.root
            raise SplitError(where, "empty-split", f"split {split!r} is empty ({len(self.files)} labelme JSON files)")

    def _gather_labels(self) -> tuple[str, ...]:
        found: set[str] = set()
        for path in self.files.values():
            try:
                found.update(s["label"] for s in read_annotation(path)["shapes"])
            except LabelmeError:
                continue  # reported by check-data as unreadable-annotations
        names = (BACKGROUND, *sorted(found - {BACKGROUND, IGNORE}))
        shown_names = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        warnings.warn(
            f"{self.labels_file}: not found, so the classes are the labels of the {len(self.files)} JSON files, "
            f"sorted: {shown_names}; write labels.txt ({_LABELS_FORMAT}) to fix them",
            stacklevel=3,
        )
        return names

    def label_mapping(self) -> dict[str, Any]:
        """labelme's label names and the class index (255: void) each was drawn with."""
        return {"format": "labelme", "labels": dict(self._values)}

    # -- splits ---------------------------------------------------------------------------------------------
    def split_file(self, split: str) -> Path:
        return self.root / f"{split}.txt"

    @property
    def uses_split_files(self) -> bool:
        return self.split_file("train").exists() or self.split_file("val").exists()

    def _split_ids(self, split: str) -> list[str]:
        stems = sorted(self.files)
        if split == "all":
            return stems
        if not self.uses_split_files:
            train, val = seeded_split(stems, self.val_fraction, self.seed)
            return train if split == "train" else val
        path = self.split_file(split)
        if not path.exists():
            other = "val" if split == "train" else "train"
            raise SplitError(
                path, "empty-split", f"split file not found; {other}.txt exists, so splits come from files"
            )
        return [s for s in read_split_file(path) if s in self.files]  # the others: check-data's id-without-files

    # -- items ----------------------------------------------------------------------------------------------
    def mask_path(self, index: int) -> Path:
        """The JSON file the item's mask is drawn from."""
        return self.files[self.ids[index]]

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.mask_path(index)
        doc = read_annotation(path)
        image = load_annotation_image(path, doc)
        unknown = sorted({s["label"] for s in doc["shapes"]} - self._values.keys())
        if unknown:
            raise LabelmeError(
                "unknown-category",
                f"{path}: label(s) {', '.join(shown(u) for u in unknown)} not in {self.labels_file.name}; "
                f"expected one of {', '.join(self.classes)} or {IGNORE}",
            )
        mask = np.zeros(image.shape[:2], dtype=np.uint8)
        paint_shapes(mask, [(s, self._values[s["label"]]) for s in doc["shapes"]])
        return image, mask

    # -- check-data -----------------------------------------------------------------------------------------
    def extra_problems(self) -> list[Problem]:
        """Shapes drawn as nothing or reaching outside their image (files of this split), split-file stems
        without a JSON file, stems in both split files. Items that cannot be read are reported as they are read."""
        problems = self._split_file_problems()
        for stem in self.ids:
            path = self.files[stem]
            try:
                doc = read_annotation(path)
                height, width = load_annotation_image(path, doc).shape[:2]
            except LabelmeError:
                continue  # the item's own read reports it
            found: dict[str, list[str]] = {}
            for i, shape in enumerate(doc["shapes"]):
                problem = shape_problem(shape, width, height)
                if problem is not None:
                    found.setdefault(problem[0], []).append(f"shapes[{i}] {shown(shape['label'])}: {problem[1]}")
            for kind, items in found.items():
                what = "skipped" if kind == "degenerate-annotation" else "drawn cut to the image"
                problems.append(Problem(str(path), kind, f"{_listed(items)} ({what})"))
        return problems

    def _split_file_problems(self) -> list[Problem]:
        if not self.uses_split_files:
            return []
        problems, listed = [], {}
        for name in ("train", "val"):
            path = self.split_file(name)
            if not path.exists():
                continue  # the split's own reading reports it
            try:
                listed[name] = ids = read_split_file(path)
            except SplitError as e:
                problems.append(Problem(e.file, e.kind, e.detail))
                continue
            missing = [shown(s) for s in ids if s not in self.files]
            if missing:
                problems.append(Problem(str(path), "id-without-files", f"no JSON file for {_listed(missing, 5)}"))
        both = sorted(set(listed.get("train", ())) & set(listed.get("val", ())))
        if both:
            problems.append(
                Problem(
                    str(self.split_file("val")),
                    "split-overlap",
                    f"{len(both)} stem(s) also in train.txt: {_listed([shown(s) for s in both], 5)}",
                )
            )
        return problems
