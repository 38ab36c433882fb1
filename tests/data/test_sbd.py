import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets
from torchvision import tv_tensors

from fcnseg.data.base import get_dataset
from fcnseg.data.sbd import SBDSegmentation, _struct_field, read_sbd_mask
from fcnseg.errors import FcnsegError
from fcnseg.palette import VOC_CLASSES, voc_palette
from tests.data.fakes_voc import make_sbd, sbd_mask, write_sbd_mat

TRAIN = ["2008_000123", "2007_000032", "2011_003276", "2008_000045"]
VAL = ["2010_000002", "2007_000039"]
EXPECTED = "expected an SBD cls/<id>.mat file holding the struct GTcls with field Segmentation"


def size_of(image_id: str) -> tuple[int, int]:
    return (16 + int(image_id[-1]), 30)


@pytest.fixture
def sbd_root(tmp_path: Path) -> Path:
    make_sbd(tmp_path, TRAIN, VAL, size_fn=size_of)
    return tmp_path


def msg(exc_info: pytest.ExceptionInfo) -> str:
    return str(exc_info.value)


# -- the fake itself is in SBD's format ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dict", "record"])
def test_fake_mat_holds_a_matlab_struct_array(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "x.mat"
    seg = sbd_mask("x", (4, 5))
    write_sbd_mat(path, seg, layout=layout)
    gt = scipy.io.loadmat(path)["GTcls"]
    # loadmat's default reading of a MATLAB struct: a 1x1 structured array, one field per struct field.
    assert isinstance(gt, np.ndarray) and gt.shape == (1, 1)
    assert set(gt.dtype.names) == {"Segmentation", "Boundaries", "CategoriesPresent"}
    assert gt[0, 0]["Segmentation"].dtype == np.uint8
    np.testing.assert_array_equal(gt[0, 0]["Segmentation"], seg)
    assert gt[0, 0]["Boundaries"].shape == (20, 1)
    # and as MATLAB objects, the other reading the release's users rely on
    obj = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"]
    assert isinstance(obj, scipy.io.matlab.mat_struct)
    np.testing.assert_array_equal(obj.Segmentation, seg)


@pytest.mark.parametrize(
    "options",
    [{}, {"squeeze_me": True}, {"struct_as_record": False}, {"squeeze_me": True, "struct_as_record": False}],
)
def test_struct_field_understands_every_loadmat_layout(tmp_path: Path, options: dict) -> None:
    path = tmp_path / "x.mat"
    seg = sbd_mask("x", (4, 5))
    write_sbd_mat(path, seg)
    gt = scipy.io.loadmat(path, **options)["GTcls"]
    np.testing.assert_array_equal(_struct_field(gt, "Segmentation"), seg)
    assert _struct_field(gt, "Nope") is None


# -- contents ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "ids"), [("train", TRAIN), ("val", VAL)])
def test_ids_in_split_file_order(sbd_root: Path, split: str, ids: list[str]) -> None:
    ds = SBDSegmentation(sbd_root, split)
    assert ds.ids == ids and len(ds) == len(ids) and ds.split == split


def test_items_equal_the_files_and_have_no_void(sbd_root: Path) -> None:
    ds = SBDSegmentation(sbd_root, "train")
    for i, image_id in enumerate(ds.ids):
        image, mask = ds[i]
        h, w = size_of(image_id)
        assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
        assert image.dtype == torch.uint8 and image.shape == (3, h, w)
        assert mask.dtype == torch.int64 and mask.shape == (h, w)
        np.testing.assert_array_equal(mask.numpy(), sbd_mask(image_id, (h, w)))
        assert not (mask == 255).any()


def test_paths_classes_and_palette(sbd_root: Path) -> None:
    ds = SBDSegmentation(sbd_root, "val")
    sbd_dir = sbd_root / "benchmark_RELEASE" / "dataset"
    assert ds.image_path(0) == sbd_dir / "img" / f"{VAL[0]}.jpg"
    assert ds.mask_path(0) == sbd_dir / "cls" / f"{VAL[0]}.mat"
    assert ds.classes == VOC_CLASSES and ds.num_classes == 21
    np.testing.assert_array_equal(ds.palette, voc_palette(21))


def test_record_layout_files_are_read(tmp_path: Path) -> None:
    make_sbd(tmp_path, TRAIN, VAL, layout="record")
    ds = SBDSegmentation(tmp_path, "val")
    np.testing.assert_array_equal(ds[1][1].numpy(), sbd_mask(VAL[1], (20, 30)))


def test_values_above_20_are_kept(tmp_path: Path) -> None:
    seg = np.zeros((3, 4), np.uint8)
    seg[0, 0], seg[1, 1], seg[2, 2] = 30, 255, 20
    write_sbd_mat(tmp_path / "odd.mat", seg)
    out = read_sbd_mask(tmp_path / "odd.mat")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, seg)


