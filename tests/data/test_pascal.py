"""What the PASCAL readers (voc, sbd, seg11valid) have in common, each check written once and parametrised over the
datasets: ids, items, paths, root forms, one-line errors, downloads through torchvision, the registry.

Each dataset's fake tree (its ids, sizes and writer) is defined in its own test file, which keeps the checks that
only that dataset has: VOC's years, SBD's ``.mat`` files, seg11valid's separate SBD root.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from torchvision import tv_tensors

from fcnseg.data.base import get_dataset
from fcnseg.data.sbd import SBDSegmentation
from fcnseg.data.seg11valid import Seg11Valid
from fcnseg.data.voc import VOCSegmentation
from fcnseg.errors import FcnsegError
from fcnseg.palette import VOC_CLASSES, voc_palette
from tests.data import test_sbd as sbd
from tests.data import test_seg11valid as seg11valid
from tests.data import test_voc as voc
from tests.data.fakes_voc import default_size, make_sbd, make_voc, sbd_mask, voc_mask


@dataclass(frozen=True)
class Case:
    """A dataset, the fake tree it reads and what it should find there."""

    name: str  # in the registry
    cls: type
    make: Callable[[Path], object]  # writes the fake tree under a root
    splits: dict[str, list[str]]  # each split's ids, in the split file's order; the first opens where any will do
    size_of: Callable[[str], tuple[int, int]]  # (H, W) of an id's image
    mask_of: Callable[[str, tuple[int, int]], np.ndarray]  # an id's mask as the fakes write it
    void: bool  # whether its masks hold 255
    folder: str  # the dataset folder under the root
    folder_attr: str  # the attribute that names it
    images: str  # an id's image, relative to the folder
    masks: str  # an id's mask, relative to the folder
    forms: str  # the root forms accepted, as the errors list them
    val_repr: str  # repr() of the val split
    attrs: dict[str, object] = field(default_factory=dict)  # further attributes the dataset states

    @property
    def split(self) -> str:
        return next(iter(self.splits))


VOC = Case(
    name="voc",
    cls=VOCSegmentation,
    make=voc.make_tree,
    splits=voc.SPLITS,
    size_of=voc.size_of,
    mask_of=voc_mask,
    void=True,
    folder="VOCdevkit/VOC2012",
    folder_attr="voc_dir",
    images="JPEGImages/{}.jpg",
    masks="SegmentationClass/{}.png",
    forms="the folder containing VOCdevkit/VOC2012, VOCdevkit itself or VOC2012",
    val_repr="VOCSegmentation(split='val', images=2, classes=21)",
    attrs={"year": "2012"},
)
SBD = Case(
    name="sbd",
    cls=SBDSegmentation,
    make=sbd.make_tree,
    splits={"train": sbd.TRAIN, "val": sbd.VAL},
    size_of=sbd.size_of,
    mask_of=sbd_mask,
    void=False,
    folder="benchmark_RELEASE/dataset",
    folder_attr="sbd_dir",
    images="img/{}.jpg",
    masks="cls/{}.mat",
    forms="the folder containing benchmark_RELEASE, benchmark_RELEASE itself or benchmark_RELEASE/dataset",
    val_repr="SBDSegmentation(split='val', images=2, classes=21)",
)
SEG11VALID = Case(
    name="seg11valid",
    cls=Seg11Valid,
    make=seg11valid.make_tree,
    splits={"val": seg11valid.KEPT},
    size_of=default_size,
    mask_of=voc_mask,  # VOC's void border, not SBD's masks
    void=True,
    folder="VOCdevkit/VOC2011",
    folder_attr="voc_dir",
    images="JPEGImages/{}.jpg",
    masks="SegmentationClass/{}.png",
    forms="the folder containing VOCdevkit/VOC2011, VOCdevkit itself or VOC2011",
    val_repr="Seg11Valid(split='val', images=6, classes=21)",
    attrs={"year": "2011", "excluded_ids": seg11valid.EXCLUDED},
)
CASES = [VOC, SBD, SEG11VALID]
DOWNLOADABLE = [VOC, SBD]
DOWNLOAD_HINT = "pass --download to fetch it"
VOC2011_HINT = "seg11valid needs the VOC2011 devkit (VOCtrainval_25-May-2011.tar) unpacked there"
SBD_TRAIN_HINT = "seg11valid reads SBD's train.txt from sbd_root (default: root)"


def _name(case: Case) -> str:
    return case.name


def msg(exc_info: pytest.ExceptionInfo) -> str:
    return str(exc_info.value)


# -- contents ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "split"), [pytest.param(c, s, id=f"{c.name}-{s}") for c in CASES for s in c.splits])
def test_ids_in_split_file_order(tmp_path: Path, case: Case, split: str) -> None:
    case.make(tmp_path)
    ds = case.cls(tmp_path, split)
    ids = case.splits[split]
    assert ds.ids == ids and len(ds) == len(ids) and ds.split == split
    for attr, value in case.attrs.items():
        assert getattr(ds, attr) == value, attr


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_items_are_uint8_images_and_int64_masks_equal_to_the_files(tmp_path: Path, case: Case) -> None:
    case.make(tmp_path)
    for split in case.splits:  # every item of every split
        ds = case.cls(tmp_path, split)
        for i, image_id in enumerate(ds.ids):
            image, mask = ds[i]
            h, w = case.size_of(image_id)
            assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
            assert image.dtype == torch.uint8 and image.shape == (3, h, w)
            assert mask.dtype == torch.int64 and mask.shape == (h, w)
            # Indices read as stored, void 255 included; never the palette colours.
            np.testing.assert_array_equal(mask.numpy(), case.mask_of(image_id, (h, w)))
            assert bool((mask == 255).any()) == case.void


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_paths_classes_and_palette(tmp_path: Path, case: Case) -> None:
    case.make(tmp_path)
    ds = case.cls(tmp_path, "val")
    folder = tmp_path / case.folder
    assert getattr(ds, case.folder_attr) == folder
    for i, image_id in enumerate(ds.ids):
        assert ds.image_path(i) == folder / case.images.format(image_id)
        assert ds.mask_path(i) == folder / case.masks.format(image_id)
    assert ds.classes == VOC_CLASSES and ds.num_classes == 21
    assert ds.classes[15] == "person"
    np.testing.assert_array_equal(ds.palette, voc_palette(21))
    assert repr(ds) == case.val_repr


# -- where the tree is ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "form"),
    [
        pytest.param(c, f, id=f"{c.name}-{f}")
        for c in DOWNLOADABLE
        for f in ["parent", c.folder.split("/")[0], c.folder]
    ],
)
@pytest.mark.parametrize("as_str", [False, True])
def test_all_root_forms(tmp_path: Path, case: Case, form: str, as_str: bool) -> None:
    case.make(tmp_path)
    root = tmp_path if form == "parent" else tmp_path / form
    ds = case.cls(str(root) if as_str else root, "train")
    assert getattr(ds, case.folder_attr) == tmp_path / case.folder
    assert ds.ids == case.splits["train"]


# -- user errors, with their exact one-line messages ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "split", "expected"),
    [
        pytest.param(VOC, "test", "--split 'test': voc has splits train, val, trainval", id="voc"),
        pytest.param(SBD, "trainval", "--split 'trainval': sbd has splits train, val", id="sbd"),
        pytest.param(SEG11VALID, "train", "--split 'train': seg11valid has splits val", id="seg11valid"),
    ],
)
def test_unknown_split(tmp_path: Path, case: Case, split: str, expected: str) -> None:
    case.make(tmp_path)
    with pytest.raises(FcnsegError) as e:
        case.cls(tmp_path, split)
    assert msg(e) == expected


@pytest.mark.parametrize("case", DOWNLOADABLE, ids=_name)
def test_no_root(case: Case) -> None:
    with pytest.raises(FcnsegError) as e:
        case.cls(None, "train")
    assert msg(e) == f"--root: no dataset folder given; expected {case.forms}"


@pytest.mark.parametrize("case", DOWNLOADABLE, ids=_name)
def test_missing_root(tmp_path: Path, case: Case) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FcnsegError) as e:
        case.cls(root, "train")
    assert msg(e) == f"{root}: folder not found; expected {case.forms}; {DOWNLOAD_HINT}"


def _voc2011_only(root: Path) -> None:
    (root / "VOCdevkit" / "VOC2011").mkdir(parents=True)


def _empty_sbd_folder(root: Path) -> None:
    (root / "benchmark_RELEASE" / "dataset").mkdir(parents=True)


def _voc2012_and_sbd(root: Path) -> None:
    make_voc(root, "2012", {"val": seg11valid.VAL11})
    make_sbd(root, seg11valid.SBD_TRAIN, seg11valid.SBD_VAL)


def _voc2011_without_sbd(root: Path) -> None:
    make_voc(root, "2011", {"val": seg11valid.VAL11})


@pytest.mark.parametrize(
    ("case", "make", "missing", "forms", "hint"),
    [
        pytest.param(VOC, _voc2011_only, VOC.folder, VOC.forms, DOWNLOAD_HINT, id="voc"),
        pytest.param(SBD, _empty_sbd_folder, SBD.folder, SBD.forms, DOWNLOAD_HINT, id="sbd"),
        pytest.param(SEG11VALID, _voc2012_and_sbd, SEG11VALID.folder, SEG11VALID.forms, VOC2011_HINT, id="seg11valid"),
        pytest.param(SEG11VALID, _voc2011_without_sbd, SBD.folder, SBD.forms, SBD_TRAIN_HINT, id="seg11valid-sbd"),
    ],
)
def test_root_without_the_tree(
    tmp_path: Path, case: Case, make: Callable[[Path], None], missing: str, forms: str, hint: str
) -> None:
    make(tmp_path)
    with pytest.raises(FcnsegError) as e:
        case.cls(tmp_path, case.split)
    assert msg(e) == f"{tmp_path}: no {missing} in it; expected {forms}; {hint}"


@pytest.mark.parametrize(
    ("case", "split", "split_file", "hint"),
    [
        pytest.param(VOC, "train", "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", DOWNLOAD_HINT, id="voc"),
        pytest.param(SBD, "val", "benchmark_RELEASE/dataset/val.txt", DOWNLOAD_HINT, id="sbd"),
        pytest.param(
            SEG11VALID, "val", "VOCdevkit/VOC2011/ImageSets/Segmentation/val.txt", VOC2011_HINT, id="seg11valid"
        ),
        pytest.param(SEG11VALID, "val", "benchmark_RELEASE/dataset/train.txt", SBD_TRAIN_HINT, id="seg11valid-sbd"),
    ],
)
def test_missing_split_file(tmp_path: Path, case: Case, split: str, split_file: str, hint: str) -> None:
    case.make(tmp_path)
    (tmp_path / split_file).unlink()
    with pytest.raises(FcnsegError) as e:
        case.cls(tmp_path, split)
    assert msg(e) == f"{tmp_path / split_file}: split file not found; expected {split_file}; {hint}"


@pytest.mark.parametrize(
    ("case", "sub", "what"),
    [
        pytest.param(VOC, "JPEGImages", "the devkit's <id>.jpg images", id="voc-JPEGImages"),
        pytest.param(VOC, "SegmentationClass", "the devkit's <id>.png class masks", id="voc-SegmentationClass"),
        pytest.param(SBD, "cls", "SBD's <id>.mat class masks", id="sbd-cls"),
    ],
)
def test_missing_image_or_mask_folder(tmp_path: Path, case: Case, sub: str, what: str) -> None:
    case.make(tmp_path)
    folder = tmp_path / case.folder / sub
    folder.rename(folder.with_name(sub + "_gone"))
    with pytest.raises(FcnsegError) as e:
        case.cls(tmp_path, "train")
    assert msg(e) == f"{folder}: folder not found; expected {what} there"


# -- download through torchvision (no internet here: the downloader is replaced by a fake tree writer) -------------


def _unpack_voc(root: Path, *, year: str, **_: object) -> None:
    # The VOC2011 tar (and torchvision's download of it) unpacks to TrainVal/VOCdevkit/VOC2011.
    make_voc(root / "TrainVal" if year == "2011" else root, year, voc.SPLITS)


def _unpack_sbd(root: Path, **_: object) -> None:
    sbd.make_flat_tree(root)  # torchvision's layout


# What the download through each torchvision class leaves in the root it is given.
UNPACK: dict[str, Callable[..., None]] = {"VOCSegmentation": _unpack_voc, "SBDataset": _unpack_sbd}


@pytest.fixture
def torchvision_downloads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    """torchvision's VOCSegmentation and SBDataset replaced by fakes that record each call (class name, arguments)
    and unpack a fake tree as the real download does."""
    calls: list[tuple[str, tuple, dict]] = []

    def fake(class_name: str) -> Callable[..., None]:
        def download(*args: object, **kwargs: object) -> None:
            calls.append((class_name, args, kwargs))
            UNPACK[class_name](Path(args[0]), **kwargs)

        return download

    for class_name in UNPACK:
        monkeypatch.setattr(torchvision.datasets, class_name, fake(class_name))
    return calls


CALL_VOC2012_VAL = ("VOCSegmentation", {"year": "2012", "image_set": "val", "download": True})
CALL_VOC2011_VAL = ("VOCSegmentation", {"year": "2011", "image_set": "val", "download": True})
CALL_SBD_TRAIN = ("SBDataset", {"image_set": "train", "mode": "segmentation", "download": True})
CALL_SBD_VAL = ("SBDataset", {"image_set": "val", "mode": "segmentation", "download": True})


@pytest.mark.parametrize(
    ("case", "split", "options", "call", "folder"),
    [
        pytest.param(VOC, "val", {"year": "2012"}, CALL_VOC2012_VAL, "VOCdevkit/VOC2012", id="voc-2012"),
        pytest.param(VOC, "val", {"year": "2011"}, CALL_VOC2011_VAL, "TrainVal/VOCdevkit/VOC2011", id="voc-2011"),
        pytest.param(SBD, "train", {}, CALL_SBD_TRAIN, ".", id="sbd"),
    ],
)
def test_download_calls_torchvision_then_reads_with_our_code(
    tmp_path: Path, torchvision_downloads: list, case: Case, split: str, options: dict, call: tuple, folder: str
) -> None:
    root = tmp_path / "data"  # does not exist yet
    ds = case.cls(root, split, **options, download=True)
    assert torchvision_downloads == [(call[0], (str(root),), call[1])]
    assert isinstance(ds, case.cls) and getattr(ds, case.folder_attr) == root / folder
    assert ds.ids == case.splits[split]
    mask = ds[0][1]
    assert mask.dtype == torch.int64
    np.testing.assert_array_equal(mask.numpy(), case.mask_of(ds.ids[0], default_size(ds.ids[0])))


@pytest.mark.parametrize(
    ("case", "form", "split"),
    [pytest.param(VOC, "VOCdevkit", "train", id="voc"), pytest.param(SBD, ".", "val", id="sbd")],
)
def test_download_is_skipped_when_the_split_is_there(
    tmp_path: Path, torchvision_downloads: list, case: Case, form: str, split: str
) -> None:
    case.make(tmp_path)
    assert case.cls(tmp_path / form, split, download=True).ids == case.splits[split]
    assert torchvision_downloads == []


@pytest.mark.parametrize(
    ("case", "class_name", "error", "expected"),
    [
        pytest.param(
            VOC,
            "VOCSegmentation",
            urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution"),
            "{root}: cannot download VOC2012 (<urlopen error [Errno -3] Temporary failure in name resolution>); "
            "expected internet access, or unpack the VOC2012 trainval tar into this folder yourself",
            id="voc",
        ),
        pytest.param(
            SBD,
            "SBDataset",
            RuntimeError("File not found or corrupted."),
            "{root}: cannot download SBD (File not found or corrupted.); expected internet access, or unpack "
            "benchmark.tgz into this folder yourself",
            id="sbd",
        ),
    ],
)
def test_download_failure_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case, class_name: str, error: Exception, expected: str
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(torchvision.datasets, class_name, offline)
    with pytest.raises(FcnsegError) as e:
        case.cls(tmp_path, case.split, download=True)
    assert msg(e) == expected.format(root=tmp_path)
    assert "\n" not in msg(e)


@pytest.mark.parametrize(
    ("case", "call"), [pytest.param(VOC, CALL_VOC2012_VAL, id="voc"), pytest.param(SBD, CALL_SBD_VAL, id="sbd")]
)
def test_cli_download_flag_reaches_the_downloader(
    tmp_path: Path, torchvision_downloads: list, capsys: pytest.CaptureFixture[str], case: Case, call: tuple
) -> None:
    from fcnseg.cli import main

    root = tmp_path / "data"
    args = ["check-data", "--dataset", case.name, "--root", str(root), "--split", "val", "--download", "--quiet"]
    code = main(args)
    assert torchvision_downloads == [(call[0], (str(root),), call[1])]
    assert code == 0  # the downloaded (fake) tree is clean
    # A dataset that cannot download says so instead of ignoring the flag.
    assert main(["check-data", "--dataset", "synthetic", "--split", "val", "--download", "--quiet"]) == 2
    assert "takes no option download" in capsys.readouterr().err


# -- registry ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_get_dataset(tmp_path: Path, case: Case) -> None:
    case.make(tmp_path)
    ds = get_dataset(case.name, root=tmp_path, split="val")
    assert isinstance(ds, case.cls) and ds.ids == case.splits["val"]
    assert repr(ds) == case.val_repr


@pytest.mark.parametrize(
    ("case", "form", "split", "options"),
    [
        pytest.param(VOC, ".", "train", {"year": 2012}, id="voc-year"),
        pytest.param(SEG11VALID, "VOCdevkit", "val", {"sbd_root": Path()}, id="seg11valid-sbd_root"),
    ],
)
def test_get_dataset_passes_the_options(tmp_path: Path, case: Case, form: str, split: str, options: dict) -> None:
    case.make(tmp_path)
    options = {k: tmp_path / v if isinstance(v, Path) else v for k, v in options.items()}  # paths: in the tree
    assert get_dataset(case.name, root=tmp_path / form, split=split, **options).ids == case.splits[split]
