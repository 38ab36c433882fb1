"""CVAT's "Segmentation mask 1.1" export: Pascal VOC's segmentation layout, coloured with the task's own labels.

Layout (as CVAT's format page describes the zip, unpacked into ROOT)::

    ROOT/labelmap.txt                          one label a line, name:R,G,B:parts:actions ('#' starts a comment)
    ROOT/ImageSets/Segmentation/<subset>.txt   image ids, one a line: one list per CVAT subset (default.txt
                                               when the task has none, train.txt / val.txt ... when it has)
    ROOT/SegmentationClass/<id>.png            RGB masks in the labels' colours (1-channel: label line indices)
    ROOT/SegmentationObject/<id>.png           instance masks: not read
    ROOT/JPEGImages/<id>.jpg                   the images (exported with CVAT's "Save images"), any suffix

How the files are read, from CVAT's format page and its exporter (it hands the task to datumaro's Pascal VOC
exporter with the task's labels as the label map):

* Class ``i`` is the ``i``-th label line of labelmap.txt. CVAT adds ``background:0,0,0::`` first when the task
  has no label of that name, and datumaro writes the other labels sorted by name; whatever the file says wins.
* A line's colour may be empty only when every line's is: datumaro then colours line ``i`` with Pascal VOC's
  colour of index ``i``.
* Every pixel of an exported mask has a label's colour (unannotated pixels get the background's), so no colour
  is void by itself: a colour that no label has (Pascal VOC's 224,224,192 border colour included) is an error,
  and ``check-data`` reports it as ``unknown-colour``. The label named by the ``void_label`` option (default
  ``ignored``, the name datumaro's Pascal VOC label map gives VOC's void index 255, colour 224,224,192) is read
  as void (255) and is no class; ``void_label=null`` makes every label a class.
* A 1-channel mask (datumaro's export without its colour map) holds label line indices instead of colours.
* An image without annotations is listed in its subset's file but has no mask: it is skipped, and
  ``check-data`` reports it as ``image-without-mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ..errors import FcnsegError, shown
from ..imageio import IMAGE_EXTENSIONS, _read, image_to_array
from ..palette import voc_palette
from .base import IGNORE_INDEX, SegmentationDataset, SplitError, read_split_file, register_dataset
from .check import Problem
from .folder import MaskColorError, parse_color

__all__ = ["LABELMAP_FORMAT", "CvatDataset", "read_labelmap"]

LABELMAP_FORMAT = "one label a line as name:R,G,B:parts:actions (e.g. 'car:255,0,0::')"
_LAYOUT = "ROOT/labelmap.txt, ROOT/ImageSets/Segmentation/<subset>.txt, ROOT/SegmentationClass and ROOT/JPEGImages"
# The order in which an id's image is looked for when two files share its stem: the VOC layout's own suffix first.
_IMAGE_ORDER = (".jpg", ".jpeg", ".png", *sorted(IMAGE_EXTENSIONS - {".jpg", ".jpeg", ".png"}))
_FIRST_SPLITS = ("train", "val", "test", "default")

Color = tuple[int, int, int]


def _fmt(rgb: Color | np.ndarray) -> str:
    return ",".join(str(int(v)) for v in rgb)


def _parse_color(text: str, where: str, name: str) -> Color | None:
    return parse_color(text, where, name, "label") if text.strip() else None


def _labelmap_lines(text: str, path: Path) -> list[tuple[str, Color | None, str]]:
    """(name, colour or None, ``file:line``) of each label line, in file order."""
    out: list[tuple[str, Color | None, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # datumaro writes a '# label:color_rgb:parts:actions' heading
        where = f"{path}:{lineno}"
        fields = line.split(":")
        if len(fields) != 4:
            raise FcnsegError(
                f"{where}: {shown(line)} has {len(fields)} ':'-separated fields; expected {LABELMAP_FORMAT}"
            )
        name = fields[0].strip()
        if not name:
            raise FcnsegError(f"{where}: empty label name; expected {LABELMAP_FORMAT}")
        if any(name == seen for seen, _, _ in out):
            raise FcnsegError(f"{where}: label {shown(name)} is listed twice; expected each label once")
        out.append((name, _parse_color(fields[1], where, name), where))
    return out


def read_labelmap(path: str | Path) -> list[tuple[str, Color]]:
    """The labels of a ``labelmap.txt`` with their colours, in file order.

    Lines without a colour take Pascal VOC's colour of their index, as datumaro gives them, but only when no line
    has one; two labels may not share a colour, since masks are mapped back to labels through them.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FcnsegError(f"{path}: label map not found; expected {LABELMAP_FORMAT}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"{path}: cannot read label map ({e.__class__.__name__}); expected UTF-8 text") from None
    lines = _labelmap_lines(text, path)
    if not lines:
        raise FcnsegError(f"{path}: lists no labels; expected {LABELMAP_FORMAT}")
    given = [c for _, c, _ in lines if c is not None]
    if not given:
        palette = voc_palette(len(lines))
        return [(name, tuple(int(v) for v in row)) for (name, _, _), row in zip(lines, palette, strict=True)]
    owner: dict[Color, str] = {}
    for name, color, where in lines:
        if color is None:
            raise FcnsegError(f"{where}: label {shown(name)} has no colour; expected a colour on every line or on none")
        if color in owner:
            raise FcnsegError(
                f"{where}: labels {shown(owner[color])} and {shown(name)} share the colour {_fmt(color)}; "
                "expected one colour per label"
            )
        owner[color] = name
    return [(name, color) for name, color, _ in lines]  # type: ignore[misc]


def _mask_pixels(img: Image.Image) -> np.ndarray:
    """H x W label line indices of a 1-channel mask, H x W x 3 colours of any other."""
    return np.array(img) if img.mode == "L" else image_to_array(img)


def _scan_images(folder: Path) -> tuple[dict[str, Path], list[Problem]]:
    """Image files by stem, and a duplicate-stem problem for each stem with several files."""
    found: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        suffix = path.suffix.lower()
        if suffix in _IMAGE_ORDER and not path.name.startswith(".") and path.is_file():
            found.setdefault(path.stem, []).append(path)
    images: dict[str, Path] = {}
    problems = []
    for stem, paths in sorted(found.items()):
        paths.sort(key=lambda p: (_IMAGE_ORDER.index(p.suffix.lower()), p.name))
        images[stem] = paths[0]
        for other in paths[1:]:
            problems.append(
                Problem(str(other), "duplicate-stem", f"{paths[0].name} has the same stem and is read instead")
            )
    return images, problems


@register_dataset("cvat")
class CvatDataset(SegmentationDataset):
    """A CVAT "Segmentation mask 1.1" export: ``split`` is a subset name (a file of ImageSets/Segmentation).

    ``void_label``: the label of labelmap.txt read as void (255) rather than as a class, if listed (None: none).
    """

    disjoint_splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        void_label: str | None = "ignored",
    ) -> None:
        super().__init__(transforms)
        if root is None:
            raise FcnsegError(f"--root: the cvat dataset needs --root DIR holding {_LAYOUT}")
        if void_label is not None and not isinstance(void_label, str):
            raise FcnsegError(f"void_label {shown(void_label)}: expected a label name of labelmap.txt, or null")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FcnsegError(f"--root {self.root}: no such folder; expected {_LAYOUT}")
        self.split = split
        self.labelmap_file = self.root / "labelmap.txt"
        self._read_labels(read_labelmap(self.labelmap_file), void_label)
        self.split_file = self._split_file(split)
        for sub, what in (("SegmentationClass", "<id>.png masks"), ("JPEGImages", "the images")):
            if not (self.root / sub).is_dir():
                more = " (export with CVAT's 'Save images' option)" if sub == "JPEGImages" else ""
                raise FcnsegError(f"{self.root / sub}: folder not found; expected {what} there{more}")
        self._images, self._image_problems = _scan_images(self.root / "JPEGImages")
        self.listed = read_split_file(self.split_file)
        self.ids = [i for i in self.listed if self._mask_file(i).is_file()]
        if not self.ids:
            what = f"none of its {len(self.listed)} ids has a mask in SegmentationClass/" if self.listed else "no ids"
            raise SplitError(self.split_file, "empty-split", f"split {split!r} is empty: {what}")

    # -- labels ---------------------------------------------------------------------------------------------
    def _read_labels(self, labels: list[tuple[str, Color]], void_label: str | None) -> None:
        classes = [(n, c) for n, c in labels if n != void_label]
        if not classes:
            raise FcnsegError(f"{self.labelmap_file}: lists only the void label {shown(void_label)}; expected classes")
        if len(classes) > IGNORE_INDEX:
            raise FcnsegError(f"{self.labelmap_file}: lists {len(classes)} labels; at most {IGNORE_INDEX} fit")
        self.classes = tuple(n for n, _ in classes)
        self.palette = np.array([c for _, c in classes], dtype=np.uint8).reshape(-1, 3)
        self.void = {n: c for n, c in labels if n == void_label}
        index = {n: i for i, n in enumerate(self.classes)}
        # Line i of labelmap.txt -> class index (255 for the void label); values past the last line stay as they are.
        self._line_table = np.arange(256, dtype=np.uint8)
        self._line_table[: len(labels)] = [index.get(n, IGNORE_INDEX) for n, _ in labels]
        self._color_index = {c: index.get(n, IGNORE_INDEX) for n, c in labels}

    def label_mapping(self) -> dict[str, Any]:
        """The labels' colours (and the void label's, if any) that the masks were read through."""
        out: dict[str, Any] = {
            "format": "cvat",
            "colors": {n: [int(v) for v in c] for n, c in zip(self.classes, self.palette, strict=True)},
        }
        if self.void:
            out["void"] = {n: list(c) for n, c in self.void.items()}
        return out

    # -- splits ---------------------------------------------------------------------------------------------
    @classmethod
    def splits_in(cls, root: str | Path | None) -> tuple[str, ...]:
        """The subsets that ``root``'s export lists (train, val, test and default first, then by name), each a
        disjoint part of the task; the class's :attr:`disjoint_splits` where it lists none."""
        if root is None:
            return cls.disjoint_splits
        folder = Path(root).expanduser() / "ImageSets" / "Segmentation"
        names = sorted(p.stem for p in folder.glob("*.txt") if p.is_file()) if folder.is_dir() else []
        ordered = [n for n in _FIRST_SPLITS if n in names] + [n for n in names if n not in _FIRST_SPLITS]
        return tuple(ordered) or cls.disjoint_splits

    def _split_file(self, split: str) -> Path:
        folder = self.root / "ImageSets" / "Segmentation"
        if not folder.is_dir():
            raise FcnsegError(f"{folder}: folder not found; expected {_LAYOUT}")
        have = [n for n in self.splits_in(self.root) if (folder / f"{n}.txt").is_file()]
        if split not in have:
            listed = ", ".join(have) or "none"
            raise SplitError(
                folder / f"{split}.txt",
                "unreadable-split-file",
                f"split file not found; this export has the subset(s) {listed} (--split NAME; CVAT writes default.txt "
                "when the task has no subsets)",
            )
        return folder / f"{split}.txt"

    # -- files ----------------------------------------------------------------------------------------------
    def _mask_file(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def image_path(self, index: int) -> Path:
        image_id = self.ids[index]
        # An id without an image reads as its absent .jpg, which check-data reports as a mask without image.
        return self._images.get(image_id, self.root / "JPEGImages" / f"{image_id}.jpg")

    def mask_path(self, index: int) -> Path:
        return self._mask_file(self.ids[index])

    def read_mask(self, path: Path) -> np.ndarray:
        """Class indices of an RGB mask's colours, or of a 1-channel mask's label line indices."""
        pixels = _read(path, "mask", _mask_pixels, upright=False)  # stored as it lies: no EXIF orientation
        if pixels.ndim == 2:
            return self._line_table[pixels]
        return self._colors_to_indices(pixels, path)

    def _colors_to_indices(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        flat = rgb.reshape(-1, 3).astype(np.uint32)
        keys = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
        # A mask holds a handful of colours: map the distinct ones, not every pixel through a dict.
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        table = np.zeros(len(uniq), dtype=np.uint8)
        foreign: list[tuple[int, Color]] = []
        for j, key in enumerate(uniq.tolist()):
            color = (key >> 16, (key >> 8) & 255, key & 255)
            if color in self._color_index:
                table[j] = self._color_index[color]
            else:
                foreign.append((int(counts[j]), color))
        if foreign:
            foreign.sort(key=lambda t: (-t[0], t[1]))
            listed = ", ".join(f"{_fmt(c)} ({n} px)" for n, c in foreign[:5])
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise MaskColorError(
                f"{path}: colour{'s' if len(foreign) > 1 else ''} {listed}{more} not in {self.labelmap_file}; "
                "expected the colours of its labels"
            )
        return table[inverse.reshape(-1)].reshape(rgb.shape[:2])

    # -- check-data -----------------------------------------------------------------------------------------
    def extra_problems(self) -> list[Problem]:
        """Listed ids without a mask (images without annotations, skipped) and images sharing a stem."""
        problems = list(self._image_problems)
        for image_id in self.listed:
            if self._mask_file(image_id).is_file():
                continue
            mask = f"SegmentationClass/{image_id}.png"
            if image_id in self._images:
                problems.append(
                    Problem(
                        str(self._images[image_id]),
                        "image-without-mask",
                        f"listed in {self.split_file.name} but has no mask {mask} (no annotations); it is skipped",
                    )
                )
            else:
                problems.append(
                    Problem(
                        str(self.split_file), "id-without-files", f"{shown(image_id)} has no image and no mask {mask}"
                    )
                )
        return problems
