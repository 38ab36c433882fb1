"""``fcnseg check-data``: read every item of a dataset split and report every problem, not just the first.

A dataset can add problems that no item shows (stray files, split files naming missing ids, empty splits) by
defining ``extra_problems() -> Iterable[Problem]``; :class:`~fcnseg.data.folder.FolderDataset` does. An error
raised while reading may carry a ``kind`` attribute to be filed under that kind (the folder dataset's
``MaskColorError`` is ``unknown-colour``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from ..errors import FcnsegError
from .base import IGNORE_INDEX, SegmentationDataset

__all__ = [
    "PROBLEM_KINDS",
    "CheckReport",
    "Problem",
    "check_dataset",
    "print_problems",
    "quick_problems",
    "run_check_data",
]

PROBLEM_KINDS: dict[str, str] = {
    "unreadable-image": "an image file that cannot be decoded",
    "unreadable-mask": "a mask file that cannot be decoded",
    "unreadable-item": "an item of a dataset without files whose load_pair failed",
    "image-without-mask": "an image with no mask",
    "mask-without-image": "a mask with no image",
    "id-without-files": "an id (in a split file) with neither an image nor a mask",
    "size-mismatch": "a mask whose size differs from its image's",
    "bad-mask-values": "mask values that are neither a class index nor 255 (void)",
    "unknown-colour": "an RGB mask colour that is no class colour and not the void colour",
    "empty-split": "a split with no usable item",
    "split-overlap": "ids in more than one split file",
    "duplicate-stem": "two files for one stem (e.g. a.jpg and a.png)",
    "unsupported-file": "a file with a suffix the dataset does not read",
    "unreadable-split-file": "a split file that cannot be read",
    "unsafe-split-id": "an id in a split file that is no bare name (a path, '..', NUL): it could name a file outside",
    "unreadable-annotations": "an annotation file (COCO or labelme JSON, CVAT labelmap) that cannot be read",
    "listed-image-missing": "an image an annotation file lists that is not on disk",
    "unknown-category": "an annotation whose category or label is not in the class list",
    "annotation-out-of-bounds": "an annotation (polygon, box, RLE) reaching outside its image",
    "degenerate-annotation": "a polygon or shape with too few points or no area",
}
"""Every kind of problem check-data reports, with what it means."""

WARNING_KINDS: dict[str, str] = {
    "binary-masks": "every mask holds only 0 and 1 (and void) while the class list has more than two classes",
    "void-as-class": "most masks hold only 0 and 255: 255 is void, so whatever it marks is never learnt",
    "colours-not-classes": "RGB masks whose colours are not the class list's colours",
    "class-missing-in-train": "classes with pixels in val but none in train: the model cannot learn them",
}
"""The known label-value traps check-data warns about: the data reads, but probably not as its author meant.
Warnings do not change the exit code."""


class Problem(NamedTuple):
    """One problem: the file it concerns, its kind (a key of :data:`PROBLEM_KINDS`) and what is wrong."""

    file: str
    kind: str
    message: str

    def line(self) -> str:
        # The kind goes last, in brackets, so the line reads as prose and still greps by kind.
        return f"{self.file}: {self.message} [{self.kind}]"


@dataclass
class CheckReport:
    """What :func:`check_dataset` found: item counts, pixels per class over the clean items, and problems."""

    title: str
    classes: tuple[str, ...]
    images: int = 0
    clean: int = 0
    class_pixels: list[int] = field(default_factory=list)
    void_pixels: int = 0
    problems: list[Problem] = field(default_factory=list)
    values: dict[int, int] = field(default_factory=dict)
    """Pixels per mask value over every mask that decoded, values outside the classes included."""
    zero_void_masks: int = 0
    """Masks that decoded holding only 0 and 255, 255 present."""
    masks_read: int = 0
    convention: str | None = None
    warnings: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total_pixels(self) -> int:
        return sum(self.class_pixels) + self.void_pixels

    def summary(self) -> str:
        """A table: pixels and share of all counted pixels per class, then void and the total."""
        total = self.total_pixels
        bad = self.images - self.clean
        head = f"{self.title}: {self.images} images, {self.clean} read cleanly"
        lines = [head + (f", {bad} with problems" if bad else "")]
        rows = [*zip(self.classes, self.class_pixels, strict=True), ("void", self.void_pixels)]
        width = max(len("class"), *(len(name) for name, _ in rows))
        lines.append(f"{'class':<{width}}  {'pixels':>14}  {'share':>7}")
        for name, n in rows:
            share = f"{100.0 * n / total:.2f}%" if total else "-"
            lines.append(f"{name:<{width}}  {n:>14,}  {share:>7}")
        lines.append(f"{'total':<{width}}  {total:>14,}")
        lines.append(f"label values: {_histogram(self.values)}")
        if self.convention:
            lines.append(f"labels: {self.convention}")
        lines.append(f"{len(self.problems)} problem(s)" if self.problems else "no problems")
        return "\n".join(lines)


def _histogram(values: dict[int, int]) -> str:
    """``0: 1,234 px, 1: 56 px, 255: 7 px``: every value seen, in order (the first 40, then a count)."""
    shown_values = [f"{v}: {n:,} px" for v, n in sorted(values.items())[:40]]
    more = f" and {len(values) - 40} more values" if len(values) > 40 else ""
    return ", ".join(shown_values) + more if values else "none read"


def _overrides(ds: SegmentationDataset, method: str) -> bool:
    return getattr(type(ds), method) is not getattr(SegmentationDataset, method)


def _strip(message: str, path: object) -> str:
    # Readers' errors start with the file name; the problem line names the file already.
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _read_problem(exc: Exception, path: object, kind: str) -> Problem:
    # Keep going on any decoder error: PIL, scipy's .mat reader and others raise many exception types on a
    # damaged file, and one bad file must not hide the rest. A kind on the exception (e.g. unknown-colour) wins.
    kind = getattr(exc, "kind", kind)
    text = " ".join(str(exc).split())
    if not isinstance(exc, FcnsegError):
        what = {"unreadable-image": "image", "unreadable-mask": "mask"}.get(kind, "item")
        text = f"cannot read {what} ({type(exc).__name__}{': ' + text if text else ''})"
    return Problem(str(path), kind, _strip(text, path))


class _Counts:
    def __init__(self, n: int) -> None:
        self.classes = [0] * n
        self.void = 0
        self.values: dict[int, int] = {}
        self.zero_void = 0
        self.masks = 0

    def add_values(self, values: np.ndarray, pixels: np.ndarray) -> None:
        for v, c in zip(values.tolist(), pixels.tolist(), strict=True):
            self.values[v] = self.values.get(v, 0) + c
        self.masks += 1
        self.zero_void += set(values.tolist()) == {0, IGNORE_INDEX}


def _check_values(mask: np.ndarray, mask_file: str, n: int, counts: _Counts) -> Problem | None:
    values, pixels = np.unique(np.asarray(mask), return_counts=True)
    counts.add_values(values, pixels)
    bad = [(int(v), int(c)) for v, c in zip(values, pixels, strict=True) if not (0 <= v < n or v == IGNORE_INDEX)]
    if bad:
        listed = ", ".join(f"{v} ({c} px)" for v, c in bad[:10])
        if len(bad) > 10:
            listed += f" and {len(bad) - 10} more"
        return Problem(
            mask_file,
            "bad-mask-values",
            f"values {listed} are neither a class index 0..{n - 1} nor {IGNORE_INDEX} (void)",
        )
    for v, c in zip(values.tolist(), pixels.tolist(), strict=True):
        if v == IGNORE_INDEX:
            counts.void += c
        else:
            counts.classes[v] += c
    return None


def _missing_file(img_path: Path, mask_path: Path) -> Problem | None:
    """The problem of an item whose image, mask or both do not exist; None when both do."""
    has_img, has_mask = img_path.exists(), mask_path.exists()
    if not has_img and not has_mask:
        return Problem(str(img_path), "id-without-files", f"neither this image nor its mask {mask_path} exists")
    if not has_mask:
        return Problem(str(img_path), "image-without-mask", f"its mask {mask_path} does not exist")
    if not has_img:
        return Problem(str(mask_path), "mask-without-image", f"its image {img_path} does not exist")
    return None


def _size_mismatch(mask_path: Path, img_path: Path, mask_wh: Sequence[int], img_wh: Sequence[int]) -> Problem:
    return Problem(
        str(mask_path),
        "size-mismatch",
        f"mask is {mask_wh[0]}x{mask_wh[1]} but its image {img_path.name} is {img_wh[0]}x{img_wh[1]}; expected "
        "the same size",
    )


def _check_files(ds: SegmentationDataset, i: int, counts: _Counts) -> list[Problem]:
    """Item ``i`` of a dataset with files: existence, each file's decoding, sizes, values."""
    img_path, mask_path = Path(ds.image_path(i)), Path(ds.mask_path(i))
    missing = _missing_file(img_path, mask_path)
    if missing:
        return [missing]
    problems = []
    image = mask = None
    try:
        image = ds.read_image(img_path)
    except Exception as e:
        problems.append(_read_problem(e, img_path, "unreadable-image"))
    try:
        mask = ds.read_mask(mask_path)
    except Exception as e:
        problems.append(_read_problem(e, mask_path, "unreadable-mask"))
    if image is None or mask is None:
        return problems
    if image.shape[:2] != mask.shape:
        return [_size_mismatch(mask_path, img_path, mask.shape[1::-1], image.shape[1::-1])]
    bad = _check_values(mask, str(mask_path), ds.num_classes, counts)
    return [bad] if bad else []


