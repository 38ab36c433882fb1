"""Cityscapes (Cordts et al., 2016): street scenes from 50 cities, 19 evaluated classes, read as the archives unpack.

Layout (cityscapesScripts' README: ``{root}/{type}/{split}/{city}/{city}_{seq:0>6}_{frame:0>6}_{type}{ext}``)::

    ROOT/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png      RGB images
    ROOT/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png       fine labels (mode=fine)
    ROOT/gtCoarse/<split>/<city>/<city>_<seq>_<frame>_gtCoarse_labelIds.png   coarse labels (mode=coarse)

Splits: ``train``, ``val`` and ``test`` with ``mode="fine"`` (the test labels only mark the ego vehicle and the
rectification border, so every test pixel is void); ``train``, ``val`` and ``train_extra`` with ``mode="coarse"``.
The ``*_labelIds.png`` files hold the label ids 0..33 of cityscapesScripts' ``helpers/labels.py``: the 19 ids
evaluated by the benchmark become class indices 0..18 (their train ids), the other 15 become void (255).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import FcnsegError, shown
from ..imageio import read_mask_png
from .base import IGNORE_INDEX, SegmentationDataset, SplitError, check_split, register_dataset
from .check import Problem

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_COLORS",
    "CITYSCAPES_LABELS",
    "CITYSCAPES_MODES",
    "CITYSCAPES_TRAIN_IDS",
    "MAX_LABEL_ID",
    "CityscapesLabelError",
    "CityscapesSegmentation",
    "label_ids_to_classes",
]

# (label id, train id, name, colour) of the 19 classes that cityscapesScripts' labels.py gives a train id other
# than 255, in train-id order. Every other id of 0..33 (unlabeled, ego vehicle, rectification border, out of roi,
# static, dynamic, ground, parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) is void;
# license plate's id is -1, which labels.py never draws into a labelIds image.
CITYSCAPES_LABELS: tuple[tuple[int, int, str, tuple[int, int, int]], ...] = (
    (7, 0, "road", (128, 64, 128)),
    (8, 1, "sidewalk", (244, 35, 232)),
    (11, 2, "building", (70, 70, 70)),
    (12, 3, "wall", (102, 102, 156)),
    (13, 4, "fence", (190, 153, 153)),
    (17, 5, "pole", (153, 153, 153)),
    (19, 6, "traffic light", (250, 170, 30)),
    (20, 7, "traffic sign", (220, 220, 0)),
    (21, 8, "vegetation", (107, 142, 35)),
    (22, 9, "terrain", (152, 251, 152)),
    (23, 10, "sky", (70, 130, 180)),
    (24, 11, "person", (220, 20, 60)),
    (25, 12, "rider", (255, 0, 0)),
    (26, 13, "car", (0, 0, 142)),
    (27, 14, "truck", (0, 0, 70)),
    (28, 15, "bus", (0, 60, 100)),
    (31, 16, "train", (0, 80, 100)),
    (32, 17, "motorcycle", (0, 0, 230)),
    (33, 18, "bicycle", (119, 11, 32)),
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for _, _, name, _ in CITYSCAPES_LABELS)
CITYSCAPES_COLORS: tuple[tuple[int, int, int], ...] = tuple(color for _, _, _, color in CITYSCAPES_LABELS)
CITYSCAPES_TRAIN_IDS: dict[int, int] = {label_id: train_id for label_id, train_id, _, _ in CITYSCAPES_LABELS}
"""Label id -> class index (train id) of the 19 evaluated classes; any other label id 0..33 is void."""
MAX_LABEL_ID = 33
"""The largest label id of labels.py (bicycle); a labelIds image holds nothing above it."""

CITYSCAPES_MODES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fine": ("gtFine", ("train", "val", "test")),
    "coarse": ("gtCoarse", ("train", "val", "train_extra")),
}
"""``mode`` -> (annotation folder, its splits), as cityscapesScripts' README lists them."""

# One lookup per pixel through a 256-entry table: label id -> train id, 255 elsewhere (ids above 33 are refused
# before the lookup, see label_ids_to_classes).
_TABLE = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_TABLE[list(CITYSCAPES_TRAIN_IDS)] = list(CITYSCAPES_TRAIN_IDS.values())
_LAYOUT = (
    "expected the Cityscapes folder holding leftImg8bit/<split>/<city>/ and gtFine/ (or gtCoarse/), as the "
    "leftImg8bit and gtFine archives unpack"
)


class CityscapesLabelError(FcnsegError):
    """A labelIds image holding values above 33: no label id of cityscapesScripts' labels.py."""

    kind = "bad-mask-values"  # how check-data files this problem (see fcnseg.data.check)


