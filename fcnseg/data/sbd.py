"""Semantic Boundaries Dataset (Hariharan et al.): VOC images with extra class masks stored as MATLAB files."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._meta import VOC_CLASSES
from ..errors import FcnsegError
from ..palette import voc_palette
from .base import SegmentationDataset, SplitError, check_split, read_split_file, register_dataset
from .matfile import load_mat

__all__ = ["SBD_SPLITS", "SBDSegmentation", "find_sbd_dir", "read_sbd_mask", "read_sbd_split", "resolve_sbd_dir"]

SBD_SPLITS: tuple[str, ...] = ("train", "val")
_DOWNLOAD_HINT = "; pass --download to fetch it"
_MAT_EXPECTED = "expected an SBD cls/<id>.mat file holding the struct GTcls with field Segmentation"


def _looks_like_sbd(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("cls", "img", "train.txt", "val.txt"))


def find_sbd_dir(root: Path) -> Path | None:
    """The folder holding ``img``, ``cls``, ``train.txt`` and ``val.txt`` that ``root`` designates, or None.

    ``root`` may be the folder containing ``benchmark_RELEASE``, ``benchmark_RELEASE`` or
    ``benchmark_RELEASE/dataset``. torchvision's downloader moves ``img``, ``cls`` and the lists straight into its
    root, so a folder holding them itself is accepted as well.
    """
    # Looked for by content rather than by name alone: after torchvision's download an emptied
    # benchmark_RELEASE/dataset stays behind beside the moved files.
    for candidate in (root / "benchmark_RELEASE" / "dataset", root / "dataset", root):
        if _looks_like_sbd(candidate):
            return candidate
    return None


def resolve_sbd_dir(root: str | Path | None, *, hint: str = _DOWNLOAD_HINT) -> Path:
    """Like :func:`find_sbd_dir`, but a missing folder is an :class:`FcnsegError` naming it."""
    expected = "expected the folder containing benchmark_RELEASE, benchmark_RELEASE itself or benchmark_RELEASE/dataset"
    if root is None:
        raise FcnsegError(f"--root: no dataset folder given; {expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FcnsegError(f"{path}: folder not found; {expected}{hint}")
    found = find_sbd_dir(path)
    if found is None:
        raise FcnsegError(f"{path}: no benchmark_RELEASE/dataset in it; {expected}{hint}")
    return found


def read_sbd_split(sbd_dir: Path, split: str, *, hint: str = _DOWNLOAD_HINT) -> list[str]:
    """Ids of ``<split>.txt``; a missing or empty list is an :class:`FcnsegError`."""
    split_file = sbd_dir / f"{split}.txt"
    if not split_file.is_file():
        expected = f"expected benchmark_RELEASE/dataset/{split}.txt{hint}"
        raise SplitError(split_file, "unreadable-split-file", f"split file not found; {expected}")
    ids = read_split_file(split_file)
    if not ids:
        raise SplitError(split_file, "empty-split", "split file lists no ids; expected one image id per line")
    return ids


def _one(value: Any) -> Any:
    """Unwrap the 1-element object arrays loadmat puts around a cell's or a struct field's content."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.reshape(-1)[0]
    return value


