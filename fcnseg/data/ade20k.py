"""ADE20K's scene parsing benchmark (ADEChallengeData2016; Zhou et al., 2017): 150 classes of indoor and outdoor scenes.

Layout (the benchmark's README, github.com/CSAILVision/sceneparsing; the archive unpacks to ADEChallengeData2016)::

    ROOT/ADEChallengeData2016/images/training/ADE_train_<n>.jpg        20,210 images
    ROOT/ADEChallengeData2016/annotations/training/ADE_train_<n>.png   greyscale labels 0..150
    ROOT/ADEChallengeData2016/images/validation/ADE_val_<n>.jpg        2,000 images (annotations/validation alike)

ROOT may also be ADEChallengeData2016 itself. Splits: ``train`` (training) and ``val`` (validation); the test
images come without annotations. Annotation 0 is "other objects", which the benchmark's evaluation leaves out:
it becomes void (255), and 1..150 become class indices 0..149 (other toolkits call this ``reduce_zero_label``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import FcnsegError
from ..imageio import read_mask_png
from .base import IGNORE_INDEX, SegmentationDataset, SplitError, check_split, register_dataset
from .check import Problem

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_COLORS",
    "ADE20K_FOLDER",
    "ADE20K_SPLITS",
    "ADE20KLabelError",
    "ADE20KSegmentation",
    "annotation_to_classes",
    "find_ade20k_dir",
]

ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_SPLITS: dict[str, str] = {"train": "training", "val": "validation"}
"""fcnseg's split name -> the benchmark's folder name under images/ and annotations/."""

# The first name of each row of the benchmark's objectInfo150.txt (rows 1..150 = annotation values 1..150).
# fmt: off
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on

# The benchmark's own visualisation colours (visualizationCode/color150.mat), one per class in the same order.
# Road and skyscraper share (140, 140, 140) there; kept as published, so that pictures match the benchmark's.
# fmt: off
ADE20K_COLORS: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10),
    (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255),
    (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0),
    (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122),
    (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
    (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194),
    (102, 255, 0), (92, 0, 255),
)
# fmt: on

_MAX_VALUE = len(ADE20K_CLASSES)  # the annotations hold 0..150
# Annotation value -> class index: 0 ("other objects") is void, v -> v - 1; 151..255 are refused before lookup.
_TABLE = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_TABLE[1 : _MAX_VALUE + 1] = np.arange(_MAX_VALUE, dtype=np.uint8)
_EXPECTED = "expected an ADEChallengeData2016 annotation PNG of values 0..150 (0 = other objects)"
_LAYOUT = (
    f"expected the folder holding {ADE20K_FOLDER}/images/{{training,validation}} and "
    f"{ADE20K_FOLDER}/annotations/{{training,validation}}, or {ADE20K_FOLDER} itself"
)


class ADE20KLabelError(FcnsegError):
    """An annotation holding values above 150: not a file of the benchmark."""

    kind = "bad-mask-values"  # how check-data files this problem (see fcnseg.data.check)


def annotation_to_classes(values: np.ndarray, path: str | Path = "annotation") -> np.ndarray:
    """Benchmark annotation values (uint8 H x W, 0..150) -> class indices: 0 -> 255 (void), v -> v - 1.

    A value above 150 raises :class:`ADE20KLabelError` rather than becoming void: such a file is not one of the
    benchmark's (another index set, or a colour-coded ADE20K full-dataset ``_seg.png``), and reading it as void
    would train on labels that mean something else.
    """
    values = np.asarray(values, dtype=np.uint8)
    if values.size and int(values.max()) > _MAX_VALUE:
        odd, counts = np.unique(values[values > _MAX_VALUE], return_counts=True)
        listed = ", ".join(f"{v} ({c} px)" for v, c in zip(odd[:10].tolist(), counts[:10].tolist(), strict=True))
        more = f" and {len(odd) - 10} more" if len(odd) > 10 else ""
        raise ADE20KLabelError(f"{path}: values {listed}{more} are above 150; {_EXPECTED}")
    return _TABLE[values]


def find_ade20k_dir(root: str | Path | None) -> Path:
    """The ADEChallengeData2016 folder that ``root`` designates (its parent or itself); else an FcnsegError."""
    if root is None:
        raise FcnsegError(f"--root: no dataset folder given; {_LAYOUT}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FcnsegError(f"{path}: folder not found; {_LAYOUT}")
    for candidate in (path / ADE20K_FOLDER, path):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise FcnsegError(f"{path}: no {ADE20K_FOLDER}/images and annotations folders in it; {_LAYOUT}")


@register_dataset("ade20k")
class ADE20KSegmentation(SegmentationDataset):
    """ADE20K scene parsing: ``images/<split>/ADE_*.jpg`` with ``annotations/<split>/ADE_*.png``, 150 classes.

    Every image of the split's folder is an item (sorted by name); one without its annotation is reported by
    ``check-data``. Annotation 0 is void and 1..150 are classes 0..149 (:attr:`label_convention`).
    """

    label_convention: ClassVar[str] = (
        "ade20k: annotation 0 ('other objects') is void; 1..150 are classes 0..149 (the benchmark's evaluation "
        "ignores 0: reduce_zero_label)"
    )
    """How the annotation values became class indices, in one line (check-data prints it)."""

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(transforms)
        check_split(split, tuple(ADE20K_SPLITS), "ade20k")
        self.split = split
        self.root = find_ade20k_dir(root)
        self.folder = ADE20K_SPLITS[split]
        self.classes = ADE20K_CLASSES
        self.palette = np.array(ADE20K_COLORS, dtype=np.uint8)
        images = self.root / "images" / self.folder
        if not images.is_dir():
            raise SplitError(images, "empty-split", f"folder not found; expected the {split} images ADE_*.jpg there")
        if not (self.root / "annotations" / self.folder).is_dir():
            raise SplitError(
                self.root / "annotations" / self.folder,
                "empty-split",
                f"folder not found; expected the {split} annotations ADE_*.png there",
            )
        self.ids = sorted(p.stem for p in images.glob("*.jpg") if p.is_file())
        if not self.ids:
            raise SplitError(images, "empty-split", f"split {split!r} is empty; expected ADE_*.jpg images there")

    def image_path(self, index: int) -> Path:
        return self.root / "images" / self.folder / f"{self.ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.root / "annotations" / self.folder / f"{self.ids[index]}.png"

    def read_mask(self, path: Path) -> np.ndarray:
        """Class indices (255 = void) of one annotation PNG; values above 150 are an :class:`ADE20KLabelError`."""
        return annotation_to_classes(read_mask_png(path), path)

    def label_mapping(self) -> dict[str, Any]:
        return {"format": "ade20k", "reduce_zero_label": True}

    def extra_problems(self) -> list[Problem]:
        """Annotations of this split without their image (images without annotations are items: the base check
        reports those)."""
        have = set(self.ids)
        folder = self.root / "annotations" / self.folder
        return [
            Problem(str(p), "mask-without-image", f"its image images/{self.folder}/{p.stem}.jpg does not exist")
            for p in sorted(folder.glob("*.png"))
            if p.stem not in have
        ]
