import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from fcnseg.data.base import get_dataset
from fcnseg.data.voc import VOCSegmentation
from fcnseg.errors import FcnsegError, ImageError
from fcnseg.palette import VOC_CLASSES, voc_palette
from tests.data.fakes_voc import make_voc, voc_mask

# Deliberately not sorted: the split file's order is the dataset's order.
TRAIN = ["2008_000009", "2007_000033", "2008_000002"]
VAL = ["2009_000001", "2007_000129"]
SPLITS = {"train": TRAIN, "val": VAL, "trainval": TRAIN + VAL}


def size_of(image_id: str) -> tuple[int, int]:
    # Sizes differ per image so a mix-up between items (or between H and W) shows.
    return (18 + int(image_id[-1]), 30)


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    make_voc(tmp_path, "2012", SPLITS, size_fn=size_of)
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


@pytest.mark.parametrize("split", ["train", "val", "trainval"])
def test_ids_in_split_file_order(voc_root: Path, split: str) -> None:
    ds = VOCSegmentation(voc_root, split)
    assert ds.ids == SPLITS[split]
    assert len(ds) == len(SPLITS[split])
    assert ds.split == split and ds.year == "2012"


def test_items_are_uint8_images_and_int64_masks_equal_to_the_files(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "trainval")
    for i, image_id in enumerate(ds.ids):
        image, mask = ds[i]
        h, w = size_of(image_id)
        assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
        assert image.dtype == torch.uint8 and image.shape == (3, h, w)
        assert mask.dtype == torch.int64 and mask.shape == (h, w)
        # Indices read as stored, void 255 included; never the palette colours.
        np.testing.assert_array_equal(mask.numpy(), voc_mask(image_id, (h, w)))
        assert (mask == 255).any()


def test_paths_classes_and_palette(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "val")
    voc_dir = voc_root / "VOCdevkit" / "VOC2012"
    assert ds.image_path(1) == voc_dir / "JPEGImages" / f"{VAL[1]}.jpg"
    assert ds.mask_path(1) == voc_dir / "SegmentationClass" / f"{VAL[1]}.png"
    assert ds.classes == VOC_CLASSES and ds.num_classes == 21
    assert ds.classes[15] == "person"
    np.testing.assert_array_equal(ds.palette, voc_palette(21))
    assert repr(ds) == "VOCSegmentation(split='val', images=2, classes=21)"


