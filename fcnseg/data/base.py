"""What every dataset shares: (image, mask) pairs with 255 = void, class names and colours, paired transforms."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .._meta import IGNORE_INDEX as IGNORE_INDEX  # the datasets' void label, read from here too
from ..errors import FcnsegError, clipped, shown
from ..imageio import load_image

if TYPE_CHECKING:  # torchvision is imported where an item is made: listing the datasets (the CLI) needs none of it
    from torchvision import tv_tensors


class SplitError(FcnsegError):
    """A split that cannot be opened (its list is missing or unreadable, or it holds no item), as opposed to a
    dataset that cannot be opened at all. ``file`` and ``kind`` (a check-data problem kind) say what and where,
    so that ``check-data`` reports it as one problem and goes on with the other splits."""

    def __init__(self, file: str | Path, kind: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file, self.kind, self.detail = str(file), kind, message


class SegmentationDataset(torch.utils.data.Dataset):
    """Base class: item ``i`` is ``(image, mask)``.

    ``image`` is a ``tv_tensors.Image`` (uint8, 3 x H x W, RGB) and ``mask`` a ``tv_tensors.Mask`` (int64, H x W,
    class indices with 255 = void), both passed through ``transforms(image, mask)`` when given — torchvision's
    transforms.v2 move the two together (masks resized with nearest neighbour). Subclasses set ``ids``,
    ``classes`` and ``palette`` and implement :meth:`image_path`, :meth:`mask_path` and :meth:`read_mask`;
    files are decoded once per access.
    """

    classes: tuple[str, ...] = ()
    palette: np.ndarray  # len(classes) x 3 uint8
    ids: list[str]
    split: str
    label_convention: ClassVar[str | None] = None
    """One line on how the files' values become classes where that is a known trap (ADE20K's 0 = "other" made
    void), printed by ``check-data``."""
    disjoint_splits: ClassVar[tuple[str, ...]] = ("train", "val")
    """The splits that together hold every item once (unions such as ``trainval`` left out): what ``check-data``
    reads when no ``--split`` is given."""

    def __init__(self, transforms: Callable[..., Any] | None = None) -> None:
        self.transforms = transforms

    @classmethod
    def splits_in(cls, root: str | Path | None) -> tuple[str, ...]:
        """The disjoint splits of the tree at ``root``: :attr:`disjoint_splits` unless the tree itself names them
        (a CVAT export's subsets)."""
        return cls.disjoint_splits

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    # -- what a subclass provides ---------------------------------------------------------------------------
    def image_path(self, index: int) -> Path:
        raise NotImplementedError

    def mask_path(self, index: int) -> Path:
        raise NotImplementedError

    def read_mask(self, path: Path) -> np.ndarray:
        """Decode one mask file to H x W uint8 class indices (255 = void)."""
        raise NotImplementedError

    def label_mapping(self) -> dict[str, Any] | None:
        """How the source's own labels became class indices (COCO category ids, Cityscapes label ids, colours),
        recorded in the checkpoints of a model trained on this dataset; None where the files hold the indices."""
        return None

    # -- shared ----------------------------------------------------------------------------------------------
    def read_image(self, path: Path) -> np.ndarray:
        """Decode one image file to H x W x 3 uint8 RGB."""
        return load_image(path)

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw (image, mask) arrays of item ``index``; a size mismatch is an error naming both files."""
        img_path, mask_path = self.image_path(index), self.mask_path(index)
        image, mask = self.read_image(img_path), self.read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise FcnsegError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {img_path.name} is "
                f"{image.shape[1]}x{image.shape[0]}; expected the same size"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        from torchvision import tv_tensors

        image, mask = self.load_pair(index)
        img_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask)).to(torch.int64))
        if self.transforms is not None:
            img_t, mask_t = self.transforms(img_t, mask_t)
        return img_t, mask_t

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, images={len(self)}, classes={self.num_classes})"


def read_split_file(path: Path) -> list[str]:
    """Ids listed one per line (blank lines and surrounding spaces ignored, order kept, duplicates dropped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise SplitError(path, "unreadable-split-file", "split file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SplitError(path, "unreadable-split-file", f"cannot read split file ({e.__class__.__name__})") from None
    ids = {}
    for number, line in enumerate(lines, 1):
        if line.strip():
            ids.setdefault(check_split_id(line.strip(), path, number), None)
    return list(ids)


def check_split_id(image_id: str, split_file: str | Path, line: int) -> str:
    """``image_id`` if it is a bare name, which joined to a dataset's folder stays inside it; else a
    :class:`SplitError` naming the list file, the line and the id. Every dataset's ids name files as
    ``<folder>/<id>.<suffix>``, so an absolute path, a ``..``, a folder separator or a NUL would read (and
    ``check-data`` would vouch for) a file outside the dataset."""
    why = None
    if "\x00" in image_id:
        why = "it holds a NUL character"
    elif "/" in image_id or "\\" in image_id:
        why = "it holds a folder separator (absolute paths and sub-folders are refused)"
    elif image_id in (".", ".."):
        why = "it names a folder"
    elif PureWindowsPath(image_id).drive:
        why = "it starts with a drive"
    if why:
        expected = "expected one id a line, a file name without folder or suffix"
        raise SplitError(
            split_file, "unsafe-split-id", f"line {line}: id {shown(image_id)} is not a bare id: {why}; {expected}"
        )
    return image_id


_DATASETS: dict[str, Callable[..., SegmentationDataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., SegmentationDataset]], Callable[..., SegmentationDataset]]:
    """Class decorator: make a dataset available by name to every command's ``--dataset NAME``."""

    def wrap(cls: Callable[..., SegmentationDataset]) -> Callable[..., SegmentationDataset]:
        if name in _DATASETS:
            raise ValueError(f"a dataset named {name!r} is already registered")
        _DATASETS[name] = cls
        return cls

    return wrap


def list_datasets() -> list[str]:
    """The registered dataset names, sorted: the 12 built-in ones once ``fcnseg.data`` is imported."""
    return sorted(_DATASETS)


def dataset_splits(name: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The disjoint splits of dataset ``name`` in the tree at ``root`` (see :meth:`SegmentationDataset.splits_in`)."""
    if name not in _DATASETS:
        raise FcnsegError(f"--dataset {shown(name)}: unknown dataset; expected one of {', '.join(list_datasets())}")
    cls = _DATASETS[name]
    return tuple(cls.splits_in(root)) if isinstance(cls, type) and issubclass(cls, SegmentationDataset) else ("train",)


def get_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    split: str = "train",
    transforms: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> SegmentationDataset:
    """Build dataset ``name`` for ``split``: one of :func:`list_datasets` (``ade20k``, ``cityscapes``, ``coco``,
    ``cvat``, ``folder``, ``labelme``, ``nyud``, ``sbd``, ``seg11valid``, ``siftflow``, ``synthetic``, ``voc``);
    ``kwargs`` are the dataset's own options.

    The built-in datasets are registered by their package, ``fcnseg.data``, which Python imports before any of
    its modules.
    """
    if name not in _DATASETS:
        raise FcnsegError(f"--dataset {shown(name)}: unknown dataset; expected one of {', '.join(list_datasets())}")
    cls = _DATASETS[name]
    check_data_options(kwargs)
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = [k for k in accepted if k not in ("root", "split", "transforms")]
        raise FcnsegError(
            f"dataset {shown(name)} takes no option {clipped(', '.join(unknown))}; "
            f"expected some of: {', '.join(options) or 'none'}"
        )
    return cls(root=root, split=split, transforms=transforms, **kwargs)


def check_data_options(options: dict[str, Any]) -> None:
    """Dataset options (``--data-option KEY=VALUE``) cannot stand in for root, split or transforms."""
    reserved = sorted({"root", "split", "transforms"} & set(options))
    if reserved:
        raise FcnsegError(f"--data-option {reserved[0]}: set it with --{reserved[0]}, not as a dataset option")


def check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    if split not in allowed:
        raise FcnsegError(f"--split {shown(split)}: {dataset} has splits {', '.join(allowed)}")
