"""NYUDv2 on a fake tree in FCN's exact formats: RGB, 16-bit depth and HHA PNGs, .mat masks, split files."""

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
from fcnseg.data.nyud import (
    DEPTH_MAX_MM,
    NYUD_CLASSES,
    NYUDSegmentation,
    encode_depth,
    read_depth,
    read_nyud_mask,
)
from fcnseg.errors import FcnsegError, ImageError
from tests.helpers import find_window

TRAIN = ["5003", "5001", "5010"]
VAL = ["5020", "5021"]
TEST = ["6449", "5100"]
EXPECTED = "expected a NYUDv2 segmentation/img_<id>.mat file with key 'segmentation' (0 = void, 1..40 = classes)"


def size_of(image_id: str) -> tuple[int, int]:
    """(H, W): small, not square, and not the same for every id."""
    return (12 + int(image_id) % 3, 17)


def _rng(image_id: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{salt}:{image_id}".encode()))


def rgb_of(image_id: str) -> np.ndarray:
    return _rng(image_id, "rgb").integers(0, 256, (*size_of(image_id), 3), dtype=np.uint8)


def hha_of(image_id: str) -> np.ndarray:
    return _rng(image_id, "hha").integers(0, 256, (*size_of(image_id), 3), dtype=np.uint8)


def depth_of(image_id: str) -> np.ndarray:
    """uint16 millimetres 0..12000 (0 = no measurement, above 10 m clipped by the encoding)."""
    d = _rng(image_id, "depth").integers(0, 12_001, size_of(image_id), dtype=np.uint16)
    d[0, 0], d[0, 1] = 0, 12_000
    return d


def seg_of(image_id: str) -> np.ndarray:
    """uint8 labels as stored: 0 = void, 1..40 = classes; both ends present."""
    s = _rng(image_id, "seg").integers(0, 41, size_of(image_id), dtype=np.uint8)
    s[0, 0], s[0, 1], s[1, 0] = 0, 40, 1
    return s


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_item(root: Path, image_id: str) -> None:
    write_png(root / "data" / "images" / f"img_{image_id}.png", rgb_of(image_id))
    write_png(root / "data" / "depth" / f"img_{image_id}.png", depth_of(image_id))
    write_png(root / "data" / "hha" / f"img_{image_id}.png", hha_of(image_id))
    (root / "segmentation").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "segmentation" / f"img_{image_id}.mat", {"segmentation": seg_of(image_id)})


