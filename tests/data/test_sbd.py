"""SBD: the fake tree these tests and ``test_pascal.py`` read, and the checks only SBD has (its MATLAB ``.mat``
masks, torchvision's flat layout). What sbd shares with voc and seg11valid is checked once for all three in
``test_pascal.py``.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from fcnseg.data.sbd import SBDSegmentation, _struct_field, read_sbd_mask
from fcnseg.errors import FcnsegError
from tests.data.fakes_voc import make_sbd, sbd_mask, write_sbd_mat

TRAIN = ["2008_000123", "2007_000032", "2011_003276", "2008_000045"]
VAL = ["2010_000002", "2007_000039"]
EXPECTED = "expected an SBD cls/<id>.mat file holding the struct GTcls with field Segmentation"


def size_of(image_id: str) -> tuple[int, int]:
    return (16 + int(image_id[-1]), 30)


def make_tree(root: Path) -> None:
    make_sbd(root, TRAIN, VAL, size_fn=size_of)


def make_flat_tree(root: Path) -> None:
    """What torchvision's download leaves: img/, cls/ and the lists moved into its root, an emptied dataset/ behind."""
    sbd_dir = make_sbd(root, TRAIN, VAL)
    for name in ("img", "cls", "train.txt", "val.txt"):
        shutil.move(sbd_dir / name, root)


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


def test_one_row_mask_keeps_its_shape(tmp_path: Path) -> None:
    seg = sbd_mask("row", (1, 7))
    write_sbd_mat(tmp_path / "row.mat", seg)
    out = read_sbd_mask(tmp_path / "row.mat")
    assert out.shape == (1, 7)
    np.testing.assert_array_equal(out, seg)


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


def test_torchvision_flat_layout(tmp_path: Path) -> None:
    make_flat_tree(tmp_path)
    ds = SBDSegmentation(tmp_path, "val")
    assert ds.sbd_dir == tmp_path and ds.ids == VAL
