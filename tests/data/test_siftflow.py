"""SIFT Flow on a fake tree in the release's formats: JPEG images, SemanticLabels and GeoLabels .mat files (key S)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from fcnseg.cli import main
from fcnseg.data.base import get_dataset
from fcnseg.data.check import check_dataset
from fcnseg.data.siftflow import (
    SIFTFLOW_ABSENT_IN_TEST,
    SIFTFLOW_CLASSES,
    SIFTFLOW_FOLDER,
    SIFTFLOW_GEO_CLASSES,
    SIFTFlowSegmentation,
    read_geo_labels,
    read_semantic_labels,
)
from fcnseg.errors import FcnsegError, ImageError
from tests.helpers import find_window

SUB = "spatial_envelope_256x256_static_8outdoorcategories"
TRAIN = ["coast_natu975", "street_par177", "mountain_nat116", "highway_bost374"]
TEST = ["forest_for114", "tallbuilding_sky7"]
SIZE = (16, 20)  # (H, W); the release's are 256x256, not square here so H/W mix-ups show
SEM_EXPECTED = f"expected a SIFT Flow SemanticLabels/{SUB}/<id>.mat file with key 'S' (0 = void, 1..33 = classes)"
GEO_EXPECTED = (
    f"expected a SIFT Flow GeoLabels/{SUB}/<id>.mat file with key 'S' (-1 = void, 1 sky, 2 horizontal, 3 vertical)"
)


def _rng(image_id: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{salt}:{image_id}".encode()))


def sem_of(image_id: str) -> np.ndarray:
    """Semantic labels as stored (double, MATLAB's default): 0 = void, 1..33; both ends present."""
    s = _rng(image_id, "sem").integers(0, 34, SIZE).astype(np.float64)
    s[0, 0], s[0, 1], s[1, 0] = 0, 33, 1
    return s


def geo_of(image_id: str) -> np.ndarray:
    """Geometric labels as stored: -1 = void, 1 sky, 2 horizontal, 3 vertical; every value present."""
    g = _rng(image_id, "geo").choice(np.array([-1, 1, 2, 3]), SIZE).astype(np.float64)
    g[0, :4] = [-1, 1, 2, 3]
    return g


def image_of(image_id: str) -> np.ndarray:
    return _rng(image_id, "img").integers(0, 256, (*SIZE, 3), dtype=np.uint8)


def write_item(root: Path, image_id: str) -> None:
    for top in ("Images", "SemanticLabels", "GeoLabels"):
        (root / top / SUB).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_of(image_id)).save(root / "Images" / SUB / f"{image_id}.jpg", format="JPEG", quality=90)
    scipy.io.savemat(root / "SemanticLabels" / SUB / f"{image_id}.mat", {"S": sem_of(image_id)})
    scipy.io.savemat(root / "GeoLabels" / SUB / f"{image_id}.mat", {"S": geo_of(image_id)})


