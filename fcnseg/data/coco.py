"""COCO instance annotations (``instances_<split>.json``) read as semantic segmentation.

Layout::

    ROOT/annotations/instances_<split>.json     COCO's JSON (``--data-option annotations=FILE`` names another)
    ROOT/<split>/<file_name>                    the images, COCO's own layout (train2017/, val2017/), else
    ROOT/images/<split>/<file_name>             here, else ROOT/images/<file_name> (``images=DIR``: only DIR)
    ROOT/.fcnseg-cache/coco-<stem>-<hash>/      the rasterised masks, one ``<image id>.png`` per image

Any split whose JSON exists can be read (``train2017``, ``val2017``, ...); ``train`` and ``val`` are what
``check-data`` reads when no split is given.

Classes: index 0 is ``background``, then the file's categories sorted by id are 1..K under their own names (ids
1, 5, 90 become 1, 2, 3; :meth:`CocoDataset.label_mapping` records which id each index stands for).

Drawing rule, where objects overlap: an image's annotations are drawn in order of decreasing area (the pixel
count of the annotation's own mask, not its ``area`` field), ties by increasing annotation id, each over the ones
before; so a smaller object lies on top of a larger one it overlaps. Crowd regions (``iscrowd: 1``) are drawn
first, as 255 (void), so they stay void only where no other object is drawn; with ``crowd=ignore`` they are not
drawn at all (their pixels stay background unless an object covers them). An image without annotations is all
background.

Masks are rasterised once, the first time an item is read, and cached as palette PNGs of class indices in
``ROOT/.fcnseg-cache/coco-<JSON stem>-<first 16 hex digits of the JSON's SHA-256>/`` (``-crowd-ignore`` appended
for ``crowd=ignore``), so that an edited JSON gets a folder of its own; where ROOT cannot be written the cache is
``masks/`` in fcnseg's cache folder (``$FCNSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/fcnseg``, else
``~/.cache/fcnseg``). Each file is written atomically, so DataLoader workers that race on one mask are harmless.

A damaged annotation is skipped (or, reaching outside its image, clipped to it) and reported by ``fcnseg
check-data``; an image the JSON lists but that is not on disk is left out of the items. Decoding polygons and
run-length encodings needs pycocotools (``pip install "fcnseg[coco]"``), imported only when a COCO set is opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

import numpy as np

from ..errors import FcnsegError, shown
from ..imageio import read_mask_png, save_mask_png
from ..io import cache_root
from ..palette import palette_for
from .base import IGNORE_INDEX, SegmentationDataset, SplitError, register_dataset
from .check import Problem

__all__ = ["COCO_LAYOUT", "CROWD_MODES", "CocoDataset", "coco_mask_api", "rle_string_counts"]

COCO_LAYOUT = (
    "ROOT/annotations/instances_<split>.json with the images in ROOT/<split>/, ROOT/images/<split>/ or ROOT/images/"
)
CROWD_MODES: tuple[str, ...] = ("void", "ignore")
INSTALL_HINT = 'coco dataset needs pycocotools: pip install "fcnseg[coco]"'
CACHE_FOLDER = ".fcnseg-cache"
# Polygon points further than this many image sizes outside the image are not rasterised: pycocotools' polygon
# rasteriser allocates memory in proportion to the edges' length, so one absurd coordinate would exhaust it.
_FAR_OUTSIDE = 1.0
_TOLERANCE = 1e-6  # of the image's size: float rounding of a coordinate on the image's edge is not "outside"
_NUMPY2_WARNING = "__array__ implementation doesn't accept a copy keyword"
_UNREADABLE, _UNKNOWN, _OUTSIDE, _DEGENERATE = (
    "unreadable-annotations",
    "unknown-category",
    "annotation-out-of-bounds",
    "degenerate-annotation",
)


def coco_mask_api() -> ModuleType:
    """``pycocotools.mask``, imported now: an optional extra, so the package imports without it."""
    try:
        import pycocotools.mask as mask_api
    except ImportError:
        raise FcnsegError(INSTALL_HINT) from None
    return mask_api


def rle_string_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed COCO RLE string, or None when ``text`` is not one.

    The encoding, as COCO's mask API (maskApi.c, ``rleToString``) writes it: each count in little-endian groups
    of 5 bits, one character per group (value + 48), bit 0x20 set while more groups follow and bit 0x10 of the
    last group the sign; from the fourth count on, what is stored is the difference to the count two before.
    Checked here because pycocotools' decoder trusts the string: runs longer than the image overrun its buffer.
    """
    counts: list[int] = []
    value = shift = 0
    for char in text:
        c = ord(char) - 48
        if not 0 <= c < 64:
            return None
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            if shift > 60:
                return None
            continue
        if c & 0x10:
            value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
        value = shift = 0
    return counts if shift == 0 else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# ------------------------------------------------------------------------------------------ annotations