def test_transforms_move_image_and_mask_together(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train", transforms=v2.RandomHorizontalFlip(p=1.0))
    image, mask = ds[0]
    plain_image, plain_mask = VOCSegmentation(voc_root, "train")[0]
    torch.testing.assert_close(image, plain_image.flip(-1))
    torch.testing.assert_close(mask, plain_mask.flip(-1))


# -- where the tree is ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["parent", "VOCdevkit", "VOCdevkit/VOC2012"])
@pytest.mark.parametrize("as_str", [False, True])
def test_all_root_forms(voc_root: Path, form: str, as_str: bool) -> None:
    root = voc_root if form == "parent" else voc_root / form
    ds = VOCSegmentation(str(root) if as_str else root, "train")
    assert ds.voc_dir == voc_root / "VOCdevkit" / "VOC2012"
    assert ds.ids == TRAIN


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


def test_unknown_split(voc_root: Path) -> None:
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(voc_root, "test")
    assert msg(e) == "--split 'test': voc has splits train, val, trainval"


@pytest.mark.parametrize("year", ["2013", 2006, "twelve"])
def test_unknown_year(voc_root: Path, year: object) -> None:
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(voc_root, "train", year=year)
    assert msg(e) == f"--year {year!r}: expected a PASCAL VOC year from 2007 to 2012"


def test_no_root() -> None:
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(None, "train")
    assert msg(e) == (
        "--root: no dataset folder given; expected the folder containing VOCdevkit/VOC2012, VOCdevkit itself or VOC2012"
    )


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(root, "train")
    assert msg(e) == (
        f"{root}: folder not found; expected the folder containing VOCdevkit/VOC2012, VOCdevkit itself or VOC2012; "
        "pass --download to fetch it"
    )


def test_root_without_the_devkit(tmp_path: Path) -> None:
    (tmp_path / "VOCdevkit" / "VOC2011").mkdir(parents=True)
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(tmp_path, "train")
    assert msg(e) == (
        f"{tmp_path}: no VOCdevkit/VOC2012 in it; expected the folder containing VOCdevkit/VOC2012, VOCdevkit "
        "itself or VOC2012; pass --download to fetch it"
    )


def test_year_folder_of_another_year(voc_root: Path) -> None:
    root = voc_root / "VOCdevkit" / "VOC2012"
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(root, "val", year="2011")
    assert msg(e) == f"{root}: this is the VOC2012 folder; expected VOC2011 (year 2011)"


def test_missing_split_file(tmp_path: Path) -> None:
    voc_dir = make_voc(tmp_path, "2012", {"val": VAL})
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(tmp_path, "train")
    assert msg(e) == (
        f"{voc_dir / 'ImageSets' / 'Segmentation' / 'train.txt'}: split file not found; "
        "expected VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt; pass --download to fetch it"
    )


def test_empty_split_file(voc_root: Path) -> None:
    split_file = voc_root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "val.txt"
    split_file.write_text("\n  \n")
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(voc_root, "val")
    assert msg(e) == f"{split_file}: split file lists no ids; expected one image id per line"


@pytest.mark.parametrize(
    ("sub", "what"), [("JPEGImages", "<id>.jpg images"), ("SegmentationClass", "<id>.png class masks")]
)
def test_missing_image_or_mask_folder(voc_root: Path, sub: str, what: str) -> None:
    folder = voc_root / "VOCdevkit" / "VOC2012" / sub
    folder.rename(folder.with_name(sub + "_gone"))
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(voc_root, "train")
    assert msg(e) == f"{folder}: folder not found; expected the devkit's {what} there"


def test_missing_mask_file_names_it(voc_root: Path) -> None:
    ds = VOCSegmentation(voc_root, "train")
    ds.mask_path(0).unlink()
    with pytest.raises(ImageError) as e:
        ds[0]
    assert msg(e) == f"{ds.mask_path(0)}: cannot read mask (file not found)"


# -- download through torchvision (no internet here: the downloader is replaced by a fake tree writer) -------------


class FakeTorchvisionVOC:
    """Stands in for torchvision.datasets.VOCSegmentation: records the call and unpacks a fake tree as the tar does."""

    calls: list[tuple[tuple, dict]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        type(self).calls.append((args, kwargs))
        root, year = Path(args[0]), kwargs["year"]
        make_voc(root / "TrainVal" if year == "2011" else root, year, SPLITS)


@pytest.fixture
def fake_tv_voc(monkeypatch: pytest.MonkeyPatch) -> type[FakeTorchvisionVOC]:
    monkeypatch.setattr(FakeTorchvisionVOC, "calls", [])
    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", FakeTorchvisionVOC)
    return FakeTorchvisionVOC


@pytest.mark.parametrize("year", ["2012", "2011"])
def test_download_calls_torchvision_then_reads_with_our_code(
    tmp_path: Path, fake_tv_voc: type[FakeTorchvisionVOC], year: str
) -> None:
    root = tmp_path / "data"  # does not exist yet
    ds = VOCSegmentation(root, "val", year=year, download=True)
    assert fake_tv_voc.calls == [((str(root),), {"year": year, "image_set": "val", "download": True})]
    assert isinstance(ds, VOCSegmentation) and ds.ids == VAL
    assert ds[0][1].dtype == torch.int64


def test_download_is_skipped_when_the_split_is_there(voc_root: Path, fake_tv_voc: type[FakeTorchvisionVOC]) -> None:
    assert VOCSegmentation(voc_root / "VOCdevkit", "train", download=True).ids == TRAIN
    assert fake_tv_voc.calls == []


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", offline)
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(tmp_path, "train", download=True)
    assert msg(e) == (
        f"{tmp_path}: cannot download VOC2012 (<urlopen error [Errno -3] Temporary failure in name resolution>); "
        "expected internet access, or unpack the VOC2012 trainval tar into this folder yourself"
    )
    assert "\n" not in msg(e)


# -- registry ------------------------------------------------------------------------------------------------------


def test_get_dataset(voc_root: Path) -> None:
    ds = get_dataset("voc", root=voc_root, split="val")
    assert isinstance(ds, VOCSegmentation) and ds.ids == VAL
    assert get_dataset("voc", root=voc_root, split="train", year=2012).ids == TRAIN
    assert re.fullmatch(r"VOCSegmentation\(split='val', images=2, classes=21\)", repr(ds))


def test_download_needs_a_root() -> None:
    with pytest.raises(FcnsegError) as e:
        VOCSegmentation(None, "train", download=True)
    assert msg(e) == "--root: no dataset folder given; expected the folder to download VOC2012 into"


def test_cli_download_flag_reaches_the_downloader(
    tmp_path: Path, fake_tv_voc: type[FakeTorchvisionVOC], capsys: pytest.CaptureFixture[str]
) -> None:
    from fcnseg.cli import main

    root = tmp_path / "data"
    code = main(["check-data", "--dataset", "voc", "--root", str(root), "--split", "val", "--download", "--quiet"])
    assert fake_tv_voc.calls == [((str(root),), {"year": "2012", "image_set": "val", "download": True})]
    assert code == 0  # the downloaded (fake) tree is clean
    # A dataset that cannot download says so instead of ignoring the flag.
    assert main(["check-data", "--dataset", "synthetic", "--split", "val", "--download", "--quiet"]) == 2
    assert "takes no option download" in capsys.readouterr().err