def test_double_segmentation_is_accepted_when_it_holds_indices(tmp_path: Path) -> None:
    seg = sbd_mask("d", (3, 4))
    scipy.io.savemat(tmp_path / "d.mat", {"GTcls": {"Segmentation": seg.astype(np.float64)}})
    out = read_sbd_mask(tmp_path / "d.mat")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, seg)
    scipy.io.savemat(tmp_path / "bad.mat", {"GTcls": {"Segmentation": np.full((2, 2), 0.5)}})
    with pytest.raises(FcnsegError) as e:
        read_sbd_mask(tmp_path / "bad.mat")
    assert msg(e) == f"{tmp_path / 'bad.mat'}: GTcls.Segmentation holds values outside the class indices 0..255"


# -- damaged .mat files --------------------------------------------------------------------------------------------


def test_mat_without_gtcls(tmp_path: Path) -> None:
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(FcnsegError) as e:
        read_sbd_mask(path)
    assert msg(e) == f"{path}: no key 'GTcls'; {EXPECTED}"


def test_gtcls_without_segmentation(tmp_path: Path) -> None:
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"GTcls": {"Boundaries": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(FcnsegError) as e:
        read_sbd_mask(path)
    assert msg(e) == f"{path}: struct GTcls has no field 'Segmentation'; {EXPECTED}"


def test_segmentation_of_the_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"GTcls": {"Segmentation": np.zeros((2, 2, 3), np.uint8)}})
    with pytest.raises(FcnsegError) as e:
        read_sbd_mask(path)
    assert msg(e) == f"{path}: GTcls.Segmentation has shape (2, 2, 3) and dtype uint8; {EXPECTED}"


def test_missing_and_corrupt_mat(tmp_path: Path) -> None:
    with pytest.raises(FcnsegError) as e:
        read_sbd_mask(tmp_path / "gone.mat")
    assert msg(e) == f"{tmp_path / 'gone.mat'}: mask file not found; {EXPECTED}"
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a MATLAB file" * 20)
    with pytest.raises(FcnsegError) as e:
        read_sbd_mask(bad)
    assert msg(e).startswith(f"{bad}: cannot read .mat file (") and msg(e).endswith(f"); {EXPECTED}")
    assert "\n" not in msg(e)


# -- where the tree is ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["parent", "benchmark_RELEASE", "benchmark_RELEASE/dataset"])
def test_all_root_forms(sbd_root: Path, form: str) -> None:
    root = sbd_root if form == "parent" else sbd_root / form
    ds = SBDSegmentation(str(root), "train")
    assert ds.sbd_dir == sbd_root / "benchmark_RELEASE" / "dataset"
    assert ds.ids == TRAIN


def test_torchvision_flat_layout(tmp_path: Path) -> None:
    # torchvision's download moves img/, cls/ and the lists into its root, leaving an emptied dataset/ behind.
    sbd_dir = make_sbd(tmp_path, TRAIN, VAL)
    for name in ("img", "cls", "train.txt", "val.txt"):
        shutil.move(sbd_dir / name, tmp_path)
    ds = SBDSegmentation(tmp_path, "val")
    assert ds.sbd_dir == tmp_path and ds.ids == VAL


def test_unknown_split(sbd_root: Path) -> None:
    with pytest.raises(FcnsegError) as e:
        SBDSegmentation(sbd_root, "trainval")
    assert msg(e) == "--split 'trainval': sbd has splits train, val"


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FcnsegError) as e:
        SBDSegmentation(tmp_path / "nowhere", "train")
    assert msg(e) == (
        f"{tmp_path / 'nowhere'}: folder not found; expected the folder containing benchmark_RELEASE, "
        "benchmark_RELEASE itself or benchmark_RELEASE/dataset; pass --download to fetch it"
    )
    with pytest.raises(FcnsegError) as e:
        SBDSegmentation(None, "train")
    assert msg(e) == (
        "--root: no dataset folder given; expected the folder containing benchmark_RELEASE, "
        "benchmark_RELEASE itself or benchmark_RELEASE/dataset"
    )