class _Shape(NamedTuple):
    """One annotation's mask as pycocotools reads it: ``polygons`` (a tuple of coordinate lists), ``counts`` (an
    uncompressed RLE's run lengths) or ``string`` (a compressed RLE)."""

    kind: str
    data: Any


class _Ann(NamedTuple):
    id: int
    label: int
    crowd: bool
    shape: _Shape


@dataclass
class _Image:
    id: int
    file_name: str
    width: int
    height: int
    anns: list[_Ann] = field(default_factory=list)


class _Reasons:
    """What is wrong with one annotation, by problem kind: one problem line per kind."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = {}

    def add(self, kind: str, reason: str) -> None:
        self.by_kind.setdefault(kind, []).append(reason)


def _polygon_part(part: Any, n: int, size: tuple[int, int], why: _Reasons) -> list[float] | None:
    """Polygon ``n`` (1-based) of an annotation if it can be drawn, else None; its defects go to ``why``."""
    w, h = size
    if not isinstance(part, list) or not all(_is_number(v) for v in part):
        why.add(_UNREADABLE, f"polygon {n} is not a list of finite numbers (it is left out)")
        return None
    if len(part) % 2:
        why.add(_DEGENERATE, f"polygon {n} has an odd number of coordinates, {len(part)} (it is left out)")
        return None
    if len(part) < 6:
        why.add(_DEGENERATE, f"polygon {n} has {len(part) // 2} point(s); expected 3 or more (it is left out)")
        return None
    xs, ys = np.asarray(part[0::2], dtype=np.float64), np.asarray(part[1::2], dtype=np.float64)
    # Shoelace formula: twice the signed area of the closed polygon.
    if float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) == 0.0:
        why.add(_DEGENERATE, f"polygon {n} has zero area (it is left out)")
        return None
    tol = _TOLERANCE * max(w, h)
    outside = (xs < -tol) | (xs > w + tol) | (ys < -tol) | (ys > h + tol)
    if outside.any():
        i = int(np.argmax(outside))
        where = f"polygon {n}'s point ({xs[i]:g}, {ys[i]:g}) lies outside the {w}x{h} image"
        far = (np.abs(xs - w / 2) > (0.5 + _FAR_OUTSIDE) * w) | (np.abs(ys - h / 2) > (0.5 + _FAR_OUTSIDE) * h)
        if far.any():
            why.add(_OUTSIDE, f"{where}, too far to draw (the polygon is left out)")
            return None
        why.add(_OUTSIDE, f"{where} (the polygon is clipped to the image)")
    return [float(v) for v in part]


def _polygons(segm: list, size: tuple[int, int], why: _Reasons) -> _Shape | None:
    if not segm:
        why.add(_DEGENERATE, "segmentation holds no polygon (nothing is drawn)")
        return None
    parts = [p for n, part in enumerate(segm, 1) if (p := _polygon_part(part, n, size, why)) is not None]
    return _Shape("polygons", tuple(parts)) if parts else None


def _rle(segm: dict, size: tuple[int, int], why: _Reasons) -> _Shape | None:
    w, h = size
    rle_size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(rle_size, list) and len(rle_size) == 2 and all(_is_int(v) for v in rle_size)):
        why.add(_UNREADABLE, "RLE has no size [height, width] (it is skipped)")
        return None
    if rle_size != [h, w]:
        why.add(_OUTSIDE, f"RLE size is {rle_size[1]}x{rle_size[0]}, its image {w}x{h} (it is skipped)")
        return None
    if isinstance(counts, str):
        runs, shape = rle_string_counts(counts), _Shape("string", counts)
    elif isinstance(counts, list) and all(_is_int(v) and v >= 0 for v in counts):
        runs, shape = counts, _Shape("counts", tuple(counts))
    else:
        runs = shape = None
    if runs is None:
        why.add(_UNREADABLE, "RLE counts are neither a COCO RLE string nor a list of run lengths (it is skipped)")
        return None
    if sum(runs) != w * h:
        why.add(_OUTSIDE, f"RLE runs cover {sum(runs)} pixels, its {w}x{h} image {w * h} (it is skipped)")
        return None
    return shape


def _segmentation(segm: Any, size: tuple[int, int], why: _Reasons) -> _Shape | None:
    """The drawable shape of a ``segmentation`` (polygons, uncompressed or compressed RLE, as COCO's data format
    page defines them), or None."""
    if isinstance(segm, list):
        if segm and all(_is_number(v) for v in segm):
            why.add(_UNREADABLE, "segmentation is one flat list; expected a list of polygons [[x1, y1, ...], ...]")
            return None
        return _polygons(segm, size, why)
    if isinstance(segm, dict):
        return _rle(segm, size, why)
    why.add(_UNREADABLE, "segmentation is neither a list of polygons nor an RLE object (it is skipped)")
    return None


def _check_bbox(bbox: Any, size: tuple[int, int], why: _Reasons) -> None:
    """A ``bbox`` [x, y, width, height] reaching outside the image (it is not drawn: only reported)."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        return
    w, h = size
    x, y, bw, bh = bbox
    tol = _TOLERANCE * max(w, h)
    if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
        why.add(_OUTSIDE, f"bbox [{x:g}, {y:g}, {bw:g}, {bh:g}] reaches outside the {w}x{h} image")