def _item_name(ds: SegmentationDataset, i: int) -> str:
    try:
        return str(ds.mask_path(i))
    except Exception:
        ids = getattr(ds, "ids", None)
        return f"{type(ds).__name__}[{ids[i] if ids is not None and i < len(ids) else i}]"


def _check_loaded(ds: SegmentationDataset, i: int, counts: _Counts) -> list[Problem]:
    """Item ``i`` through ``load_pair``: datasets without files, or with their own way of decoding them."""
    name = _item_name(ds, i)
    try:
        image, mask = ds.load_pair(i)
    except Exception as e:
        return [_read_problem(e, name, "unreadable-item")]
    if image.shape[:2] != mask.shape:
        return [
            Problem(
                name,
                "size-mismatch",
                f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}; "
                "expected the same size",
            )
        ]
    bad = _check_values(mask, name, ds.num_classes, counts)
    return [bad] if bad else []


def _opens(path: Path, oriented: bool) -> tuple[int, int] | None:
    """(width, height) of an image file PIL reads, decoded to the end so that a truncated file fails here (a JPEG
    at 1/8 scale: the whole stream is still read, at a fraction of the work); None for formats PIL does not read.
    ``oriented``: the size once the EXIF orientation is applied, as the image reader applies it."""
    from PIL import Image, UnidentifiedImageError

    from ..imageio import IMAGE_FORMATS

    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            size = im.size
            if oriented and im.getexif().get(0x0112) in (5, 6, 7, 8):  # a quarter turn: width and height swap
                size = size[::-1]
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except UnidentifiedImageError:
        return None
    return size


