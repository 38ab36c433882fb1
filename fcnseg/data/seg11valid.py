"""seg11valid: the FCN paper's validation set, VOC2011 segmentation val minus the images SBD trains on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import check_split, register_dataset
from .sbd import read_sbd_split, resolve_sbd_dir
from .voc import VOCSegmentation

__all__ = ["Seg11Valid"]

_SBD_HINT = "; seg11valid reads SBD's train.txt from sbd_root (default: root)"


@register_dataset("seg11valid")
class Seg11Valid(VOCSegmentation):
    """VOC2011 segmentation val without the ids in SBD's ``train.txt`` (736 images on the real data).

    The list is computed from the user's own split files, in the order of VOC2011's ``val.txt``; images and masks
    come from the VOC2011 tree under ``root`` (same root forms as ``voc``). ``sbd_root`` (default ``root``) is where
    SBD's ``train.txt`` is looked for (same root forms as ``sbd``). ``excluded_ids`` are the val ids dropped
    because SBD trains on them.
    """

    disjoint_splits = ("val",)
    _missing_hint = "; seg11valid needs the VOC2011 devkit (VOCtrainval_25-May-2011.tar) unpacked there"

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "val",
        transforms: Callable[..., Any] | None = None,
        *,
        sbd_root: str | Path | None = None,
    ) -> None:
        check_split(split, ("val",), "seg11valid")
        super().__init__(root, "val", transforms, year="2011")
        sbd_dir = resolve_sbd_dir(root if sbd_root is None else sbd_root, hint=_SBD_HINT)
        sbd_train = set(read_sbd_split(sbd_dir, "train", hint=_SBD_HINT))
        val_ids = self.ids
        self.ids = [i for i in val_ids if i not in sbd_train]
        self.excluded_ids = [i for i in val_ids if i in sbd_train]