def _safe_file_name(name: Any) -> bool:
    """A relative path inside the image folder: no absolute path, drive, '..', backslash or NUL."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and not PureWindowsPath(name).drive


class _CocoFile:
    """One instances JSON, checked: its categories, its images with their drawable annotations, and the problems
    found (each skipped entry is one)."""

    def __init__(self, path: Path, crowd: str) -> None:
        self.path = path
        self.problems: list[Problem] = []
        raw, data = _load_json(path)
        self.digest = hashlib.sha256(raw).hexdigest()[:16]
        images, anns, cats = _sections(data, path)
        self.category_ids, self.names = self._categories(cats)
        self.labels = {cid: i for i, cid in enumerate(self.category_ids, 1)}
        self.images = self._images(images)
        for n, entry in enumerate(anns):
            self._annotation(entry, n, crowd)

    def _problem(self, kind: str, message: str) -> None:
        self.problems.append(Problem(str(self.path), kind, message))

    def _categories(self, cats: list) -> tuple[list[int], list[str]]:
        found: dict[int, str] = {}
        for n, cat in enumerate(cats):
            cid = cat.get("id") if isinstance(cat, dict) else None
            name = cat.get("name") if isinstance(cat, dict) else None
            if not _is_int(cid) or not isinstance(name, str) or not name.strip():
                self._problem(_UNREADABLE, f"categories[{n}]: expected an object with an integer id and a name")
            elif cid in found:
                self._problem(_UNREADABLE, f"categories[{n}]: id {cid} is listed twice (the first is kept)")
            else:
                found[cid] = name.strip()
        if len(found) >= IGNORE_INDEX:
            fit = f"at most {IGNORE_INDEX - 1} fit (index 0 is background, 255 void)"
            raise SplitError(self.path, _UNREADABLE, f"{len(found)} categories; {fit}")
        ids = sorted(found)
        names: list[str] = ["background"]
        for cid in ids:  # class names must be unique: a repeated one is told apart by its id
            names.append(found[cid] if found[cid] not in names else f"{found[cid]} (id {cid})")
        return ids, names[1:]

    def _images(self, images: list) -> dict[int, _Image]:
        found: dict[int, _Image] = {}
        for n, img in enumerate(images):
            get = img.get if isinstance(img, dict) else (lambda _key: None)
            iid, name, w, h = get("id"), get("file_name"), get("width"), get("height")
            if not (_is_int(iid) and _is_int(w) and _is_int(h) and w > 0 and h > 0 and isinstance(name, str)):
                expected = "an integer id, a file_name and a positive integer width and height"
                self._problem(_UNREADABLE, f"images[{n}]: expected {expected} (it is left out)")
            elif not _safe_file_name(name):
                why = "is no relative path inside the image folder (it is left out)"
                self._problem(_UNREADABLE, f"images[{n}]: file_name {shown(name)} {why}")
            elif iid in found:
                self._problem(_UNREADABLE, f"images[{n}]: id {iid} is listed twice (the first is kept)")
            else:
                found[iid] = _Image(iid, name, w, h)
        return found

    def _annotation(self, entry: Any, n: int, crowd: str) -> None:
        get = entry.get if isinstance(entry, dict) else (lambda _key: None)
        ann_id, image_id, cat, iscrowd = get("id"), get("image_id"), get("category_id"), get("iscrowd") or 0
        image = self.images.get(image_id) if _is_int(image_id) else None
        if not _is_int(ann_id) or image is None or iscrowd not in (0, 1):
            expected = "an integer id, the id of a listed image and iscrowd 0 or 1"
            self._problem(_UNREADABLE, f"annotations[{n}]: expected {expected} (it is skipped)")
            return
        where = f"annotation {ann_id} (image {image_id})"
        if not _is_int(cat) or cat not in self.labels:
            self._problem(_UNKNOWN, f"{where}: category id {shown(cat)} is not in categories (it is skipped)")
            return
        why = _Reasons()
        size = (image.width, image.height)
        shape = _segmentation(get("segmentation"), size, why)
        _check_bbox(get("bbox"), size, why)
        for kind, reasons in why.by_kind.items():
            self._problem(kind, f"{where}: {'; '.join(reasons)}")
        if shape is not None and not (iscrowd and crowd == "ignore"):
            image.anns.append(_Ann(ann_id, self.labels[cat], bool(iscrowd), shape))


def _load_json(path: Path) -> tuple[bytes, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        hint = _found_hint(path)
        raise SplitError(path, _UNREADABLE, f"annotation file not found{hint}; expected {COCO_LAYOUT}") from None
    except OSError as e:
        raise SplitError(path, _UNREADABLE, f"cannot read annotation file ({type(e).__name__})") from None
    try:
        return raw, json.loads(raw)
    except json.JSONDecodeError as e:
        raise SplitError(path, _UNREADABLE, f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise SplitError(path, _UNREADABLE, f"not valid JSON ({type(e).__name__})") from None


def _found_hint(path: Path) -> str:
    """`` (there is instances_train2017.json: pass --split train2017)`` where other splits' files lie beside."""
    if not path.name.startswith("instances_"):
        return ""
    others = sorted(p.name for p in path.parent.glob("instances_*.json"))
    if not others:
        return ""
    split = others[0][len("instances_") : -len(".json")]
    return f" (there is {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}: pass --split {split})"


