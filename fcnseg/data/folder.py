"""A user's own data in a plain folder tree: ``images/``, ``masks/``, ``classes.txt`` and optional split files.

Layout::

    ROOT/classes.txt            one class name a line, optionally a tab then R,G,B (the class's colour)
    ROOT/images/<stem>.jpg      also .jpeg or .png
    ROOT/masks/<stem>.png       class indices (palette or greyscale PNG, 255 = void), or an RGB(A) PNG whose
                                colours are the classes' colours (224,224,192 = void)
    ROOT/train.txt, val.txt     optional: stems, one a line; without them a seeded split is drawn

Only stems with both an image and a mask are items; anything else is skipped here and reported by
``fcnseg check-data`` (see :meth:`FolderDataset.extra_problems`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import FcnsegError, shown
from ..imageio import IMAGE_FORMATS, _read, image_to_array, read_mask_png
from ..palette import VOID_COLOR, palette_for
from .base import IGNORE_INDEX, SegmentationDataset, SplitError, check_split, read_split_file, register_dataset
from .check import Problem

__all__ = ["CLASSES_FORMAT", "FolderDataset", "MaskColorError", "read_classes_file"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".png"
SPLITS = ("train", "val", "all")
CLASSES_FORMAT = "one class name a line, optionally followed by a tab and R,G,B (e.g. 'background<TAB>0,0,0')"
_LAYOUT = "ROOT/images/<stem>.jpg|jpeg|png, ROOT/masks/<stem>.png and ROOT/classes.txt"
# Modes whose pixels are colours rather than class indices; everything else goes through read_mask_png.
_COLOUR_MODES = ("RGB", "RGBA", "RGBX")


class MaskColorError(FcnsegError):
    """An RGB mask holding a colour that is neither a class colour nor the void colour."""

    kind = "unknown-colour"  # how check-data files this problem (see fcnseg.data.check)


def _fmt_color(rgb: tuple[int, int, int] | np.ndarray) -> str:
    return ",".join(str(int(v)) for v in rgb)


def parse_color(text: str, where: str, name: str, what: str = "class") -> tuple[int, int, int]:
    """``R,G,B`` as three integers 0..255; else one line naming ``where`` (file:line) and the ``what`` ``name``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise FcnsegError(
            f"{where}: colour {shown(text.strip())} of {what} {shown(name)}; expected R,G,B with three integers 0..255"
        )
    return values  # type: ignore[return-value]


