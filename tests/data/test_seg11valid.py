from pathlib import Path

import numpy as np
import pytest
import torch

from fcnseg.data.base import get_dataset
from fcnseg.data.seg11valid import Seg11Valid
from fcnseg.errors import FcnsegError
from fcnseg.palette import VOC_CLASSES, voc_palette
from tests.data.fakes_voc import make_sbd, make_voc, voc_mask

# VOC2011 val, deliberately not sorted; SBD train holds 4 of these ids and others besides.
VAL11 = [f"2008_00{k:04d}" for k in (7, 3, 9, 1, 5, 2, 8, 0, 6, 4)]
IN_SBD_TRAIN = ["2008_000003", "2008_000005", "2008_000000", "2008_000004"]
SBD_TRAIN = ["2007_000032", IN_SBD_TRAIN[2], "2009_001234", IN_SBD_TRAIN[0], IN_SBD_TRAIN[3], IN_SBD_TRAIN[1]]
SBD_VAL = ["2010_000002", VAL11[0]]  # SBD val ids stay in seg11valid: only SBD train is excluded
KEPT = ["2008_000007", "2008_000009", "2008_000001", "2008_000002", "2008_000008", "2008_000006"]
EXCLUDED = ["2008_000003", "2008_000005", "2008_000000", "2008_000004"]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_voc(tmp_path, "2011", {"train": ["2011_000001"], "val": VAL11})
    make_sbd(tmp_path, SBD_TRAIN, SBD_VAL)
    return tmp_path


def msg(exc_info: pytest.ExceptionInfo) -> str:
    return str(exc_info.value)


def test_val_minus_sbd_train_in_val_order(root: Path) -> None:
    ds = Seg11Valid(root)
    assert ds.ids == KEPT and len(ds) == 6
    assert ds.excluded_ids == EXCLUDED
    assert ds.split == "val" and ds.year == "2011"


def test_items_come_from_the_voc2011_tree(root: Path) -> None:
    ds = Seg11Valid(root)
    voc_dir = root / "VOCdevkit" / "VOC2011"
    assert ds.voc_dir == voc_dir
    assert ds.image_path(0) == voc_dir / "JPEGImages" / f"{KEPT[0]}.jpg"
    assert ds.mask_path(0) == voc_dir / "SegmentationClass" / f"{KEPT[0]}.png"
    image, mask = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 30)
    assert mask.dtype == torch.int64 and mask.shape == (20, 30)
    np.testing.assert_array_equal(mask.numpy(), voc_mask(KEPT[5], (20, 30)))
    assert (mask == 255).any()  # VOC's void border, not SBD's masks
    assert ds.classes == VOC_CLASSES
    np.testing.assert_array_equal(ds.palette, voc_palette(21))


def test_separate_sbd_root_and_root_forms(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", "2011", {"val": VAL11})
    make_sbd(tmp_path / "sbd", SBD_TRAIN, SBD_VAL)
    for voc_root in (tmp_path / "voc", tmp_path / "voc" / "VOCdevkit", tmp_path / "voc" / "VOCdevkit" / "VOC2011"):
        for sbd_root in (tmp_path / "sbd", tmp_path / "sbd" / "benchmark_RELEASE" / "dataset"):
            ds = Seg11Valid(str(voc_root), sbd_root=sbd_root)
            assert ds.ids == KEPT and ds.excluded_ids == EXCLUDED


def test_nothing_excluded_when_sbd_train_shares_no_id(tmp_path: Path) -> None:
    make_voc(tmp_path, "2011", {"val": VAL11})
    make_sbd(tmp_path, ["2007_000032"], [])
    ds = Seg11Valid(tmp_path)
    assert ds.ids == VAL11 and ds.excluded_ids == []


def test_only_val(root: Path) -> None:
    with pytest.raises(FcnsegError) as e:
        Seg11Valid(root, "train")
    assert msg(e) == "--split 'train': seg11valid has splits val"


def test_missing_voc2011(tmp_path: Path) -> None:
    make_voc(tmp_path, "2012", {"val": VAL11})
    make_sbd(tmp_path, SBD_TRAIN, SBD_VAL)
    with pytest.raises(FcnsegError) as e:
        Seg11Valid(tmp_path)
    assert msg(e) == (
        f"{tmp_path}: no VOCdevkit/VOC2011 in it; expected the folder containing VOCdevkit/VOC2011, VOCdevkit itself "
        "or VOC2011; seg11valid needs the VOC2011 devkit (VOCtrainval_25-May-2011.tar) unpacked there"
    )


def test_missing_voc2011_val_list(tmp_path: Path) -> None:
    voc_dir = make_voc(tmp_path, "2011", {"train": VAL11})
    with pytest.raises(FcnsegError) as e:
        Seg11Valid(tmp_path)
    assert msg(e) == (
        f"{voc_dir / 'ImageSets' / 'Segmentation' / 'val.txt'}: split file not found; expected "
        "VOCdevkit/VOC2011/ImageSets/Segmentation/val.txt; seg11valid needs the VOC2011 devkit "
        "(VOCtrainval_25-May-2011.tar) unpacked there"
    )


def test_missing_sbd(tmp_path: Path) -> None:
    make_voc(tmp_path, "2011", {"val": VAL11})
    with pytest.raises(FcnsegError) as e:
        Seg11Valid(tmp_path)
    assert msg(e) == (
        f"{tmp_path}: no benchmark_RELEASE/dataset in it; expected the folder containing benchmark_RELEASE, "
        "benchmark_RELEASE itself or benchmark_RELEASE/dataset; seg11valid reads SBD's train.txt from sbd_root "
        "(default: root)"
    )


def test_missing_sbd_train_list(root: Path) -> None:
    train = root / "benchmark_RELEASE" / "dataset" / "train.txt"
    train.unlink()
    with pytest.raises(FcnsegError) as e:
        Seg11Valid(root)
    assert msg(e) == (
        f"{train}: split file not found; expected benchmark_RELEASE/dataset/train.txt; seg11valid reads SBD's "
        "train.txt from sbd_root (default: root)"
    )


def test_get_dataset(root: Path) -> None:
    ds = get_dataset("seg11valid", root=root, split="val")
    assert isinstance(ds, Seg11Valid) and ds.ids == KEPT
    assert get_dataset("seg11valid", root=root / "VOCdevkit", split="val", sbd_root=root).ids == KEPT
