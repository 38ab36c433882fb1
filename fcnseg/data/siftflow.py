"""SIFT Flow (Liu et al.; Tighe and Lazebnik's splits): 256x256 outdoor scenes with semantic and geometric labels.

Layout (the folder FCN's ``siftflow_layers.py`` calls ``siftflow_dir``; SUB is
``spatial_envelope_256x256_static_8outdoorcategories``)::

    ROOT/Images/SUB/<id>.jpg            RGB, 256x256, ids like ``coast_natu975``
    ROOT/SemanticLabels/SUB/<id>.mat    key ``S``: 0 = void, 1..33 = classes
    ROOT/GeoLabels/SUB/<id>.mat         key ``S``: -1 = void, 1 sky, 2 horizontal, 3 vertical
    ROOT/train.txt, ROOT/test.txt       ids, one a line: 2,488 training (2,486 annotated) and 200 test images

FCN's repository ships the lists as ``data/sift-flow/trainval.txt`` and ``test.txt`` (copy them into ROOT):
``trainval.txt`` is read when ``train.txt`` is absent, and ``trainval`` is accepted as another name of the
``train`` split (SIFT Flow has no validation split).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .._meta import SIFTFLOW_ABSENT_IN_TEST, SIFTFLOW_CLASSES, SIFTFLOW_GEO_CLASSES, SIFTFLOW_MEAN_BGR
from ..errors import FcnsegError, shown
from ..imageio import IMAGE_FORMATS
from ..palette import palette_for
from .base import IGNORE_INDEX, SegmentationDataset, SplitError, check_split, read_split_file, register_dataset
from .check import Problem
from .nyud import read_mat_labels, split_overlap_problems

if TYPE_CHECKING:
    from torchvision import tv_tensors

__all__ = [
    "SIFTFLOW_ABSENT_IN_TEST",
    "SIFTFLOW_CLASSES",
    "SIFTFLOW_FOLDER",
    "SIFTFLOW_GEO_CLASSES",
    "SIFTFLOW_MEAN_BGR",
    "SIFTFLOW_SPLITS",
    "SIFTFLOW_TARGETS",
    "SIFTFlowSegmentation",
    "read_geo_labels",
    "read_semantic_labels",
    "read_siftflow_split",
]

SIFTFLOW_FOLDER = "spatial_envelope_256x256_static_8outdoorcategories"
SIFTFLOW_SPLITS: tuple[str, ...] = ("train", "trainval", "test")
SIFTFLOW_TARGETS: tuple[str, ...] = ("semantic", "geometric", "both")

# Split name -> the files that may hold its list, in order of preference.
_SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.txt", "trainval.txt"),
    "trainval": ("trainval.txt", "train.txt"),
    "test": ("test.txt",),
}
_EXPECTED = {
    "semantic": f"expected a SIFT Flow SemanticLabels/{SIFTFLOW_FOLDER}/<id>.mat file with key 'S' "
    "(0 = void, 1..33 = classes)",
    "geometric": f"expected a SIFT Flow GeoLabels/{SIFTFLOW_FOLDER}/<id>.mat file with key 'S' "
    "(-1 = void, 1 sky, 2 horizontal, 3 vertical)",
}
_LABEL_DIRS = {"semantic": "SemanticLabels", "geometric": "GeoLabels"}


def read_semantic_labels(path: str | Path) -> np.ndarray:
    """``S`` of a SemanticLabels ``.mat`` as uint8 H x W: 0 (void) -> 255, class k in 1..33 -> k - 1."""
    return read_mat_labels(path, "S", void=(0,), expected=_EXPECTED["semantic"])


def read_geo_labels(path: str | Path) -> np.ndarray:
    """``S`` of a GeoLabels ``.mat`` as uint8 H x W: -1 (void) -> 255, 1 sky / 2 horizontal / 3 vertical -> 0 / 1 / 2.

    0 is void as well, as in FCN's reader (which turns -1 into 0 before subtracting 1).
    """
    return read_mat_labels(path, "S", void=(-1, 0), expected=_EXPECTED["geometric"])


def read_siftflow_split(root: Path, split: str) -> list[str]:
    """Ids of the split's list (``train``: ``train.txt``, else ``trainval.txt``; ``test``: ``test.txt``)."""
    names = _SPLIT_FILES[split]
    found = next((root / n for n in names if (root / n).is_file()), None)
    if found is None:
        other = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
        raise SplitError(
            root / names[0],
            "unreadable-split-file",
            f"split file not found; expected {names[0]}{other} in the SIFT Flow folder, one id (e.g. coast_natu975) "
            "a line, as in FCN's data/sift-flow/",
        )
    ids = read_split_file(found)
    if not ids:
        raise SplitError(
            found, "empty-split", "split file lists no ids; expected one image id (e.g. coast_natu975) a line"
        )
    return ids