def _struct_field(struct: Any, name: str) -> Any:
    """Field ``name`` of a 1x1 MATLAB struct as loadmat returns it, or None when it has no such field.

    ``struct_as_record=False`` gives a ``mat_struct`` object; the default record layout gives a structured array
    (1 x 1, or 0-d with ``squeeze_me``). Both are understood so the reader does not depend on loadmat's options.
    """
    struct = _one(struct)
    if isinstance(struct, np.ndarray) and struct.dtype.names is not None:
        if name not in struct.dtype.names or struct.size != 1:
            return None
        return _one(struct.reshape(-1)[0][name])
    fields = getattr(struct, "_fieldnames", None)
    if fields is None or name not in fields:
        return None
    return _one(getattr(struct, name))


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """Read ``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file as uint8 H x W class indices.

    SBD has no void border; values above 20 are returned as they are (``check-data`` reports them).
    """
    # No squeeze_me: it would turn a one-row mask into a 1-D array; _struct_field unwraps the 1x1 struct itself.
    mat = load_mat(path, _MAT_EXPECTED, struct_as_record=False)
    if "GTcls" not in mat:
        raise FcnsegError(f"{path}: no key 'GTcls'; {_MAT_EXPECTED}")
    seg = _struct_field(mat["GTcls"], "Segmentation")
    if seg is None:
        raise FcnsegError(f"{path}: struct GTcls has no field 'Segmentation'; {_MAT_EXPECTED}")
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.dtype.kind not in "uif" or seg.size == 0:
        raise FcnsegError(f"{path}: GTcls.Segmentation has shape {seg.shape} and dtype {seg.dtype}; {_MAT_EXPECTED}")
    if seg.dtype != np.uint8:
        # The release stores uint8; a re-saved double or int matrix is accepted when it holds indices 0..255.
        if not (np.isfinite(seg).all() and (seg == np.round(seg)).all() and seg.min() >= 0 and seg.max() <= 255):
            raise FcnsegError(f"{path}: GTcls.Segmentation holds values outside the class indices 0..255")
        seg = seg.astype(np.uint8)
    return np.ascontiguousarray(seg)


def _download_sbd(root: str | Path | None, split: str) -> Path:
    """Fetch SBD into ``root`` with torchvision's downloader unless ``split`` is already there."""
    if root is None:
        raise FcnsegError("--root: no dataset folder given; expected the folder to download SBD into")
    path = Path(root).expanduser()
    found = find_sbd_dir(path) if path.is_dir() else None
    # torchvision moves img/ and cls/ into root after unpacking; run again over an existing tree it would nest them.
    if found is not None and (found / f"{split}.txt").is_file():
        return found
    import torchvision.datasets  # only here: the download is the one use of torchvision's dataset classes

    try:
        path.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.SBDataset(str(path), image_set=split, mode="segmentation", download=True)
    except (OSError, RuntimeError, tarfile.TarError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FcnsegError(
            f"{path}: cannot download SBD ({reason}); expected internet access, or unpack benchmark.tgz into this "
            "folder yourself"
        ) from None
    return resolve_sbd_dir(path, hint="")


@register_dataset("sbd")
class SBDSegmentation(SegmentationDataset):
    """SBD: ``img/<id>.jpg`` with ``cls/<id>.mat`` masks (``GTcls.Segmentation``), the 21 VOC classes.

    ``root`` is the folder containing ``benchmark_RELEASE``, ``benchmark_RELEASE`` itself or
    ``benchmark_RELEASE/dataset``. Masks have no 255 void border. ``download=True`` fetches ``benchmark.tgz`` with
    torchvision's downloader into ``root`` first (unless the split is already there).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        download: bool = False,
    ) -> None:
        super().__init__(transforms)
        check_split(split, SBD_SPLITS, "sbd")
        self.split = split
        self.sbd_dir = _download_sbd(root, split) if download else resolve_sbd_dir(root)
        self.ids = read_sbd_split(self.sbd_dir, split, hint="" if download else _DOWNLOAD_HINT)
        for sub, what in (("img", "<id>.jpg images"), ("cls", "<id>.mat class masks")):
            if not (self.sbd_dir / sub).is_dir():
                raise FcnsegError(f"{self.sbd_dir / sub}: folder not found; expected SBD's {what} there")
        self.classes = VOC_CLASSES
        self.palette = voc_palette(len(VOC_CLASSES))

    def image_path(self, index: int) -> Path:
        return self.sbd_dir / "img" / f"{self.ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.sbd_dir / "cls" / f"{self.ids[index]}.mat"

    def read_mask(self, path: Path) -> np.ndarray:
        return read_sbd_mask(path)