def make_nyud(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, ids in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for image_id in TRAIN + VAL + TEST:
        write_item(root, image_id)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_nyud(tmp_path / "nyud")


def expected_mask(image_id: str) -> np.ndarray:
    s = seg_of(image_id).astype(np.int64)
    return np.where(s == 0, 255, s - 1)


def expected_depth(image_id: str) -> np.ndarray:
    """The documented encoding, computed independently: round half up of min(d, 10 m) * 255 / 10 m."""
    d = np.minimum(depth_of(image_id).astype(np.float64), 10_000)
    return np.floor(d * 255 / 10_000 + 0.5).astype(np.uint8)


# -- the fake is in the release's formats ----------------------------------------------------------------------------


def test_fake_files_have_the_release_formats(root: Path) -> None:
    with Image.open(root / "data" / "depth" / "img_5001.png") as im:
        assert im.mode == "I;16"
        np.testing.assert_array_equal(np.array(im), depth_of("5001"))
    with Image.open(root / "data" / "hha" / "img_5001.png") as im:
        assert im.mode == "RGB"
    mat = scipy.io.loadmat(root / "segmentation" / "img_5001.mat")
    assert mat["segmentation"].dtype == np.uint8 and mat["segmentation"].shape == size_of("5001")


# -- contents ---------------------------------------------------------------------------------------------------------


def test_classes_splits_and_paths(root: Path) -> None:
    ds = NYUDSegmentation(root, "val")
    assert ds.classes == NYUD_CLASSES and ds.num_classes == 40 and len(NYUD_CLASSES) == 40
    assert NYUD_CLASSES[0] == "wall" and NYUD_CLASSES[19] == "floor mat" and NYUD_CLASSES[-1] == "otherprop"
    assert ds.palette.shape == (40, 3) and len({tuple(c) for c in ds.palette}) == 40
    assert ds.ids == VAL and len(ds) == 2 and ds.split == "val"
    assert ds.image_path(0) == root / "data" / "images" / "img_5020.png"
    assert ds.mask_path(1) == root / "segmentation" / "img_5021.mat"
    assert NYUDSegmentation(root, "val", modality="hha").image_path(0) == root / "data" / "hha" / "img_5020.png"
    assert repr(ds) == "NYUDSegmentation(split='val', images=2, classes=40, modality='rgb')"


def test_split_arithmetic(root: Path) -> None:
    sizes = {s: len(NYUDSegmentation(root, s)) for s in ("train", "val", "test", "trainval")}
    assert sizes == {"train": 3, "val": 2, "test": 2, "trainval": 5}
    assert NYUDSegmentation(root, "trainval").ids == TRAIN + VAL
    # a trainval.txt of its own wins; "img_" prefixes and duplicates are tolerated
    (root / "trainval.txt").write_text("img_5021\n5001\n5001\n\n")
    assert NYUDSegmentation(root, "trainval").ids == ["5021", "5001"]


def test_mask_mapping_is_exact(root: Path) -> None:
    ds = NYUDSegmentation(root, "train")
    for i, image_id in enumerate(TRAIN):
        _, mask = ds[i]
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == size_of(image_id)
        np.testing.assert_array_equal(mask.numpy(), expected_mask(image_id))
        assert mask[0, 0] == 255 and mask[0, 1] == 39 and mask[1, 0] == 0


@pytest.mark.parametrize(("modality", "channels"), [("rgb", 3), ("hha", 3), ("rgbd", 4), ("rgb-hha", 6)])
def test_channels_and_pixels_per_modality(root: Path, modality: str, channels: int) -> None:
    ds = NYUDSegmentation(root, "test", modality=modality)
    assert ds.channels == channels
    for i, image_id in enumerate(TEST):
        image, mask = ds[i]
        h, w = size_of(image_id)
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (channels, h, w)
        got = image.permute(1, 2, 0).numpy()
        parts = {
            "rgb": [rgb_of(image_id)],
            "hha": [hha_of(image_id)],
            "rgbd": [rgb_of(image_id), expected_depth(image_id)[:, :, None]],
            "rgb-hha": [rgb_of(image_id), hha_of(image_id)],
        }[modality]
        np.testing.assert_array_equal(got, np.concatenate(parts, axis=2))
        np.testing.assert_array_equal(mask.numpy(), expected_mask(image_id))


def test_depth_encoding() -> None:
    mm = np.array([[0, 19, 20, 39, 5000, 9999], [10_000, 12_000, 65_535, 196, 197, 1]], dtype=np.uint16)
    enc = encode_depth(mm)
    assert enc.dtype == np.uint8
    # 20 mm * 255 / 10 m = 0.51 rounds up; 5000 mm is 127.5 -> 128; 196 -> 4.998 -> 5; 197 -> 5.02 -> 5
    np.testing.assert_array_equal(enc, [[0, 0, 1, 1, 128, 255], [255, 255, 255, 5, 5, 0]])
    assert DEPTH_MAX_MM == 10_000


def test_depth_png_modes(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.array([[0, 10_000]], np.uint16))
    np.testing.assert_array_equal(read_depth(tmp_path / "a.png"), [[0, 255]])
    # 32-bit "I" (how older Pillows open 16-bit PNGs; PNG cannot store it, TIFF can)
    Image.fromarray(np.array([[0, 5000]], np.int32)).save(tmp_path / "b.tif")
    with Image.open(tmp_path / "b.tif") as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(read_depth(tmp_path / "b.tif"), [[0, 128]])
    write_png(tmp_path / "c.png", np.array([[7, 200]], np.uint8))  # 8-bit: already encoded, kept
    np.testing.assert_array_equal(read_depth(tmp_path / "c.png"), [[7, 200]])
    write_png(tmp_path / "d.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ImageError) as e:
        read_depth(tmp_path / "d.png")
    assert str(e.value) == (
        f"{tmp_path / 'd.png'}: cannot read depth (depth has image mode 'RGB'; expected a 16-bit greyscale PNG of "
        "millimetres)"
    )


def test_double_mask_and_out_of_range_values(tmp_path: Path) -> None:
    seg = np.array([[0, 1, 40], [41, 2, 0]], np.float64)
    scipy.io.savemat(tmp_path / "d.mat", {"segmentation": seg})
    out = read_nyud_mask(tmp_path / "d.mat")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[255, 0, 39], [40, 1, 255]])  # 41 is kept for check-data to report
    scipy.io.savemat(tmp_path / "n.mat", {"segmentation": np.array([[0, -3]], np.int16)})
    with pytest.raises(FcnsegError) as e:
        read_nyud_mask(tmp_path / "n.mat")
    assert (
        str(e.value)
        == f"{tmp_path / 'n.mat'}: 'segmentation' holds values -3, outside the labels 1..255 and void; {EXPECTED}"
    )
    scipy.io.savemat(tmp_path / "h.mat", {"segmentation": np.full((2, 2), 0.5)})
    with pytest.raises(FcnsegError, match="'segmentation' holds values that are not integers"):
        read_nyud_mask(tmp_path / "h.mat")