def _quick_item(ds: SegmentationDataset, i: int) -> Problem | None:
    img_path, mask_path = Path(ds.image_path(i)), Path(ds.mask_path(i))
    missing = _missing_file(img_path, mask_path)
    if missing:
        return missing
    sizes = []
    for path, kind in ((img_path, "unreadable-image"), (mask_path, "unreadable-mask")):
        try:
            size = _opens(path, oriented=kind == "unreadable-image")
            if size is None:  # e.g. SBD's .mat masks: the dataset's own reader
                read = ds.read_image if kind == "unreadable-image" else ds.read_mask
                size = tuple(read(path).shape[1::-1])
        except Exception as e:
            return _read_problem(e, path, kind)
        sizes.append(size)
    return _size_mismatch(mask_path, img_path, sizes[1], sizes[0]) if sizes[0] != sizes[1] else None


def quick_problems(dataset: SegmentationDataset) -> list[Problem]:
    """The cheap part of :func:`check_dataset`, run before training, over the dataset's items: each has its image
    and its mask, both decode, and the mask is its image's size (mask values are not counted). Files a dataset
    leaves out of its items (a folder set's image without a mask) are not its items, and are not checked here.
    Datasets without files (synthetic) and those with their own way of reading them (``load_pair``) are left to
    ``check-data``."""
    ds = dataset
    if not (_overrides(ds, "image_path") and _overrides(ds, "mask_path")) or _overrides(ds, "load_pair"):
        return []
    return [p for p in (_quick_item(ds, i) for i in range(len(ds))) if p is not None]


def check_dataset(dataset: SegmentationDataset, *, title: str | None = None, progress: bool = False) -> CheckReport:
    """Read every item of ``dataset`` and collect every problem; pixels are counted over the clean items."""
    ds = dataset
    report = CheckReport(
        title=title or f"{type(ds).__name__} split {getattr(ds, 'split', '?')!r}",
        classes=tuple(ds.classes),
        images=len(ds),
    )
    extra = getattr(ds, "extra_problems", None)
    if callable(extra):
        report.problems.extend(Problem(*p) for p in extra())
    if len(ds) == 0:
        where = getattr(ds, "root", None) or f"--split {getattr(ds, 'split', '?')}"
        report.problems.append(Problem(str(where), "empty-split", f"split {getattr(ds, 'split', '?')!r} is empty"))
    # Paths are only read directly when load_pair is the base class's, so a dataset's own decoding is honoured.
    by_files = _overrides(ds, "image_path") and _overrides(ds, "mask_path") and not _overrides(ds, "load_pair")
    counts = _Counts(ds.num_classes)
    for i in tqdm(range(len(ds)), desc="check-data", unit="img", disable=not progress, file=sys.stderr):
        found = _check_files(ds, i, counts) if by_files else _check_loaded(ds, i, counts)
        report.problems.extend(found)
        report.clean += not found
    report.class_pixels, report.void_pixels = counts.classes, counts.void
    report.values, report.zero_void_masks, report.masks_read = counts.values, counts.zero_void, counts.masks
    report.convention = ds.label_convention
    report.warnings = label_warnings(report, str(getattr(ds, "root", None) or report.title))
    return report