def label_ids_to_classes(label_ids: np.ndarray, path: str | Path = "labelIds image") -> np.ndarray:
    """Cityscapes label ids (uint8 H x W) -> class indices: the 19 evaluated ids -> 0..18, other ids -> 255.

    A value above 33 raises :class:`CityscapesLabelError` rather than becoming void: such a file is no labelIds
    image (a ``_labelTrainIds.png``, whose 255 would pass silently, or an instance or colour image), and reading
    it as one would train on wrong labels.
    """
    label_ids = np.asarray(label_ids, dtype=np.uint8)
    if label_ids.size and int(label_ids.max()) > MAX_LABEL_ID:
        odd, counts = np.unique(label_ids[label_ids > MAX_LABEL_ID], return_counts=True)
        listed = ", ".join(f"{v} ({c} px)" for v, c in zip(odd[:10].tolist(), counts[:10].tolist(), strict=True))
        more = f" and {len(odd) - 10} more" if len(odd) > 10 else ""
        raise CityscapesLabelError(
            f"{path}: values {listed}{more} are no Cityscapes label id 0..{MAX_LABEL_ID}; expected a *_labelIds.png "
            "as cityscapesScripts writes it"
        )
    return _TABLE[label_ids]


def _resolve_root(root: str | Path | None) -> Path:
    if root is None:
        raise FcnsegError(f"--root: no dataset folder given; {_LAYOUT}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FcnsegError(f"{path}: folder not found; {_LAYOUT}")
    if not (path / "leftImg8bit").is_dir():
        raise FcnsegError(f"{path}: no leftImg8bit folder in it; {_LAYOUT}")
    return path


def _scan_images(folder: Path) -> list[tuple[str, str]]:
    """(city, ``<city>_<seq>_<frame>``) of every ``*_leftImg8bit.png`` in the city folders of ``folder``, sorted."""
    suffix = "_leftImg8bit.png"
    found = []
    for city in sorted(p for p in folder.iterdir() if p.is_dir()):
        found.extend((city.name, f.name[: -len(suffix)]) for f in sorted(city.glob(f"*{suffix}")) if f.is_file())
    return found


@register_dataset("cityscapes")
class CityscapesSegmentation(SegmentationDataset):
    """Cityscapes: ``leftImg8bit`` images with ``gtFine`` (``mode="fine"``) or ``gtCoarse`` (``mode="coarse"``)
    ``*_labelIds.png`` labels, mapped to the 19 evaluated classes (:data:`CITYSCAPES_TRAIN_IDS`).

    Every image of the split's city folders is an item (sorted by city, then name); one without its label file
    is reported by ``check-data``. ``ids`` are the ``<city>_<seq>_<frame>`` names.
    """

    label_convention: ClassVar[str] = (
        "cityscapes: labelIds 0..33 of cityscapesScripts' labels.py; the 19 evaluated ids are classes 0..18 (their "
        "train ids), the other 15 are void"
    )
    """How the label ids became class indices, in one line (check-data prints it)."""

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        mode: str = "fine",
    ) -> None:
        super().__init__(transforms)
        if mode not in CITYSCAPES_MODES:
            raise FcnsegError(f"mode {shown(mode)}: expected one of {', '.join(CITYSCAPES_MODES)}")
        self.gt, splits = CITYSCAPES_MODES[mode]
        check_split(split, splits, f"cityscapes (mode={mode})")
        self.mode, self.split = mode, split
        self.root = _resolve_root(root)
        self.classes = CITYSCAPES_CLASSES
        self.palette = np.array(CITYSCAPES_COLORS, dtype=np.uint8)
        images, labels = self.root / "leftImg8bit" / split, self.root / self.gt / split
        if not images.is_dir():
            raise SplitError(images, "empty-split", f"folder not found; expected the {split} images in <city>/ there")
        if not labels.is_dir():
            raise SplitError(
                labels, "empty-split", f"folder not found; expected the {split} <city>/*_{self.gt}_labelIds.png there"
            )
        self._items = _scan_images(images)
        self.ids = [base for _, base in self._items]
        if not self.ids:
            raise SplitError(images, "empty-split", f"split {split!r} is empty; expected <city>/*_leftImg8bit.png")

    def image_path(self, index: int) -> Path:
        city, base = self._items[index]
        return self.root / "leftImg8bit" / self.split / city / f"{base}_leftImg8bit.png"

    def mask_path(self, index: int) -> Path:
        city, base = self._items[index]
        return self.root / self.gt / self.split / city / f"{base}_{self.gt}_labelIds.png"

    def read_mask(self, path: Path) -> np.ndarray:
        """Class indices (255 = void) of one labelIds PNG; values above 33 are a :class:`CityscapesLabelError`."""
        return label_ids_to_classes(read_mask_png(path), path)

    def label_mapping(self) -> dict[str, Any]:
        return {"format": "cityscapes", "train_ids": dict(CITYSCAPES_TRAIN_IDS)}

    def extra_problems(self) -> list[Problem]:
        """Label files of this split without their image (images without labels are items: the base check
        reports those)."""
        suffix = f"_{self.gt}_labelIds.png"
        have = set(self._items)
        problems = []
        for city in sorted(p for p in (self.root / self.gt / self.split).iterdir() if p.is_dir()):
            for f in sorted(city.glob(f"*{suffix}")):
                base = f.name[: -len(suffix)]
                if (city.name, base) not in have:
                    image = f"leftImg8bit/{self.split}/{city.name}/{base}_leftImg8bit.png"
                    problems.append(Problem(str(f), "mask-without-image", f"its image {image} does not exist"))
        return problems