def test_get_dataset_and_options(root: Path) -> None:
    ds = get_dataset("nyud", root=root, split="test", modality="rgbd")
    assert isinstance(ds, NYUDSegmentation) and ds[0][0].shape[0] == 4
    with pytest.raises(FcnsegError) as e:
        get_dataset("nyud", root=root, modality="depth")
    assert str(e.value) == "modality 'depth': expected one of rgb, hha, rgbd, rgb-hha"
    with pytest.raises(FcnsegError) as e:
        get_dataset("nyud", root=root, target="semantic")
    assert str(e.value) == "dataset 'nyud' takes no option target; expected some of: modality"
    with pytest.raises(FcnsegError) as e:
        NYUDSegmentation(root, "training")
    assert str(e.value) == "--split 'training': nyud has splits train, val, test, trainval"


def test_root_may_be_the_folder_above(root: Path) -> None:
    assert NYUDSegmentation(root.parent, "val").nyud_dir == root


# -- errors -----------------------------------------------------------------------------------------------------------


def test_missing_key_names_the_file_and_the_key(root: Path) -> None:
    path = root / "segmentation" / "img_5001.mat"
    scipy.io.savemat(path, {"labels": seg_of("5001")})
    ds = NYUDSegmentation(root, "train")
    with pytest.raises(FcnsegError) as e:
        ds[1]
    assert str(e.value) == f"{path}: no key 'segmentation' (it holds 'labels'); {EXPECTED}"


def test_unreadable_mat(root: Path) -> None:
    path = root / "segmentation" / "img_5001.mat"
    path.write_bytes(b"not a mat file at all")
    with pytest.raises(FcnsegError) as e:
        read_nyud_mask(path)
    assert str(e.value).startswith(f"{path}: cannot read .mat file (") and str(e.value).endswith(EXPECTED)
    assert len(str(e.value).splitlines()) == 1


def test_missing_split_file(root: Path) -> None:
    (root / "test.txt").unlink()
    with pytest.raises(FcnsegError) as e:
        NYUDSegmentation(root, "test")
    assert str(e.value) == (
        f"{root / 'test.txt'}: split file not found; expected test.txt in the NYUDv2 folder, one id (e.g. 5001) a "
        "line, as in FCN's data/nyud/test.txt"
    )
    (root / "val.txt").unlink()
    with pytest.raises(FcnsegError, match=r"val\.txt: split file not found \(trainval\.txt is absent, so trainval"):
        NYUDSegmentation(root, "trainval")
    (root / "train.txt").write_text("\n\n")
    with pytest.raises(FcnsegError, match="split file lists no ids"):
        NYUDSegmentation(root, "train")


def test_missing_folder_for_the_modality(root: Path) -> None:
    for f in (root / "data" / "depth").iterdir():
        f.unlink()
    (root / "data" / "depth").rmdir()
    NYUDSegmentation(root, "train", modality="rgb-hha")  # needs no depth
    with pytest.raises(FcnsegError) as e:
        NYUDSegmentation(root, "train", modality="rgbd")
    assert (
        str(e.value)
        == f"{root / 'data' / 'depth'}: folder not found; expected NYUDv2's img_<id>.png 16-bit depth images there"
    )
    with pytest.raises(FcnsegError, match="^--root: no dataset folder given"):
        NYUDSegmentation(None)


def test_id_in_split_without_files(root: Path) -> None:
    (root / "train.txt").write_text("5001\n5999\n")
    ds = NYUDSegmentation(root, "train")
    assert len(ds) == 2
    with pytest.raises(ImageError) as e:
        ds[1]
    assert str(e.value) == f"{root / 'data' / 'images' / 'img_5999.png'}: cannot read image (file not found)"