def _sections(data: Any, path: Path) -> tuple[list, list, list]:
    """The ``images``, ``annotations`` and ``categories`` lists of a COCO file (the last two may be absent)."""
    lists = (
        (data.get("images"), data.get("annotations", []), data.get("categories", []))
        if isinstance(data, dict)
        else (None, None, None)
    )
    if not all(isinstance(x, list) for x in lists):
        expected = "expected a COCO instances object with lists images, annotations and categories"
        raise SplitError(path, _UNREADABLE, expected)
    return lists  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the dataset


def _path_option(name: str, value: Any) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise FcnsegError(f"--data-option {name}={shown(value)}: expected a path")
    return Path(value).expanduser()


def _check_split_name(split: Any) -> str:
    ok = isinstance(split, str) and split and split not in (".", "..")
    if not ok or any(c in split for c in "/\\\x00"):
        raise FcnsegError(f"--split {shown(split)}: expected a split name such as train, val or train2017")
    return split


@register_dataset("coco")
class CocoDataset(SegmentationDataset):
    """COCO-style instance annotations as semantic masks (see the module's documentation for the layout, the
    classes and the drawing rule).

    Options: ``annotations`` (one JSON file, instead of ``ROOT/annotations/instances_<split>.json``), ``images``
    (the one folder holding the images) and ``crowd`` (``void``: crowd regions are 255; ``ignore``: not drawn).
    """

    disjoint_splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        annotations: str | Path | None = None,
        images: str | Path | None = None,
        crowd: str = "void",
    ) -> None:
        super().__init__(transforms)
        if root is None:
            raise FcnsegError(f"--root: the coco dataset needs --root DIR holding {COCO_LAYOUT}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FcnsegError(f"--root {self.root}: no such folder; expected {COCO_LAYOUT}")
        self.split = _check_split_name(split)
        if crowd not in CROWD_MODES:
            raise FcnsegError(f"--data-option crowd={shown(crowd)}: expected one of {', '.join(CROWD_MODES)}")
        self.crowd = crowd
        self.image_dirs = self._image_dirs(_path_option("images", images))
        self.annotations_file = _path_option("annotations", annotations) or (
            self.root / "annotations" / f"instances_{split}.json"
        )
        coco_mask_api()  # now, so that a missing extra is said at once rather than in a DataLoader worker
        coco = _CocoFile(self.annotations_file, crowd)
        self.category_ids: tuple[int, ...] = tuple(coco.category_ids)
        self.classes = ("background", *coco.names)
        self.palette = palette_for(self.classes, len(self.classes))
        self._problems = list(coco.problems)
        self._images, self._paths = self._on_disk(coco.images)
        self.ids = [str(image.id) for image in self._images]
        name = f"coco-{self.annotations_file.stem}-{coco.digest}" + ("-crowd-ignore" if crowd == "ignore" else "")
        self.cache_dirs: tuple[Path, Path] = (self.root / CACHE_FOLDER / name, cache_root() / "masks" / name)

    def _image_dirs(self, images: Path | None) -> tuple[Path, ...]:
        if images is None:
            return (self.root / self.split, self.root / "images" / self.split, self.root / "images")
        if not images.is_dir():
            raise FcnsegError(f"--data-option images={images}: no such folder; expected the folder of the images")
        return (images,)

    def _on_disk(self, images: dict[int, _Image]) -> tuple[list[_Image], list[Path]]:
        """The listed images found on disk, with their paths; each one missing is a problem."""
        kept, paths = [], []
        for image in images.values():
            path = next((d / image.file_name for d in self.image_dirs if (d / image.file_name).is_file()), None)
            if path is None:
                self._problems.append(self._missing(image))
            else:
                kept.append(image)
                paths.append(path)
        return kept, paths

    def _missing(self, image: _Image) -> Problem:
        folder = next((d for d in self.image_dirs if d.is_dir()), self.image_dirs[0])
        looked = ", ".join(f"{d}/" for d in self.image_dirs)
        return Problem(
            str(folder / image.file_name),
            "listed-image-missing",
            f"image {image.id} of {self.annotations_file.name} is not on disk (looked in {looked}); it is left out",
        )

    # -- items ----------------------------------------------------------------------------------------------
    def image_path(self, index: int) -> Path:
        return self._paths[index]

    def mask_path(self, index: int) -> Path:
        """The item's cached mask, rasterised and written first if no cache folder holds it yet."""
        name = f"{self.ids[index]}.png"
        for folder in self.cache_dirs:
            if (folder / name).is_file():
                return folder / name
        return self._write_mask(index, name)

    def read_mask(self, path: Path) -> np.ndarray:
        return read_mask_png(path)

    def _write_mask(self, index: int, name: str) -> Path:
        mask = self.rasterise(index)
        for folder in self.cache_dirs:  # ROOT's cache folder, else fcnseg's own (a read-only dataset)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                save_mask_png(folder / name, mask, self.palette)
            except (OSError, FcnsegError):
                continue
            return folder / name
        raise FcnsegError(
            f"{self.cache_dirs[0]}: cannot write the rasterised masks there nor in {self.cache_dirs[1]}; "
            "expected a writable folder"
        )

    def rasterise(self, index: int) -> np.ndarray:
        """Item ``index``'s mask drawn from its annotations (uint8 class indices, 255 = void), bypassing the cache:
        crowd regions void first, then the objects by decreasing pixel count, ties by increasing id."""
        image = self._images[index]
        h, w = image.height, image.width
        api = coco_mask_api()
        mask = np.zeros((h, w), dtype=np.uint8)
        objects = []
        with warnings.catch_warnings():
            # pycocotools' decode, built against NumPy 1, warns under NumPy 2 on every call; its result is right.
            warnings.filterwarnings("ignore", _NUMPY2_WARNING, DeprecationWarning)
            for ann in image.anns:
                rle = self._to_rle(api, ann.shape, h, w)
                if ann.crowd:
                    mask[api.decode(rle).astype(bool)] = IGNORE_INDEX
                else:
                    objects.append((-int(api.area(rle)), ann.id, ann.label, rle))
            for _, _, label, rle in sorted(objects, key=lambda o: o[:2]):
                mask[api.decode(rle).astype(bool)] = label
        return mask

    @staticmethod
    def _to_rle(api: ModuleType, shape: _Shape, h: int, w: int) -> dict:
        # As COCO's own API (coco.py, annToRLE) turns each kind into one RLE.
        if shape.kind == "polygons":
            return api.merge(api.frPyObjects([list(p) for p in shape.data], h, w))
        if shape.kind == "counts":
            return api.frPyObjects({"size": [h, w], "counts": list(shape.data)}, h, w)
        return {"size": [h, w], "counts": shape.data.encode("ascii")}

    # -- what check-data and checkpoints read -------------------------------------------------------------------
    def label_mapping(self) -> dict[str, Any]:
        """The COCO category id of each class index (0 for background) and how crowd regions were drawn."""
        return {"format": "coco", "category_ids": [0, *self.category_ids], "crowd": self.crowd}

    def extra_problems(self) -> list[Problem]:
        """The JSON's entries that were skipped or clipped, and the listed images missing on disk."""
        return list(self._problems)