def open_root(root: str | Path | None, dataset: str, layout: str) -> Path:
    """``root`` as an existing folder, else one line saying what the ``dataset`` expects there."""
    if root is None:
        raise FcnsegError(f"--root: the {dataset} dataset needs --root DIR holding {layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FcnsegError(f"--root {path}: no such folder; expected {layout}")
    return path


def check_fraction(val_fraction: object) -> None:
    """``val_fraction`` must be a number strictly between 0 and 1."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
        raise FcnsegError(f"val_fraction {shown(val_fraction)}: expected a fraction between 0 and 1 (exclusive)")


def _class_lines(text: str, path: Path) -> tuple[list[str], list[tuple[int, int, int] | None]]:
    """The names and the colours given (None where a line gives none) of a classes.txt's lines."""
    names: list[str] = []
    given: list[tuple[int, int, int] | None] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        # Split on the tab only: class names may contain spaces ("potted plant").
        name, sep, color = line.partition("\t")
        name = name.strip()
        where = f"{path}:{lineno}"
        if not name:
            raise FcnsegError(f"{where}: empty class name; expected {CLASSES_FORMAT}")
        if name in names:
            raise FcnsegError(f"{where}: class {shown(name)} is listed twice; expected each class once")
        names.append(name)
        given.append(parse_color(color, where, name) if sep and color.strip() else None)
    return names, given


def read_classes_file(path: str | Path) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names and their ``n x 3`` uint8 colours from a ``classes.txt``.

    Colours not given come from :func:`~fcnseg.palette.palette_for`; every colour must be distinct and differ
    from the void colour, since RGB masks are mapped back to indices through them.
    """
    path = Path(path)
    try:
        # utf-8-sig: editors on Windows like to start the file with a byte-order mark.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FcnsegError(f"{path}: class list not found; expected {CLASSES_FORMAT}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FcnsegError(f"{path}: cannot read class list ({e.__class__.__name__}); expected UTF-8 text") from None
    names, given = _class_lines(text, path)
    if not names:
        raise FcnsegError(f"{path}: lists no classes; expected {CLASSES_FORMAT}")
    if len(names) > IGNORE_INDEX:
        raise FcnsegError(f"{path}: lists {len(names)} classes; at most {IGNORE_INDEX} fit (255 is void)")
    generated = palette_for(names, len(names))
    palette = np.array([g if g is not None else generated[i] for i, g in enumerate(given)], dtype=np.uint8)
    owner: dict[tuple[int, ...], str] = {}
    for name, row in zip(names, palette, strict=True):
        key = tuple(int(v) for v in row)
        if key == VOID_COLOR:
            raise FcnsegError(
                f"{path}: class {shown(name)} has the void colour {_fmt_color(key)}; expected a colour of its own"
            )
        if key in owner:
            raise FcnsegError(
                f"{path}: classes {shown(owner[key])} and {shown(name)} share the colour {_fmt_color(key)}; "
                "expected one colour per class"
            )
        owner[key] = name
    return tuple(names), palette


class _Tree:
    """What lies in ``images/`` and ``masks/``: files by stem, plus files that do not fit the layout."""

    def __init__(self, root: Path) -> None:
        self.images: dict[str, Path] = {}
        self.masks: dict[str, Path] = {}
        self.problems: list[Problem] = []
        self._scan(root / "images", IMAGE_SUFFIXES, self.images, "image")
        self._scan(root / "masks", (MASK_SUFFIX,), self.masks, "mask")

    def _scan(self, folder: Path, suffixes: tuple[str, ...], found: dict[str, Path], what: str) -> None:
        if not folder.is_dir():
            raise FcnsegError(f"{folder}: folder not found; expected {_LAYOUT}")
        # Sorted, so which of two same-stem files wins (and which one is reported) never depends on the OS.
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue  # .DS_Store, editor swap files, sub-folders: not the user's data
            if path.suffix.lower() not in suffixes:
                self.problems.append(
                    Problem(str(path), "unsupported-file", f"not a {_either(suffixes)} file; it is ignored")
                )
            elif path.stem in found:
                self.problems.append(
                    Problem(
                        str(path),
                        "duplicate-stem",
                        f"{found[path.stem].name} has the same stem; expected one {what} per stem "
                        f"(this one is ignored)",
                    )
                )
            else:
                found[path.stem] = path

    @property
    def pairs(self) -> list[str]:
        return sorted(self.images.keys() & self.masks.keys())


def seeded_split(stems: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, val) stems: sorted, shuffled by ``seed``, the last ``val_fraction`` to val.

    Two or more stems always give at least one to each side.
    """
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = 0 if n < 2 else min(n - 1, max(1, int(n * val_fraction + 0.5)))
    return sorted(order[: n - n_val]), sorted(order[n - n_val :])


@register_dataset("folder")
class FolderDataset(SegmentationDataset):
    """Images and masks in ``ROOT/images`` and ``ROOT/masks`` with classes from ``ROOT/classes.txt``.

    Splits are ``train``, ``val`` (from ``train.txt`` / ``val.txt`` when either exists, else a split drawn
    with ``seed``, ``val_fraction`` of the images to val) and ``all`` (every image with a mask).
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
        check_split(split, SPLITS, "the folder dataset")
        self.root = open_root(root, "folder", _LAYOUT)
        check_fraction(val_fraction)
        self.split = split
        self.val_fraction = val_fraction
        self.seed = seed
        self.classes_file = self.root / "classes.txt"
        self.classes, self.palette = read_classes_file(self.classes_file)
        self._color_index = {tuple(int(v) for v in row): i for i, row in enumerate(self.palette)}
        self._color_index[VOID_COLOR] = IGNORE_INDEX
        self._tree = _Tree(self.root)
        self.ids = self._split_ids(split)
        if not self.ids:
            raise SplitError(
                self._split_source(split), "empty-split", f"split {split!r} is empty; {self._empty_reason(split)}"
            )

    # -- splits ------------------------------------------------------------------------------------------
    def split_file(self, split: str) -> Path:
        return self.root / f"{split}.txt"

    @property
    def uses_split_files(self) -> bool:
        return self.split_file("train").exists() or self.split_file("val").exists()

    def _split_source(self, split: str) -> Path:
        return self.split_file(split) if split != "all" and self.uses_split_files else self.root

    def _split_ids(self, split: str) -> list[str]:
        pairs = self._tree.pairs
        if split == "all":
            return pairs
        if self.uses_split_files:
            path = self.split_file(split)
            if not path.exists():
                other = "val" if split == "train" else "train"
                raise SplitError(
                    path,
                    "empty-split",
                    f"split file not found; {other}.txt exists, so splits come from files "
                    f"(write {path.name} too, or remove {other}.txt for a split drawn at random)",
                )
            have = set(pairs)
            # Listed stems without both files are skipped, like images without masks; check-data reports them.
            return [s for s in read_split_file(path) if s in have]
        train, val = seeded_split(pairs, self.val_fraction, self.seed)
        return train if split == "train" else val

    def _empty_reason(self, split: str) -> str:
        tree = self._tree
        if self.uses_split_files and split != "all":
            return "none of its stems has both an image in images/ and a mask in masks/ (run fcnseg check-data)"
        counts = f"{len(tree.pairs)} of {len(tree.images)} images have a mask ({len(tree.masks)} masks)"
        if split == "all":
            return f"{counts}; expected images/<stem>.jpg|jpeg|png with masks/<stem>.png"
        return f"{counts}; expected at least 2 images with masks for a train/val split"

    # -- files ------------------------------------------------------------------------------------------
    def image_path(self, index: int) -> Path:
        return self._tree.images[self.ids[index]]

    def mask_path(self, index: int) -> Path:
        return self._tree.masks[self.ids[index]]

    def read_mask(self, path: Path) -> np.ndarray:
        """Class indices from a palette / greyscale PNG, or an RGB(A) PNG's colours mapped through the palette."""
        if _mode(path) in _COLOUR_MODES:
            # Not load_image: that applies EXIF orientation, and a label map is stored as its pixels lie.
            return self.colors_to_indices(_read(path, "mask", image_to_array, upright=False), path)
        return read_mask_png(path)

    def colors_to_indices(self, rgb: np.ndarray, path: str | Path = "mask") -> np.ndarray:
        """Map an ``H x W x 3`` colour mask to ``H x W`` uint8 indices; a colour not in the palette is an error."""
        flat = rgb.reshape(-1, 3).astype(np.uint32)
        keys = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
        # A mask has a handful of colours: map the distinct ones, not every pixel through a dict.
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        table = np.zeros(len(uniq), dtype=np.uint8)
        foreign: list[tuple[int, tuple[int, int, int]]] = []
        for j, key in enumerate(uniq.tolist()):
            color = (key >> 16, (key >> 8) & 255, key & 255)
            index = self._color_index.get(color)
            if index is None:
                foreign.append((int(counts[j]), color))
            else:
                table[j] = index
        if foreign:
            foreign.sort(key=lambda t: (-t[0], t[1]))
            listed = ", ".join(f"{_fmt_color(c)} ({n} px)" for n, c in foreign[:5])
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise MaskColorError(
                f"{path}: colour{'s' if len(foreign) > 1 else ''} {listed}{more} not in the palette of "
                f"{self.classes_file}; expected class colours or the void colour {_fmt_color(VOID_COLOR)}"
            )
        return table[inverse.reshape(-1)].reshape(rgb.shape[:2])

    # -- check-data ---------------------------------------------------------------------------------------
    def extra_problems(self) -> list[Problem]:
        """Problems outside this split's items: stray or unpaired files, split-file stems without files, empty
        splits, stems in both split files. Covers the whole tree, whatever ``split`` is."""
        tree = self._tree
        problems = list(tree.problems)
        for stem in sorted(tree.images.keys() - tree.masks.keys()):
            problems.append(
                Problem(
                    str(tree.images[stem]),
                    "image-without-mask",
                    f"no mask masks/{stem}{MASK_SUFFIX} for this image; it is skipped",
                )
            )
        for stem in sorted(tree.masks.keys() - tree.images.keys()):
            problems.append(
                Problem(
                    str(tree.masks[stem]),
                    "mask-without-image",
                    f"no image images/{stem}.jpg|jpeg|png for this mask; it is skipped",
                )
            )
        if self.uses_split_files:
            problems.extend(self._split_file_problems())
        elif len(tree.pairs) < 2:
            train, val = seeded_split(tree.pairs, self.val_fraction, self.seed)
            for name, ids in (("train", train), ("val", val)):
                if not ids:
                    problems.append(
                        Problem(str(self.root), "empty-split", f"split {name!r} is empty; " + self._empty_reason(name))
                    )
        return problems

    def _split_file_problems(self) -> list[Problem]:
        tree = self._tree
        problems: list[Problem] = []
        listed: dict[str, list[str]] = {}
        for name in ("train", "val"):
            path = self.split_file(name)
            if not path.exists():
                problems.append(Problem(str(path), "empty-split", f"split file not found, so split {name!r} is empty"))
                continue
            try:
                ids = read_split_file(path)
            except FcnsegError as e:
                kind = e.kind if isinstance(e, SplitError) else "unreadable-split-file"
                problems.append(Problem(str(path), kind, _strip(str(e), path)))
                continue
            listed[name] = ids
            for stem in ids:
                if stem not in tree.images and stem not in tree.masks:
                    problems.append(
                        Problem(
                            str(path),
                            "id-without-files",
                            f"{shown(stem)} has no image in images/ and no mask in masks/",
                        )
                    )
            if not any(s in tree.images and s in tree.masks for s in ids):
                what = f"{len(ids)} stems listed, none with both an image and a mask" if ids else "lists no stems"
                problems.append(Problem(str(path), "empty-split", f"split {name!r} is empty: {what}"))
        if "train" in listed and "val" in listed:
            both = sorted(set(listed["train"]) & set(listed["val"]))
            if both:
                listed = ", ".join(shown(s) for s in both[:5]) + (f" and {len(both) - 5} more" if len(both) > 5 else "")
                problems.append(
                    Problem(
                        str(self.split_file("val")),
                        "split-overlap",
                        f"{len(both)} stem(s) also in train.txt: {listed}; expected disjoint splits",
                    )
                )
        return problems


def _either(words: tuple[str, ...]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _strip(message: str, path: str | Path) -> str:
    """An error's message without its leading ``<path>: `` (the problem line names the file itself)."""
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _mode(path: Path) -> str | None:
    """The file's PIL mode from its header; None when it cannot be opened (the real read then reports why)."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            return img.mode
    except Exception:
        return None