def test_extra_input_of_another_size(root: Path) -> None:
    write_png(root / "data" / "hha" / "img_5001.png", np.zeros((5, 6, 3), np.uint8))
    ds = NYUDSegmentation(root, "train", modality="rgb-hha")
    with pytest.raises(FcnsegError) as e:
        ds[1]
    assert str(e.value) == (
        f"{root / 'data' / 'hha' / 'img_5001.png'}: HHA image is 6x5 but its RGB image img_5001.png is 17x12; "
        "expected the same size"
    )


# -- check-data -------------------------------------------------------------------------------------------------------


def test_check_data_passes_on_a_clean_tree(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-data", "--dataset", "nyud", "--root", str(root), "--split", "trainval"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "nyud split 'trainval': 5 images, 5 read cleanly"
    assert "no problems" in out and "fcnseg: error" not in err
    report = check_dataset(NYUDSegmentation(root, "trainval", modality="rgbd"))
    assert report.ok and report.clean == 5
    masks = [expected_mask(i) for i in TRAIN + VAL]
    assert report.void_pixels == sum(int((m == 255).sum()) for m in masks)
    assert report.class_pixels[39] == sum(int((m == 39).sum()) for m in masks)


def test_check_data_reports_seeded_problems(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = seg_of("5010")
    bad[2, 2] = 41  # class index 40: no class
    scipy.io.savemat(root / "segmentation" / "img_5010.mat", {"segmentation": bad})
    (root / "train.txt").write_text("5003\n5001\n5010\n5999\n6449\n")  # 5999 has no files, 6449 is a test id
    assert main(["check-data", "--dataset", "nyud", "--root", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert err == "fcnseg: error: 3 problem(s) in nyud split(s) train, val, test\n"
    lines = out.splitlines()
    assert sorted(lines) == sorted(
        [
            f"{root / 'segmentation' / 'img_5010.mat'}: values 40 (1 px) are neither a class index "
            "0..39 nor 255 (void) [bad-mask-values]",
            f"{root / 'data' / 'images' / 'img_5999.png'}: neither this image nor its mask "
            f"{root / 'segmentation' / 'img_5999.mat'} exists [id-without-files]",
            f"{root / 'test.txt'}: 1 id(s) also in train.txt: 6449 [split-overlap]",
        ]
    )


def test_check_data_reads_the_depth_of_rgbd(root: Path) -> None:
    (root / "data" / "depth" / "img_5003.png").write_bytes(b"broken")
    report = check_dataset(NYUDSegmentation(root, "train", modality="rgbd"))
    assert [(p.file, p.kind) for p in report.problems] == [
        (str(root / "data" / "images" / "img_5003.png"), "unreadable-image")
    ]
    assert str(root / "data" / "depth" / "img_5003.png") in report.problems[0].message


# -- paired transforms move every channel with the mask ---------------------------------------------------------------


def test_flip_and_crop_keep_six_channels_and_mask_aligned(root: Path) -> None:
    plain = NYUDSegmentation(root, "train", modality="rgb-hha")
    tf = v2.Compose([v2.RandomHorizontalFlip(p=0.5), v2.RandomCrop((9, 11))])
    ds = NYUDSegmentation(root, "train", transforms=tf, modality="rgb-hha")
    flips = set()
    torch.manual_seed(0)
    for _ in range(6):
        for i in range(len(ds)):
            image0, mask0 = plain[i]
            image, mask = ds[i]
            assert isinstance(image, tv_tensors.Image) and image.shape == (6, 9, 11)
            assert isinstance(mask, tv_tensors.Mask) and mask.shape == (9, 11)
            where = find_window(image0.as_subclass(torch.Tensor), image.as_subclass(torch.Tensor))
            assert len(where) == 1  # noise images: the window is found exactly once
            flipped, top, left = where[0]
            m0 = mask0.as_subclass(torch.Tensor)
            m0 = m0.flip(-1) if flipped else m0
            assert torch.equal(mask.as_subclass(torch.Tensor), m0[top : top + 9, left : left + 11])
            flips.add(flipped)
    assert flips == {False, True}


def test_check_data_cli_takes_the_modality(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # --data-option modality=rgbd makes check-data read the depth images too; plain rgb does not see them.
    (root / "data" / "depth" / "img_5003.png").write_bytes(b"broken")
    assert main(["check-data", "--dataset", "nyud", "--root", str(root), "--quiet"]) == 0
    argv = ["check-data", "--dataset", "nyud", "--root", str(root), "--quiet", "--data-option", "modality=rgbd"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out.count("[unreadable-image]") == 1 and err.count("fcnseg: error: ") == 1
    assert main([*argv[:-1], "colour=yes"]) == 2
