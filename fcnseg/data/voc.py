"""PASCAL VOC segmentation (VOC2007 .. VOC2012), read from the devkit tree as the VOC tar files unpack it."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._meta import VOC_CLASSES
from ..errors import FcnsegError, shown
from ..imageio import read_mask_png
from ..palette import voc_palette
from .base import SegmentationDataset, SplitError, check_split, read_split_file, register_dataset

__all__ = [
    "VOC_SPLITS",
    "VOC_YEARS",
    "VOCSegmentation",
    "check_year",
    "find_voc_dir",
    "read_voc_split",
    "resolve_voc_dir",
]

VOC_YEARS: tuple[str, ...] = ("2007", "2008", "2009", "2010", "2011", "2012")
VOC_SPLITS: tuple[str, ...] = ("train", "val", "trainval")
_DOWNLOAD_HINT = "; pass --download to fetch it"


def check_year(year: str | int) -> str:
    """The year as the devkit spells it (``"2012"``); anything outside 2007..2012 is a user error."""
    text = str(year).strip()
    if text not in VOC_YEARS:
        raise FcnsegError(f"--year {shown(year)}: expected a PASCAL VOC year from 2007 to 2012")
    return text


def find_voc_dir(root: Path, year: str) -> Path | None:
    """The ``VOC<year>`` folder that ``root`` designates, or None when there is none.

    ``root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself or ``VOC<year>`` itself. The 2011
    archive unpacks to ``TrainVal/VOCdevkit/VOC2011`` (that is where torchvision's downloader leaves it), so that
    nesting is accepted too.
    """
    name = f"VOC{year}"
    if root.name == name and root.is_dir():
        return root
    for candidate in (root / "VOCdevkit" / name, root / name, root / "TrainVal" / "VOCdevkit" / name):
        if candidate.is_dir():
            return candidate
    # A year folder the user renamed still has the devkit's layout; but a VOC<other year> folder is a mistake the
    # caller reports, not a tree to read as this year.
    if re.fullmatch(r"VOC\d{4}", root.name) is None and (root / "ImageSets" / "Segmentation").is_dir():
        return root
    return None


def resolve_voc_dir(root: str | Path | None, year: str, *, hint: str = _DOWNLOAD_HINT) -> Path:
    """Like :func:`find_voc_dir`, but a missing folder is an :class:`FcnsegError` naming it."""
    expected = f"expected the folder containing VOCdevkit/VOC{year}, VOCdevkit itself or VOC{year}"
    if root is None:
        raise FcnsegError(f"--root: no dataset folder given; {expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FcnsegError(f"{path}: folder not found; {expected}{hint}")
    found = find_voc_dir(path, year)
    if found is not None:
        return found
    other = re.fullmatch(r"VOC(\d{4})", path.name)
    if other is not None:
        raise FcnsegError(f"{path}: this is the VOC{other.group(1)} folder; expected VOC{year} (year {year})")
    raise FcnsegError(f"{path}: no VOCdevkit/VOC{year} in it; {expected}{hint}")


def _download_voc(root: str | Path | None, year: str, split: str) -> Path:
    """Fetch and unpack VOC<year> into ``root`` with torchvision's downloader unless ``split`` is already there."""
    if root is None:
        raise FcnsegError(f"--root: no dataset folder given; expected the folder to download VOC{year} into")
    path = Path(root).expanduser()
    found = find_voc_dir(path, year) if path.is_dir() else None
    # torchvision would unpack the whole 2 GB archive again even when its tar file is already in place.
    if found is not None and (found / "ImageSets" / "Segmentation" / f"{split}.txt").is_file():
        return found
    import torchvision.datasets  # only here: the download is the one use of torchvision's dataset classes

    try:
        path.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.VOCSegmentation(str(path), year=year, image_set=split, download=True)
    except (OSError, RuntimeError, tarfile.TarError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FcnsegError(
            f"{path}: cannot download VOC{year} ({reason}); expected internet access, or unpack the VOC{year} "
            "trainval tar into this folder yourself"
        ) from None
    return resolve_voc_dir(path, year, hint="")


def read_voc_split(voc_dir: Path, split: str, *, hint: str = _DOWNLOAD_HINT) -> list[str]:
    """Ids of ``ImageSets/Segmentation/<split>.txt``; a missing or empty list is an :class:`FcnsegError`."""
    split_file = voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt"
    expected = f"expected {voc_dir.parent.name}/{voc_dir.name}/ImageSets/Segmentation/{split}.txt"
    if not split_file.is_file():
        raise SplitError(split_file, "unreadable-split-file", f"split file not found; {expected}{hint}")
    ids = read_split_file(split_file)
    if not ids:
        raise SplitError(split_file, "empty-split", "split file lists no ids; expected one image id per line")
    return ids


def _check_voc_folders(voc_dir: Path) -> None:
    # Checked once here so that a half-unpacked tree fails up front, not on the first image of an epoch.
    for sub, what in (("JPEGImages", "<id>.jpg images"), ("SegmentationClass", "<id>.png class masks")):
        if not (voc_dir / sub).is_dir():
            raise FcnsegError(f"{voc_dir / sub}: folder not found; expected the devkit's {what} there")


@register_dataset("voc")
class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC segmentation: ``JPEGImages/<id>.jpg`` with ``SegmentationClass/<id>.png``, 21 classes.

    The masks are palette PNGs whose pixel values are the class indices (0..20, 255 on object borders); the
    indices are read, never the colours. ``root`` is the folder containing ``VOCdevkit``, ``VOCdevkit`` itself or
    ``VOC<year>``. ``download=True`` fetches the devkit with torchvision's downloader into ``root`` first (unless
    the split is already there).
    """

    # Appended to "not found" messages; a subclass without a download says how else to get the tree.
    _missing_hint = _DOWNLOAD_HINT

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        year: str | int = "2012",
        download: bool = False,
    ) -> None:
        super().__init__(transforms)
        check_split(split, VOC_SPLITS, "voc")
        self.year = check_year(year)
        self.split = split
        if download:
            self.voc_dir = _download_voc(root, self.year, split)
        else:
            self.voc_dir = resolve_voc_dir(root, self.year, hint=self._missing_hint)
        # After a download, "pass --download" would be no help.
        self.ids = read_voc_split(self.voc_dir, split, hint="" if download else self._missing_hint)
        _check_voc_folders(self.voc_dir)
        self.classes = VOC_CLASSES
        self.palette = voc_palette(len(VOC_CLASSES))

    def image_path(self, index: int) -> Path:
        return self.voc_dir / "JPEGImages" / f"{self.ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.voc_dir / "SegmentationClass" / f"{self.ids[index]}.png"

    def read_mask(self, path: Path) -> np.ndarray:
        return read_mask_png(path)