def _resolve_root(root: str | Path | None) -> Path:
    expected = "expected the SIFT Flow folder holding Images, SemanticLabels, GeoLabels, train.txt and test.txt"
    if root is None:
        raise FcnsegError(f"--root: no dataset folder given; {expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FcnsegError(f"{path}: folder not found; {expected}")
    return path


@register_dataset("siftflow")
class SIFTFlowSegmentation(SegmentationDataset):
    """SIFT Flow: 256x256 RGB images (uint8 ``tv_tensors.Image``) with semantic and/or geometric masks.

    ``target`` picks the mask (int64 ``tv_tensors.Mask``, 255 = void): ``"semantic"`` (H x W, 33 classes),
    ``"geometric"`` (H x W, 3 classes) or ``"both"`` (2 x H x W: semantic, then geometric, so that one geometric
    transform moves both). ``classes`` are the semantic classes, except with ``target="geometric"`` where they
    are :attr:`geo_classes`; :meth:`load_pair` always returns the H x W mask of ``classes``.
    :attr:`absent_in_test` (cow, desert, moon) never occur in the test set and are left out of the paper's test
    metrics. The paper's two-headed FCN-16s: 85.2 pixel acc, 51.7 mean acc, 39.5 mean IU, 76.1 f.w. IU,
    94.3 geometric pixel accuracy (2,688 images: 2,488 train, 200 test).
    """

    disjoint_splits = ("train", "test")  # trainval is another name of train

    absent_in_test: tuple[str, ...] = SIFTFLOW_ABSENT_IN_TEST
    geo_classes: tuple[str, ...] = SIFTFLOW_GEO_CLASSES

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        target: str = "semantic",
    ) -> None:
        super().__init__(transforms)
        check_split(split, SIFTFLOW_SPLITS, "siftflow")
        if target not in SIFTFLOW_TARGETS:
            raise FcnsegError(f"target {shown(target)}: expected one of {', '.join(SIFTFLOW_TARGETS)}")
        self.split = split
        self.target = target
        self.root = _resolve_root(root)
        self.ids = read_siftflow_split(self.root, split)
        needed = {"Images": "<id>.jpg images"}
        for kind in ("semantic", "geometric"):
            if target in (kind, "both"):
                needed[_LABEL_DIRS[kind]] = f"<id>.mat {kind} labels"
        for top, what in needed.items():
            folder = self.root / top / SIFTFLOW_FOLDER
            if not folder.is_dir():
                raise FcnsegError(f"{folder}: folder not found; expected SIFT Flow's {what} there")
        self.classes = SIFTFLOW_GEO_CLASSES if target == "geometric" else SIFTFLOW_CLASSES
        self.palette = palette_for(self.classes, len(self.classes))
        self.geo_palette = palette_for(SIFTFLOW_GEO_CLASSES, len(SIFTFLOW_GEO_CLASSES))

    @property
    def head_classes(self) -> dict[str, tuple[str, ...]]:
        """Class names per label set this dataset returns: both sets with ``target="both"``, else one."""
        if self.target == "both":
            return {"semantic": SIFTFLOW_CLASSES, "geometric": SIFTFLOW_GEO_CLASSES}
        return {self._mask_kind: self.classes}

    @property
    def excluded_classes(self) -> dict[str, tuple[str, ...]]:
        """Classes left out of the mean accuracy and mean IU, per label set: on the test split the semantic
        classes that never occur there (cow, desert, moon), as the paper does; nothing elsewhere."""
        if self.split != "test" or self.target == "geometric":
            return {}
        return {"semantic": SIFTFLOW_ABSENT_IN_TEST}

    @property
    def _mask_kind(self) -> str:
        return "geometric" if self.target == "geometric" else "semantic"

    def label_path(self, index: int, kind: str) -> Path:
        """The ``.mat`` of item ``index``'s ``kind`` (``"semantic"`` or ``"geometric"``) labels."""
        return self.root / _LABEL_DIRS[kind] / SIFTFLOW_FOLDER / f"{self.ids[index]}.mat"

    def image_path(self, index: int) -> Path:
        return self.root / "Images" / SIFTFLOW_FOLDER / f"{self.ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.label_path(index, self._mask_kind)

    def read_mask(self, path: Path) -> np.ndarray:
        return read_geo_labels(path) if self._mask_kind == "geometric" else read_semantic_labels(path)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        from torchvision import tv_tensors

        if self.target != "both":
            return super().__getitem__(index)
        image, semantic = self.load_pair(index)
        geo_path = self.label_path(index, "geometric")
        geo = read_geo_labels(geo_path)
        if geo.shape != semantic.shape:
            raise FcnsegError(
                f"{geo_path}: geometric labels are {geo.shape[1]}x{geo.shape[0]} but the semantic labels "
                f"{self.mask_path(index).name} are {semantic.shape[1]}x{semantic.shape[0]}; expected the same size"
            )
        img_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(np.stack([semantic, geo])).to(torch.int64))
        if self.transforms is not None:
            img_t, mask_t = self.transforms(img_t, mask_t)
        return img_t, mask_t

    def extra_problems(self) -> list[Problem]:
        """For check-data: ids in both the training and the test list, and the label set that ``mask_path`` does
        not cover (geometric, or semantic with ``target="geometric"``): missing, unreadable, of another size than
        the image, or holding values that are no class."""
        train = next((self.root / n for n in _SPLIT_FILES["train"] if (self.root / n).is_file()), None)
        problems = split_overlap_problems({"train": train, "test": self.root / "test.txt"} if train else {})
        kind = "semantic" if self.target == "geometric" else "geometric"
        folder = self.root / _LABEL_DIRS[kind] / SIFTFLOW_FOLDER
        if not folder.is_dir():
            problems.append(Problem(str(folder), "unreadable-mask", f"folder not found; {_EXPECTED[kind]}"))
            return problems
        for i in range(len(self.ids)):
            problem = self._other_labels_problem(i, kind)
            if problem is not None:
                problems.append(problem)
        return problems

    def _other_labels_problem(self, index: int, kind: str) -> Problem | None:
        """What is wrong with item ``index``'s ``kind`` labels (the set ``mask_path`` does not cover), if anything."""
        n = len(SIFTFLOW_CLASSES if kind == "semantic" else SIFTFLOW_GEO_CLASSES)
        path, img_path = self.label_path(index, kind), self.image_path(index)
        if not img_path.exists():
            return None  # check-data reports the item itself
        if not path.exists():
            return Problem(str(img_path), "image-without-mask", f"its {kind} labels {path} do not exist")
        try:
            labels = read_semantic_labels(path) if kind == "semantic" else read_geo_labels(path)
        except FcnsegError as e:
            return Problem(str(path), "unreadable-mask", str(e).removeprefix(f"{path}: "))
        try:
            with Image.open(img_path, formats=IMAGE_FORMATS) as im:
                w, h = im.size
        except Exception:
            return None  # an unreadable image is reported with the item
        if labels.shape != (h, w):
            return Problem(
                str(path),
                "size-mismatch",
                f"{kind} labels are {labels.shape[1]}x{labels.shape[0]} but the image {img_path.name} is {w}x{h}; "
                "expected the same size",
            )
        bad = np.unique(labels[(labels >= n) & (labels != IGNORE_INDEX)])
        if not bad.size:
            return None
        listed = ", ".join(str(int(v)) for v in bad[:10])
        return Problem(
            str(path),
            "bad-mask-values",
            f"{kind} values {listed} are neither a class index 0..{n - 1} nor {IGNORE_INDEX} (void)",
        )

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, target={self.target!r})"