def test_root_without_sbd(tmp_path: Path) -> None:
    (tmp_path / "benchmark_RELEASE" / "dataset").mkdir(parents=True)
    with pytest.raises(FcnsegError) as e:
        SBDSegmentation(tmp_path, "train")
    assert msg(e) == (
        f"{tmp_path}: no benchmark_RELEASE/dataset in it; expected the folder containing benchmark_RELEASE, "
        "benchmark_RELEASE itself or benchmark_RELEASE/dataset; pass --download to fetch it"
    )


def test_missing_split_file(sbd_root: Path) -> None:
    split_file = sbd_root / "benchmark_RELEASE" / "dataset" / "val.txt"
    split_file.unlink()
    with pytest.raises(FcnsegError) as e:
        SBDSegmentation(sbd_root, "val")
    assert msg(e) == (
        f"{split_file}: split file not found; expected benchmark_RELEASE/dataset/val.txt; pass --download to fetch it"
    )


def test_missing_mask_folder(sbd_root: Path) -> None:
    cls = sbd_root / "benchmark_RELEASE" / "dataset" / "cls"
    shutil.rmtree(cls)
    with pytest.raises(FcnsegError) as e:
        SBDSegmentation(sbd_root, "train")
    assert msg(e) == f"{cls}: folder not found; expected SBD's <id>.mat class masks there"


# -- download through torchvision (replaced by a fake that leaves torchvision's layout) -----------------------------


class FakeSBDataset:
    calls: list[tuple[tuple, dict]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        type(self).calls.append((args, kwargs))
        root = Path(args[0])
        sbd_dir = make_sbd(root, TRAIN, VAL)
        for name in ("img", "cls", "train.txt", "val.txt"):
            shutil.move(sbd_dir / name, root)


@pytest.fixture
def fake_tv_sbd(monkeypatch: pytest.MonkeyPatch) -> type[FakeSBDataset]:
    monkeypatch.setattr(FakeSBDataset, "calls", [])
    monkeypatch.setattr(torchvision.datasets, "SBDataset", FakeSBDataset)
    return FakeSBDataset


def test_download_calls_torchvision_then_reads_with_our_code(tmp_path: Path, fake_tv_sbd: type[FakeSBDataset]) -> None:
    root = tmp_path / "sbd"
    ds = SBDSegmentation(root, "train", download=True)
    assert fake_tv_sbd.calls == [
        ((str(root),), {"image_set": "train", "mode": "segmentation", "download": True}),
    ]
    assert isinstance(ds, SBDSegmentation) and ds.sbd_dir == root and ds.ids == TRAIN
    np.testing.assert_array_equal(ds[0][1].numpy(), sbd_mask(TRAIN[0], (20, 30)))


def test_download_is_skipped_when_the_split_is_there(sbd_root: Path, fake_tv_sbd: type[FakeSBDataset]) -> None:
    assert SBDSegmentation(sbd_root, "val", download=True).ids == VAL
    assert fake_tv_sbd.calls == []


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(*args: object, **kwargs: object) -> None:
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "SBDataset", corrupt)
    with pytest.raises(FcnsegError) as e:
        SBDSegmentation(tmp_path, "val", download=True)
    assert msg(e) == (
        f"{tmp_path}: cannot download SBD (File not found or corrupted.); expected internet access, or unpack "
        "benchmark.tgz into this folder yourself"
    )


def test_get_dataset(sbd_root: Path) -> None:
    ds = get_dataset("sbd", root=sbd_root, split="val")
    assert isinstance(ds, SBDSegmentation) and ds.ids == VAL


def test_one_row_mask_keeps_its_shape(tmp_path: Path) -> None:
    seg = sbd_mask("row", (1, 7))
    write_sbd_mat(tmp_path / "row.mat", seg)
    out = read_sbd_mask(tmp_path / "row.mat")
    assert out.shape == (1, 7)
    np.testing.assert_array_equal(out, seg)
