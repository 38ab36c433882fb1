"""PASCAL VOC: the fake tree these tests and ``test_pascal.py`` read, and the checks only VOC has (the fake's
format, paired transforms, years, empty split files, a missing mask). What voc shares with sbd and seg11valid is
checked once for all three in ``test_pascal.py``.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from fcnseg.data.voc import VOCSegmentation
from fcnseg.errors import FcnsegError, ImageError
from fcnseg.palette import voc_palette
from tests.data.fakes_voc import make_voc

# Deliberately not sorted: the split file's order is the dataset's order.
TRAIN = ["2008_000009", "2007_000033", "2008_000002"]
VAL = ["2009_000001", "2007_000129"]
SPLITS = {"train": TRAIN, "val": VAL, "trainval": TRAIN + VAL}


def size_of(image_id: str) -> tuple[int, int]:
    # Sizes differ per image so a mix-up between items (or between H and W) shows.
    return (18 + int(image_id[-1]), 30)


def make_tree(root: Path) -> None:
    make_voc(root, "2012", SPLITS, size_fn=size_of)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    make_tree(tmp_path)
    return tmp_path


def msg(exc_info: pytest.ExceptionInfo) -> str:
    return str(exc_info.value)


# -- the fake itself is in VOC's format --------------------------------------------------------------------------


def test_fake_masks_are_palette_pngs_of_indices(voc_root: Path) -> None:
    path = voc_root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{TRAIN[0]}.png"
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[: 21 * 3] == voc_palette(21).reshape(-1).tolist()
        values = np.array(img)
    assert values.dtype == np.uint8
    assert 255 in values and values[values != 255].max() <= 20
    with Image.open(voc_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{TRAIN[0]}.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB"


# -- contents ------------------------------------------------------------------------------------------------------


def test_transforms_move_image_and_mask_together(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train", transforms=v2.RandomHorizontalFlip(p=1.0))
    image, mask = ds[0]
    plain_image, plain_mask = VOCSegmentation(voc_root, "train")[0]
    torch.testing.assert_close(image, plain_image.flip(-1))
    torch.testing.assert_close(mask, plain_mask.flip(-1))


# -- where the tree is ---------------------------------------------------------------------------------------------


def test_other_years_and_the_2011_trainval_nesting(tmp_path: Path) -> None:
    # The VOC2011 tar (and torchvision's download of it) unpacks to TrainVal/VOCdevkit/VOC2011.
    make_voc(tmp_path / "TrainVal", "2011", {"val": ["2011_000001"]})
    make_voc(tmp_path, "2007", {"train": ["000032"]})
    ds = VOCSegmentation(tmp_path, "val", year=2011)
    assert ds.year == "2011" and ds.voc_dir == tmp_path / "TrainVal" / "VOCdevkit" / "VOC2011"
    assert ds.ids == ["2011_000001"]
    assert VOCSegmentation(tmp_path, "train", year="2007").ids == ["000032"]


def test_a_renamed_year_folder_is_read(tmp_path: Path) -> None:
    voc_dir = make_voc(tmp_path, "2012", {"train": ["a"]})
    renamed = voc_dir.rename(tmp_path / "my_voc")
    assert VOCSegmentation(renamed, "train").voc_dir == renamed


# -- user errors, with their exact one-line messages ---------------------------------------------------------------


@pytest.mark.parametrize("year", ["2013", 2006, "twelve"])
def test_unknown_year(voc_root: Path, year: object) -> None:
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(voc_root, "train", year=year)
    assert msg(e) == f"--year {year!r}: expected a PASCAL VOC year from 2007 to 2012"


def test_year_folder_of_another_year(voc_root: Path) -> None:
    root = voc_root / "VOCdevkit" / "VOC2012"
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(root, "val", year="2011")
    assert msg(e) == f"{root}: this is the VOC2012 folder; expected VOC2011 (year 2011)"


def test_empty_split_file(voc_root: Path) -> None:
    split_file = voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split_file.write_text("\n  \n")
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(voc_root, "val")
    assert msg(e) == f"{split_file}: split file lists no ids; expected one image id per line"


def test_missing_mask_file_names_it(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train")
    ds.mask_path(0).unlink()
    with pytest.raises(ImageError) as e:
        ds[0]
    assert msg(e) == f"{ds.mask_path(0)}: cannot read mask (file not found)"


# -- download through torchvision (the shared checks: test_pascal.py) ----------------------------------------------


def test_download_needs_a_root() -> None:
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(None, "train", download=True)
    assert msg(e) == "--root: no dataset folder given; expected the folder to download VOC2012 into"
