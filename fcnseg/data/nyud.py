"""NYUDv2 as FCN uses it: 40-class RGB-D indoor scenes (Gupta et al.'s labels), with depth and HHA inputs.

Layout (the folder FCN's ``nyud_layers.py`` calls ``nyud_dir``)::

    ROOT/data/images/img_<id>.png   RGB, uint8
    ROOT/data/depth/img_<id>.png    depth, 16-bit greyscale PNG in millimetres (FCN takes log(d) - 7.844 of it)
    ROOT/data/hha/img_<id>.png      HHA (horizontal disparity, height above ground, angle), 3-channel uint8
    ROOT/segmentation/img_<id>.mat  key ``segmentation``: 0 = void, 1..40 = classes
    ROOT/train.txt, val.txt, test.txt   ids (``5001`` .. ``6449``), one a line, as FCN's ``data/nyud/<split>.txt``
    ROOT/trainval.txt                   optional; without it ``trainval`` is train.txt followed by val.txt

The split files ship with FCN's repository (``data/nyud/``), not with the images: copy them into ROOT.
This module also holds the ``.mat`` label reader and the split-overlap check that :mod:`fcnseg.data.siftflow`
shares. The depth encoding and reader live in :mod:`fcnseg.imageio` (prediction reads a fusion net's depth too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._meta import NYUD_CLASSES, NYUD_MEAN_BGR, NYUD_MEAN_HHA, NYUD_MEAN_LOG_DEPTH
from ..errors import FcnsegError, shown
from ..imageio import DEPTH_MAX_MM, encode_depth, load_image, read_depth
from ..palette import palette_for
from .base import SegmentationDataset, SplitError, check_split, read_split_file, register_dataset
from .check import Problem
from .matfile import load_mat

__all__ = [
    "DEPTH_MAX_MM",
    "NYUD_CLASSES",
    "NYUD_MEAN_BGR",
    "NYUD_MEAN_HHA",
    "NYUD_MEAN_LOG_DEPTH",
    "NYUD_MODALITIES",
    "NYUD_SPLITS",
    "NYUDSegmentation",
    "encode_depth",
    "read_depth",
    "read_mat_labels",
    "read_nyud_mask",
    "read_nyud_split",
    "split_overlap_problems",
]

NYUD_SPLITS: tuple[str, ...] = ("train", "val", "test", "trainval")
NYUD_MODALITIES: dict[str, int] = {"rgb": 3, "hha": 3, "rgbd": 4, "rgb-hha": 6}
"""Image channels per ``modality``: RGB; HHA; RGB then encoded depth; RGB then HHA."""

_MAT_EXPECTED = "expected a NYUDv2 segmentation/img_<id>.mat file with key 'segmentation' (0 = void, 1..40 = classes)"
_LAYOUT = "data/images, data/depth, data/hha, segmentation and the split files train.txt, val.txt, test.txt"


# -- .mat labels, shared with SIFT Flow -------------------------------------------------------------------------------


def read_mat_labels(path: str | Path, key: str, *, void: tuple[int, ...], expected: str) -> np.ndarray:
    """Read the 2-D label matrix ``key`` of a MATLAB file as uint8 H x W: ``void`` values -> 255, k -> k - 1.

    Any numeric matrix holding integers is accepted (the releases store uint8 or double). A value that maps
    outside 0..254 is an error; one above the dataset's classes is returned as is (``check-data`` reports it).
    Every failure is an :class:`FcnsegError` naming the file; ``expected`` ends the message.
    """
    mat = load_mat(path, expected)
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        found = f" (it holds {', '.join(repr(k) for k in keys)})" if keys else ""
        raise FcnsegError(f"{path}: no key {key!r}{found}; {expected}")
    labels = np.asarray(mat[key])
    if labels.ndim != 2 or labels.dtype.kind not in "uif" or labels.size == 0:
        raise FcnsegError(f"{path}: {key!r} has shape {labels.shape} and dtype {labels.dtype}; {expected}")
    if labels.dtype.kind == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        raise FcnsegError(f"{path}: {key!r} holds values that are not integers; {expected}")
    values = labels.astype(np.int64)
    is_void = np.isin(values, void)
    shifted = values - 1
    outside = ~is_void & ((shifted < 0) | (shifted > 254))
    if outside.any():
        odd = np.unique(values[outside])
        listed = ", ".join(str(v) for v in odd[:5]) + (" ..." if len(odd) > 5 else "")
        raise FcnsegError(f"{path}: {key!r} holds values {listed}, outside the labels 1..255 and void; {expected}")
    shifted[is_void] = 255
    return np.ascontiguousarray(shifted.astype(np.uint8))


def split_overlap_problems(files: Mapping[str, Path]) -> list[Problem]:
    """``split-overlap`` problems of the split files that exist among ``files`` (split name -> file), pairwise."""
    listed: dict[str, tuple[Path, list[str]]] = {}
    for name, path in files.items():
        if path.is_file():
            try:
                listed[name] = (path, read_split_file(path))
            except FcnsegError:
                continue  # an unreadable split file is reported where it is read, not here
    problems = []
    names = list(listed)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            in_a = set(listed[a][1])
            shared = [x for x in listed[b][1] if x in in_a]
            if shared:
                shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
                problems.append(
                    Problem(str(listed[b][0]), "split-overlap", f"{len(shared)} id(s) also in {a}.txt: {shown}")
                )
    return problems


# -- NYUDv2 files -----------------------------------------------------------------------------------------------------


def read_nyud_mask(path: str | Path) -> np.ndarray:
    """``segmentation`` of a NYUDv2 ``.mat`` as uint8 H x W: 0 (void) -> 255, class k in 1..40 -> k - 1."""
    return read_mat_labels(path, "segmentation", void=(0,), expected=_MAT_EXPECTED)


def read_nyud_split(nyud_dir: Path, split: str) -> list[str]:
    """Ids of ``<split>.txt`` (``trainval``: ``trainval.txt``, else ``train.txt`` then ``val.txt``).

    An ``img_`` prefix on an id is dropped, so ``img_5001`` and ``5001`` name the same image. A missing or empty
    file is an :class:`FcnsegError` naming it.
    """
    if split == "trainval" and not (nyud_dir / "trainval.txt").is_file():
        hint = " (trainval.txt is absent, so trainval is train.txt followed by val.txt)"
        return list(dict.fromkeys(_read_one(nyud_dir, "train", hint) + _read_one(nyud_dir, "val", hint)))
    return _read_one(nyud_dir, split, "")


def _read_one(nyud_dir: Path, split: str, hint: str) -> list[str]:
    path = nyud_dir / f"{split}.txt"
    if not path.is_file():
        raise SplitError(
            path,
            "unreadable-split-file",
            f"split file not found{hint}; expected {split}.txt in the NYUDv2 folder, one id (e.g. 5001) a line, as "
            f"in FCN's data/nyud/{split}.txt",
        )
    ids = [i.removeprefix("img_") for i in read_split_file(path)]
    if not ids:
        raise SplitError(path, "empty-split", "split file lists no ids; expected one image id (e.g. 5001) a line")
    return list(dict.fromkeys(ids))


def _resolve_nyud_dir(root: str | Path | None) -> Path:
    expected = f"expected the NYUDv2 folder holding {_LAYOUT}"
    if root is None:
        raise FcnsegError(f"--root: no dataset folder given; {expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FcnsegError(f"{path}: folder not found; {expected}")
    # FCN's repository keeps the tree in data/nyud; accept the folder above it too.
    if not (path / "segmentation").is_dir() and (path / "nyud" / "segmentation").is_dir():
        return path / "nyud"
    return path


@register_dataset("nyud")
class NYUDSegmentation(SegmentationDataset):
    """NYUDv2, 40 classes, as FCN reads it; ``modality`` picks the input channels (uint8 ``tv_tensors.Image``).

    - ``"rgb"``: 3 channels, ``data/images``; ``"hha"``: 3 channels, ``data/hha``;
    - ``"rgbd"``: 4 channels, RGB then depth encoded to uint8 by :func:`encode_depth` (linear, 0..10 m,
      about 39 mm a step; 0 = no measurement). Kept uint8 so every channel goes through the same paired
      transforms and dtype as the images of every other dataset;
    - ``"rgb-hha"``: 6 channels, RGB then HHA (for FCN's late fusion, which sums the RGB and HHA score maps).

    Masks are ``segmentation`` minus 1: classes 0..39, void 255. Splits (ids 5001..6449): train 381, val 414,
    test 654, trainval 795. The paper's test results (pixel acc / mean acc / mean IU / f.w. IU): FCN-32s RGB
    60.0/42.2/29.2/43.9, RGBD early fusion 61.5/42.4/30.5/45.5, HHA 57.1/35.2/24.2/40.4, RGB-HHA late fusion
    64.3/44.9/32.8/48.0, FCN-16s RGB-HHA 65.4/46.1/34.0/49.5. ``rgbd`` trains any model built with
    ``in_channels=4`` (early fusion), ``rgb-hha`` the late-fusion ``fcn32s_rgb_hha`` / ``fcn16s_rgb_hha``; their
    depth and HHA channels are normalised with :attr:`channel_means`.
    """

    disjoint_splits = ("train", "val", "test")  # trainval is train + val

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transforms: Callable[..., Any] | None = None,
        *,
        modality: str = "rgb",
    ) -> None:
        super().__init__(transforms)
        check_split(split, NYUD_SPLITS, "nyud")
        if modality not in NYUD_MODALITIES:
            raise FcnsegError(f"modality {shown(modality)}: expected one of {', '.join(NYUD_MODALITIES)}")
        self.split = split
        self.modality = modality
        self.nyud_dir = _resolve_nyud_dir(root)
        self.ids = read_nyud_split(self.nyud_dir, split)
        needed = {"segmentation": "img_<id>.mat class masks"}
        if modality != "hha":
            needed["data/images"] = "img_<id>.png RGB images"
        if modality in ("hha", "rgb-hha"):
            needed["data/hha"] = "img_<id>.png HHA images"
        if modality == "rgbd":
            needed["data/depth"] = "img_<id>.png 16-bit depth images"
        for sub, what in needed.items():
            if not (self.nyud_dir / sub).is_dir():
                raise FcnsegError(f"{self.nyud_dir / sub}: folder not found; expected NYUDv2's {what} there")
        self.classes = NYUD_CLASSES
        self.palette = palette_for(NYUD_CLASSES, len(NYUD_CLASSES))

    @property
    def channels(self) -> int:
        """Channels of the images this dataset returns."""
        return NYUD_MODALITIES[self.modality]

    @property
    def channel_means(self) -> tuple[float | None, ...]:
        """Per channel, the mean (0-255 scale) of a channel that is not colour, from the release's readers: the
        encoded depth of FCN's mean log depth (about 2.55 m: 65.0) or the HHA mean; None for a colour channel.
        Training normalises the non-colour channels with these, scaled like the colour channels and never reversed
        (the release reverses colour only)."""
        depth = float(np.exp(NYUD_MEAN_LOG_DEPTH)) * 255 / DEPTH_MAX_MM
        color: tuple[float | None, ...] = (None, None, None)
        return {"rgb": color, "hha": NYUD_MEAN_HHA, "rgbd": (*color, depth), "rgb-hha": (*color, *NYUD_MEAN_HHA)}[
            self.modality
        ]

    def image_path(self, index: int) -> Path:
        folder = "hha" if self.modality == "hha" else "images"
        return self.nyud_dir / "data" / folder / f"img_{self.ids[index]}.png"

    def mask_path(self, index: int) -> Path:
        return self.nyud_dir / "segmentation" / f"img_{self.ids[index]}.mat"

    def read_mask(self, path: Path) -> np.ndarray:
        return read_nyud_mask(path)

    def read_image(self, path: Path) -> np.ndarray:
        """H x W x C uint8 for this modality; ``path`` is :meth:`image_path`'s, the other inputs share its name."""
        first = load_image(path)
        if self.modality in ("rgb", "hha"):
            return first
        if self.modality == "rgbd":
            extra_path, what = self.nyud_dir / "data" / "depth" / Path(path).name, "depth"
            extra = read_depth(extra_path)[:, :, None]
        else:
            extra_path, what = self.nyud_dir / "data" / "hha" / Path(path).name, "HHA image"
            extra = load_image(extra_path)
        if extra.shape[:2] != first.shape[:2]:
            raise FcnsegError(
                f"{extra_path}: {what} is {extra.shape[1]}x{extra.shape[0]} but its RGB image {Path(path).name} is "
                f"{first.shape[1]}x{first.shape[0]}; expected the same size"
            )
        return np.concatenate([first, extra], axis=2)

    def extra_problems(self) -> list[Problem]:
        """Ids in more than one of train.txt, val.txt and test.txt (check-data)."""
        return split_overlap_problems({s: self.nyud_dir / f"{s}.txt" for s in ("train", "val", "test")})

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, modality={self.modality!r})"