def make_siftflow(root: Path, train_name: str = "train.txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / train_name).write_text("".join(f"{i}\n" for i in TRAIN))
    (root / "test.txt").write_text("".join(f"{i}\n" for i in TEST))
    for image_id in TRAIN + TEST:
        write_item(root, image_id)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_siftflow(tmp_path / "siftflow")


def expected_sem(image_id: str) -> np.ndarray:
    s = sem_of(image_id).astype(np.int64)
    return np.where(s == 0, 255, s - 1)


def expected_geo(image_id: str) -> np.ndarray:
    g = geo_of(image_id).astype(np.int64)
    return np.where(g == -1, 255, g - 1)


def decoded(path: Path) -> np.ndarray:
    """The fake JPEG as PIL decodes it (JPEG is lossy: compare with this, not with what was encoded)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


# -- constants --------------------------------------------------------------------------------------------------------


def test_class_lists_and_constants(root: Path) -> None:
    assert SIFTFLOW_FOLDER == SUB
    assert len(SIFTFLOW_CLASSES) == 33 and SIFTFLOW_CLASSES[0] == "awning" and SIFTFLOW_CLASSES[-1] == "window"
    assert SIFTFLOW_GEO_CLASSES == ("sky", "horizontal", "vertical")
    assert SIFTFLOW_ABSENT_IN_TEST == ("cow", "desert", "moon")
    assert [SIFTFLOW_CLASSES.index(c) for c in SIFTFLOW_ABSENT_IN_TEST] == [8, 10, 15]
    ds = SIFTFlowSegmentation(root, "test")
    assert ds.absent_in_test == SIFTFLOW_ABSENT_IN_TEST and ds.geo_classes == SIFTFLOW_GEO_CLASSES
    assert ds.classes == SIFTFLOW_CLASSES and ds.num_classes == 33 and ds.palette.shape == (33, 3)
    geo = SIFTFlowSegmentation(root, "test", target="geometric")
    assert geo.classes == SIFTFLOW_GEO_CLASSES and geo.num_classes == 3
    both = SIFTFlowSegmentation(root, "test", target="both")
    assert both.classes == SIFTFLOW_CLASSES and both.geo_palette.shape == (3, 3)
    assert repr(both) == "SIFTFlowSegmentation(split='test', images=2, classes=33, target='both')"


def test_fake_labels_are_stored_as_the_release_stores_them(root: Path) -> None:
    g = scipy.io.loadmat(root / "GeoLabels" / SUB / f"{TRAIN[0]}.mat")["S"]
    assert g.shape == SIZE and g.min() == -1 and set(np.unique(g)) == {-1, 1, 2, 3}
    s = scipy.io.loadmat(root / "SemanticLabels" / SUB / f"{TRAIN[0]}.mat")["S"]
    assert s.shape == SIZE and s.min() == 0 and s.max() == 33


# -- contents ---------------------------------------------------------------------------------------------------------


def test_splits_and_paths(root: Path) -> None:
    train, test = SIFTFlowSegmentation(root, "train"), SIFTFlowSegmentation(root, "test")
    assert train.ids == TRAIN and test.ids == TEST and len(train) + len(test) == 6
    assert SIFTFlowSegmentation(root, "trainval").ids == TRAIN  # FCN's name for the same list
    assert train.image_path(1) == root / "Images" / SUB / "street_par177.jpg"
    assert train.mask_path(1) == root / "SemanticLabels" / SUB / "street_par177.mat"
    geo = SIFTFlowSegmentation(root, "train", target="geometric")
    assert geo.mask_path(1) == root / "GeoLabels" / SUB / "street_par177.mat"


def test_trainval_txt_of_fcns_release_is_read(tmp_path: Path) -> None:
    root = make_siftflow(tmp_path / "s", train_name="trainval.txt")
    assert SIFTFlowSegmentation(root, "train").ids == TRAIN
    assert SIFTFlowSegmentation(root, "trainval").ids == TRAIN


@pytest.mark.parametrize("target", ["semantic", "geometric"])
def test_single_target_masks_are_exact(root: Path, target: str) -> None:
    ds = SIFTFlowSegmentation(root, "train", target=target)
    for i, image_id in enumerate(TRAIN):
        image, mask = ds[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, *SIZE)
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), decoded(ds.image_path(i)))
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == SIZE
        want = expected_sem(image_id) if target == "semantic" else expected_geo(image_id)
        np.testing.assert_array_equal(mask.numpy(), want)
    if target == "semantic":
        assert mask[0, 0] == 255 and mask[0, 1] == 32 and mask[1, 0] == 0
    else:
        assert mask[0, :4].tolist() == [255, 0, 1, 2]


def test_both_targets_give_a_two_channel_mask(root: Path) -> None:
    ds = SIFTFlowSegmentation(root, "test", target="both")
    for i, image_id in enumerate(TEST):
        image, mask = ds[i]
        assert image.shape == (3, *SIZE)
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (2, *SIZE)
        np.testing.assert_array_equal(mask[0].numpy(), expected_sem(image_id))
        np.testing.assert_array_equal(mask[1].numpy(), expected_geo(image_id))
    # load_pair stays the H x W mask of ``classes`` (what previews and check-data use)
    _, sem = ds.load_pair(0)
    np.testing.assert_array_equal(sem, expected_sem(TEST[0]))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float64])
def test_label_dtypes(tmp_path: Path, dtype: type) -> None:
    scipy.io.savemat(tmp_path / "g.mat", {"S": np.array([[-1, 1, 2, 3]], dtype)})
    np.testing.assert_array_equal(read_geo_labels(tmp_path / "g.mat"), [[255, 0, 1, 2]])
    scipy.io.savemat(tmp_path / "s.mat", {"S": np.array([[0, 1, 33, 34]], dtype)})
    out = read_semantic_labels(tmp_path / "s.mat")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[255, 0, 32, 33]])  # 34 is kept for check-data to report


def test_geo_zero_is_void_like_fcns_reader(tmp_path: Path) -> None:
    scipy.io.savemat(tmp_path / "g.mat", {"S": np.array([[0, -1, 3]], np.int16)})
    np.testing.assert_array_equal(read_geo_labels(tmp_path / "g.mat"), [[255, 255, 2]])
    scipy.io.savemat(tmp_path / "s.mat", {"S": np.array([[-1, 1]], np.int16)})
    with pytest.raises(FcnsegError) as e:
        read_semantic_labels(tmp_path / "s.mat")
    assert (
        str(e.value) == f"{tmp_path / 's.mat'}: 'S' holds values -1, outside the labels 1..255 and void; {SEM_EXPECTED}"
    )


def test_get_dataset_and_options(root: Path) -> None:
    ds = get_dataset("siftflow", root=root, split="test", target="both")
    assert isinstance(ds, SIFTFlowSegmentation) and ds[0][1].shape == (2, *SIZE)
    with pytest.raises(FcnsegError) as e:
        get_dataset("siftflow", root=root, target="geo")
    assert str(e.value) == "target 'geo': expected one of semantic, geometric, both"
    with pytest.raises(FcnsegError) as e:
        SIFTFlowSegmentation(root, "val")
    assert str(e.value) == "--split 'val': siftflow has splits train, trainval, test"


# -- errors -----------------------------------------------------------------------------------------------------------


def test_missing_key_names_the_file_and_the_key(root: Path) -> None:
    path = root / "GeoLabels" / SUB / f"{TEST[1]}.mat"
    scipy.io.savemat(path, {"G": geo_of(TEST[1])})
    ds = SIFTFlowSegmentation(root, "test", target="both")
    ds[0]
    with pytest.raises(FcnsegError) as e:
        ds[1]
    assert str(e.value) == f"{path}: no key 'S' (it holds 'G'); {GEO_EXPECTED}"
    with pytest.raises(FcnsegError) as e:
        SIFTFlowSegmentation(root, "test", target="geometric")[1]
    assert str(e.value) == f"{path}: no key 'S' (it holds 'G'); {GEO_EXPECTED}"
    SIFTFlowSegmentation(root, "test")[1]  # the semantic target never reads it


def test_missing_split_file(root: Path) -> None:
    (root / "train.txt").unlink()
    with pytest.raises(FcnsegError) as e:
        SIFTFlowSegmentation(root, "train")
    assert str(e.value) == (
        f"{root / 'train.txt'}: split file not found; expected train.txt (or trainval.txt) in the SIFT Flow folder, "
        "one id (e.g. coast_natu975) a line, as in FCN's data/sift-flow/"
    )
    (root / "test.txt").write_text("")
    with pytest.raises(FcnsegError) as e:
        SIFTFlowSegmentation(root, "test")
    assert str(e.value) == (
        f"{root / 'test.txt'}: split file lists no ids; expected one image id (e.g. coast_natu975) a line"
    )


def test_missing_folders(root: Path) -> None:
    geo_dir = root / "GeoLabels" / SUB
    for f in geo_dir.iterdir():
        f.unlink()
    geo_dir.rmdir()
    SIFTFlowSegmentation(root, "test")
    with pytest.raises(FcnsegError) as e:
        SIFTFlowSegmentation(root, "test", target="both")
    assert str(e.value) == f"{geo_dir}: folder not found; expected SIFT Flow's <id>.mat geometric labels there"
    with pytest.raises(FcnsegError, match="folder not found; expected the SIFT Flow folder holding Images"):
        SIFTFlowSegmentation(root / "nope")


def test_id_in_split_without_files(root: Path) -> None:
    (root / "test.txt").write_text(f"{TEST[0]}\ncoast_ghost1\n")
    ds = SIFTFlowSegmentation(root, "test")
    with pytest.raises(ImageError) as e:
        ds[1]
    assert str(e.value) == f"{root / 'Images' / SUB / 'coast_ghost1.jpg'}: cannot read image (file not found)"


def test_geo_and_semantic_of_different_sizes(root: Path) -> None:
    path = root / "GeoLabels" / SUB / f"{TEST[0]}.mat"
    scipy.io.savemat(path, {"S": np.ones((4, 5))})
    with pytest.raises(FcnsegError) as e:
        SIFTFlowSegmentation(root, "test", target="both")[0]
    assert str(e.value) == (
        f"{path}: geometric labels are 5x4 but the semantic labels {TEST[0]}.mat are 20x16; expected the same size"
    )


# -- check-data -------------------------------------------------------------------------------------------------------


def test_check_data_passes_on_a_clean_tree(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", "--dataset", "siftflow", "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "siftflow split 'train': 4 images, 4 read cleanly"
    assert "no problems" in out and "fcnseg: error" not in err
    report = check_dataset(SIFTFlowSegmentation(root, "test", target="geometric"))
    assert report.ok and report.clean == 2
    assert report.class_pixels == [sum(int((expected_geo(i) == k).sum()) for i in TEST) for k in range(3)]
    assert report.void_pixels == sum(int((expected_geo(i) == 255).sum()) for i in TEST)


def test_check_data_reports_seeded_problems(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sem = sem_of(TRAIN[0])
    sem[3, 3] = 40  # class index 39: no class
    scipy.io.savemat(root / "SemanticLabels" / SUB / f"{TRAIN[0]}.mat", {"S": sem})
    geo = geo_of(TRAIN[1])
    geo[2, 2] = 5  # geometric index 4: no class
    scipy.io.savemat(root / "GeoLabels" / SUB / f"{TRAIN[1]}.mat", {"S": geo})
    (root / "GeoLabels" / SUB / f"{TRAIN[2]}.mat").unlink()
    scipy.io.savemat(root / "GeoLabels" / SUB / f"{TRAIN[3]}.mat", {"S": np.ones((3, 3))})
    (root / "test.txt").write_text(f"{TEST[0]}\n{TRAIN[3]}\n")
    assert main(["check-data", "--dataset", "siftflow", "--root", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()
    sem_dir, geo_dir, img_dir = (root / top / SUB for top in ("SemanticLabels", "GeoLabels", "Images"))
    assert err == "fcnseg: error: 5 problem(s) in siftflow split(s) train, test\n"  # every split; TRAIN[3] once
    assert sorted(out.splitlines()) == sorted(
        line
        for line in [
            f"{sem_dir / TRAIN[0]}.mat: values 39 (1 px) are neither a class index 0..32 nor 255 (void) "
            "[bad-mask-values]",
            f"{geo_dir / TRAIN[1]}.mat: geometric values 4 are neither a class index 0..2 nor 255 (void) "
            "[bad-mask-values]",
            f"{img_dir / TRAIN[2]}.jpg: its geometric labels {geo_dir / TRAIN[2]}.mat do not exist "
            "[image-without-mask]",
            f"{geo_dir / TRAIN[3]}.mat: geometric labels are 3x3 but the image {TRAIN[3]}.jpg is 20x16; expected "
            "the same size [size-mismatch]",
            f"{root / 'test.txt'}: 1 id(s) also in train.txt: {TRAIN[3]} [split-overlap]",
        ]
    )


def test_check_data_of_the_geometric_target_checks_the_semantic_labels(root: Path) -> None:
    scipy.io.savemat(root / "SemanticLabels" / SUB / f"{TEST[1]}.mat", {"labels": sem_of(TEST[1])})
    report = check_dataset(SIFTFlowSegmentation(root, "test", target="geometric"))
    assert [(p.file, p.kind, p.message) for p in report.problems] == [
        (
            str(root / "SemanticLabels" / SUB / f"{TEST[1]}.mat"),
            "unreadable-mask",
            f"no key 'S' (it holds 'labels'); {SEM_EXPECTED}",
        )
    ]


# -- paired transforms move the two-channel mask with the image ----------------------------------------------------


def test_flip_and_crop_keep_both_masks_aligned(root: Path) -> None:
    plain = SIFTFlowSegmentation(root, "train", target="both")
    tf = v2.Compose([v2.RandomHorizontalFlip(p=0.5), v2.RandomCrop((11, 13))])
    ds = SIFTFlowSegmentation(root, "train", transforms=tf, target="both")
    flips = set()
    torch.manual_seed(0)
    for _ in range(5):
        for i in range(len(ds)):
            image0, mask0 = plain[i]
            image, mask = ds[i]
            assert isinstance(mask, tv_tensors.Mask) and mask.shape == (2, 11, 13) and image.shape == (3, 11, 13)
            where = find_window(image0.as_subclass(torch.Tensor), image.as_subclass(torch.Tensor))
            assert len(where) == 1
            flipped, top, left = where[0]
            m0 = mask0.as_subclass(torch.Tensor)
            m0 = m0.flip(-1) if flipped else m0
            assert torch.equal(mask.as_subclass(torch.Tensor), m0[:, top : top + 11, left : left + 13])
            flips.add(flipped)
    assert flips == {False, True}
