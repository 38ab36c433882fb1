"""Writers of small fake PASCAL VOC and SBD trees in the exact on-disk formats of the real releases.

VOC: ``VOCdevkit/VOC<year>/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt}``
with palette ("P") PNG masks whose pixel values are class indices, 255 on a void border. SBD:
``benchmark_RELEASE/dataset/{img/<id>.jpg, cls/<id>.mat, train.txt, val.txt}`` with each ``.mat`` holding a MATLAB
struct ``GTcls`` (fields ``Segmentation``, ``Boundaries``, ``CategoriesPresent``). Pixel contents are a function of
the id, so tests can compare what a dataset returns with :func:`voc_mask` / :func:`sbd_mask` pixel for pixel.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from fcnseg.palette import full_palette, voc_palette

SizeFn = Callable[[str], tuple[int, int]]


def default_size(image_id: str) -> tuple[int, int]:
    """(H, W) of every fake image unless a test asks otherwise: small, and not square so H/W mix-ups show."""
    return (20, 30)


def _rng(image_id: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{salt}:{image_id}".encode()))


def fake_image(image_id: str, size: tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 noise, the same for the same id and size."""
    return _rng(image_id, "image").integers(0, 256, (*size, 3), dtype=np.uint8)


def voc_mask(image_id: str, size: tuple[int, int]) -> np.ndarray:
    """H x W uint8 VOC-style mask: random classes 0..20 with a one-pixel 255 (void) ring, like object borders."""
    h, w = size
    mask = _rng(image_id, "voc").integers(0, 21, (h, w), dtype=np.uint8)
    y0, x0, y1, x1 = h // 4, w // 4, h - 1 - h // 4, w - 1 - w // 4
    mask[y0, x0 : x1 + 1] = mask[y1, x0 : x1 + 1] = 255
    mask[y0 : y1 + 1, x0] = mask[y0 : y1 + 1, x1] = 255
    return mask


def sbd_mask(image_id: str, size: tuple[int, int]) -> np.ndarray:
    """H x W uint8 SBD-style mask: classes 0..20 and no void."""
    return _rng(image_id, "sbd").integers(0, 21, size, dtype=np.uint8)


def write_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=90)


def write_voc_png(path: Path, mask: np.ndarray) -> None:
    """A palette PNG whose pixel values are the indices, with the VOC colours, as in ``SegmentationClass``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # frombytes keeps the values as palette indices; converting an "L" image to "P" would remap them.
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    img.putpalette(full_palette(voc_palette(21)))
    img.save(path, format="PNG")


def write_split(path: Path, ids: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def make_voc(
    root: str | Path,
    year: str | int = "2012",
    ids_by_split: Mapping[str, Sequence[str]] | None = None,
    size_fn: SizeFn = default_size,
) -> Path:
    """Write ``root/VOCdevkit/VOC<year>`` with the given split lists; returns the ``VOC<year>`` folder.

    Every id in any list gets an image and a mask (sizes from ``size_fn(id)``, (H, W)). The default lists are a
    small train and val and their union as trainval.
    """
    if ids_by_split is None:
        train = [f"{year}_00000{k}" for k in (3, 1, 2)]
        val = [f"{year}_00001{k}" for k in (2, 0)]
        ids_by_split = {"train": train, "val": val, "trainval": train + val}
    voc_dir = Path(root) / "VOCdevkit" / f"VOC{year}"
    for split, ids in ids_by_split.items():
        write_split(voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt", ids)
    for image_id in dict.fromkeys(i for ids in ids_by_split.values() for i in ids):
        size = size_fn(image_id)
        write_jpeg(voc_dir / "JPEGImages" / f"{image_id}.jpg", fake_image(image_id, size))
        write_voc_png(voc_dir / "SegmentationClass" / f"{image_id}.png", voc_mask(image_id, size))
    return voc_dir


def write_sbd_mat(path: Path, seg: np.ndarray, *, layout: str = "dict") -> None:
    """Write ``GTcls`` as SBD's MATLAB files hold it: a 1x1 struct with Segmentation, Boundaries, CategoriesPresent.

    ``layout="dict"`` hands savemat a dict, ``"record"`` a 1x1 numpy record array; savemat stores both as a MATLAB
    struct array, which is what MATLAB's ``save`` writes.
    """
    present = np.array([c for c in np.unique(seg) if c != 0], dtype=np.uint8).reshape(-1, 1)
    # Boundaries: a 20x1 cell of sparse logical H x W maps, one per class (here empty).
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(seg.shape, dtype=bool)
    fields = {"Segmentation": seg, "Boundaries": boundaries, "CategoriesPresent": present}
    if layout == "dict":
        struct: object = fields
    elif layout == "record":
        struct = np.empty((1, 1), dtype=[(name, object) for name in fields])
        for name, value in fields.items():
            struct[0, 0][name] = value
    else:
        raise ValueError(f"layout must be 'dict' or 'record', got {layout!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"GTcls": struct})


def make_sbd(
    root: str | Path,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    size_fn: SizeFn = default_size,
    *,
    layout: str = "dict",
) -> Path:
    """Write ``root/benchmark_RELEASE/dataset`` with ``train.txt`` and ``val.txt``; returns the ``dataset`` folder."""
    sbd_dir = Path(root) / "benchmark_RELEASE" / "dataset"
    write_split(sbd_dir / "train.txt", train_ids)
    write_split(sbd_dir / "val.txt", val_ids)
    for image_id in dict.fromkeys([*train_ids, *val_ids]):
        size = size_fn(image_id)
        write_jpeg(sbd_dir / "img" / f"{image_id}.jpg", fake_image(image_id, size))
        write_sbd_mat(sbd_dir / "cls" / f"{image_id}.mat", sbd_mask(image_id, size), layout=layout)
    return sbd_dir