def label_warnings(report: CheckReport, where: str) -> list[Problem]:
    """The label-value traps one split shows (:data:`WARNING_KINDS`), one line each."""
    found = []
    n, seen = len(report.classes), set(report.values) - {IGNORE_INDEX}
    if n > 2 and 1 in seen and seen <= {0, 1}:
        found.append(Problem(where, "binary-masks", (
            f"every mask holds only 0 and 1 but there are {n} classes ({', '.join(report.classes[:4])}"
            f"{', ...' if n > 4 else ''}); expected values 0..{n - 1}: were the masks saved as binary?")))  # fmt: skip
    if report.masks_read and report.zero_void_masks * 2 > report.masks_read:
        found.append(Problem(where, "void-as-class", (
            f"{report.zero_void_masks} of {report.masks_read} masks hold only 0 and {IGNORE_INDEX}; {IGNORE_INDEX} "
            f"is void and never learnt: if it marks a class, save that class as its index (1..{n - 1})")))  # fmt: skip
    colours = [p for p in report.problems if p.kind == "unknown-colour"]
    if len(colours) > 1:  # one file is its own problem line; several point at the class list's colours
        found.append(Problem(where, "colours-not-classes", (
            f"{len(colours)} RGB mask(s) hold colours that are no class's colour (first: {colours[0].file}); "
            "expected each class's colour as the class list gives it, in its order")))  # fmt: skip
    return found


def split_warnings(reports: dict[str, CheckReport], where: str) -> list[Problem]:
    """Traps seen across splits: classes with val pixels but no train pixels."""
    train, val = reports.get("train"), reports.get("val")
    if train is None or val is None or len(train.class_pixels) != len(val.class_pixels):
        return []
    missing = [name for name, t, v in zip(train.classes, train.class_pixels, val.class_pixels, strict=True)
               if v and not t]  # fmt: skip
    if not missing:
        return []
    return [Problem(where, "class-missing-in-train", (
        f"class(es) {', '.join(missing)} have pixels in val but none in train; the model cannot learn them: "
        "expected every class in train"))]  # fmt: skip


def print_problems(problems: Iterable[Problem], file: Any = None) -> None:
    """Each problem as one ``<file>: <what is wrong> [<kind>]`` line (on stdout unless ``file`` is given)."""
    for p in problems:
        print(p.line(), file=file or sys.stdout)


def run_check_data(
    name: str,
    root: str | None,
    split: str | None = None,
    *,
    quiet: bool = False,
    download: bool = False,
    options: dict[str, Any] | None = None,
) -> int:
    """The ``check-data`` command: every split of the dataset (or only ``split``), each split's summary followed by
    its problem lines on stdout; 0 when all is clean, else a one-line count on stderr and 2.

    A split that cannot be opened (its list missing, say) is one problem and the other splits are still read; a
    problem of the whole tree that several splits see is listed once. ``options``: extra dataset arguments
    (``--data-option modality=rgbd`` reads NYUDv2's depth files too).
    """
    from .base import SplitError, check_data_options, dataset_splits, get_dataset

    options = {**(options or {}), **({"download": True} if download else {})}
    check_data_options(options)
    splits = (split,) if split else dataset_splits(name, root)
    seen: set[tuple[str, str]] = set()  # (file, kind): a problem of the whole tree that every split sees, once
    reports: dict[str, CheckReport] = {}
    for one in splits:
        try:
            ds = get_dataset(name, root=root, split=one, **options)
        except SplitError as e:
            if split:  # the one split asked for: the usual one-line error
                raise
            problems = [Problem(e.file, e.kind, e.detail)]
        else:
            reports[one] = report = check_dataset(ds, title=f"{name} split {one!r}", progress=not quiet)
            report.problems = problems = [p for p in report.problems if (p.file, p.kind) not in seen]
            if not quiet:
                print(report.summary())
        print_problems(p for p in problems if (p.file, p.kind) not in seen)
        seen.update((p.file, p.kind) for p in problems)
        print_problems(reports[one].warnings if one in reports else ())
    print_problems(split_warnings(reports, str(root or name)))
    if seen:
        print(f"fcnseg: error: {len(seen)} problem(s) in {name} split(s) {', '.join(splits)}", file=sys.stderr)
        return 2
    return 0
