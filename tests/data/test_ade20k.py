"""ADE20K's scene parsing benchmark on a fake ADEChallengeData2016 tree: JPEG images, greyscale PNG annotations."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcnseg.data.ade20k  # noqa: F401  (registers "ade20k")
from fcnseg.cli import main
from fcnseg.data.ade20k import ADE20KLabelError, ADE20KSegmentation
from fcnseg.data.base import SplitError, get_dataset
from fcnseg.data.check import check_dataset
from fcnseg.errors import FcnsegError

SIZE = (24, 32)  # (H, W)
BLOCK = 2  # 12 x 16 = 192 blocks: room for every value 0..150
TRAIN = ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"]
VAL = ["ADE_val_00000001", "ADE_val_00000002"]
FOLDERS = {"train": "training", "val": "validation"}


def _rng(name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{salt}:{name}".encode()))


def annotation_of(stem: str) -> np.ndarray:
    """An annotation as the benchmark stores it: uint8, 0 = other objects, 1..150; every value present."""
    rng = _rng(stem, "ann")
    blocks = rng.integers(0, 151, (SIZE[0] // BLOCK) * (SIZE[1] // BLOCK))
    blocks[:151] = rng.permutation(151)
    grid = blocks.reshape(SIZE[0] // BLOCK, SIZE[1] // BLOCK).astype(np.uint8)
    return np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.uint8))


def image_of(stem: str, annotation: np.ndarray) -> np.ndarray:
    """A colour per annotation value plus noise: the image tells the classes apart."""
    colours = np.random.default_rng(150).integers(0, 256, (151, 3))
    noise = _rng(stem, "img").integers(-10, 11, (*SIZE, 3))
    return np.clip(colours[annotation] + noise, 0, 255).astype(np.uint8)


def expected_mask(annotation: np.ndarray) -> np.ndarray:
    """The benchmark's rule by hand: 0 is not evaluated (void), v is class v - 1."""
    a = annotation.astype(np.int64)
    return np.where(a == 0, 255, a - 1)


def decoded(path: Path) -> np.ndarray:
    """The fake JPEG as PIL decodes it (JPEG is lossy: compare with this, not with what was encoded)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def _paths(root: Path, split: str, stem: str) -> tuple[Path, Path]:
    ade = root / "ADEChallengeData2016"
    return ade / "images" / FOLDERS[split] / f"{stem}.jpg", ade / "annotations" / FOLDERS[split] / f"{stem}.png"


def write_item(root: Path, split: str, stem: str) -> None:
    image, annotation = _paths(root, split, stem)
    image.parent.mkdir(parents=True, exist_ok=True)
    annotation.parent.mkdir(parents=True, exist_ok=True)
    values = annotation_of(stem)
    Image.fromarray(image_of(stem, values)).save(image, format="JPEG", quality=90)
    Image.fromarray(values, mode="L").save(annotation)


def make_ade20k_tree(root: Path) -> Path:
    """A small clean ADEChallengeData2016 tree under ``root`` (train: 3 images, val: 2); returns ``root``."""
    ade = root / "ADEChallengeData2016"
    ade.mkdir(parents=True, exist_ok=True)
    # The archive's own text files lie beside images/ and annotations/.
    (ade / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n")
    (ade / "sceneCategories.txt").write_text("".join(f"{s} bathroom\n" for s in TRAIN + VAL))
    for split, stems in (("train", TRAIN), ("val", VAL)):
        for stem in stems:
            write_item(root, split, stem)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_ade20k_tree(tmp_path / "ade")


# -- classes ----------------------------------------------------------------------------------------------------------


def test_the_150_names_and_colours_are_the_benchmarks(root: Path) -> None:
    ds = ADE20KSegmentation(root, "train")
    assert ds.num_classes == 150 and len(set(ds.classes)) == 150
    # objectInfo150.txt rows 1, 2, 3, 13, 21, 45, 150: annotation value v is class v - 1.
    known = {0: "wall", 1: "building", 2: "sky", 12: "person", 20: "car", 44: "chest of drawers", 149: "flag"}
    assert {i: ds.classes[i] for i in known} == known
    # visualizationCode/color150.mat's first rows and its last.
    assert ds.palette.shape == (150, 3) and ds.palette.dtype == np.uint8
    assert ds.palette[:3].tolist() == [[120, 120, 120], [180, 120, 120], [6, 230, 230]]
    assert ds.palette[149].tolist() == [92, 0, 255]
    assert ds.label_mapping() == {"format": "ade20k", "reduce_zero_label": True}
    convention = ADE20KSegmentation.label_convention
    assert "\n" not in convention and "0" in convention and "void" in convention and "1..150" in convention


def test_fake_annotations_hold_every_value(root: Path) -> None:
    with Image.open(_paths(root, "train", TRAIN[0])[1]) as im:
        assert im.mode == "L" and sorted(np.unique(np.array(im)).tolist()) == list(range(151))


# -- contents ---------------------------------------------------------------------------------------------------------


def test_items_map_zero_to_void_and_shift_the_rest_pixel_for_pixel(root: Path) -> None:
    ds = ADE20KSegmentation(root, "train")
    assert ds.ids == TRAIN
    for i, stem in enumerate(TRAIN):
        image_path, annotation_path = _paths(root, "train", stem)
        assert ds.image_path(i) == image_path and ds.mask_path(i) == annotation_path
        image, mask = ds[i]
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), decoded(image_path))
        assert str(mask.dtype) == "torch.int64"
        np.testing.assert_array_equal(mask.numpy(), expected_mask(annotation_of(stem)))
    val = get_dataset("ade20k", root=root, split="val")
    assert val.ids == VAL
    np.testing.assert_array_equal(val[1][1].numpy(), expected_mask(annotation_of(VAL[1])))


def test_root_may_be_the_challenge_folder_itself(root: Path) -> None:
    inner = ADE20KSegmentation(root / "ADEChallengeData2016", "val")
    outer = ADE20KSegmentation(root, "val")
    assert inner.ids == outer.ids == VAL
    assert inner.mask_path(0) == outer.mask_path(0) == _paths(root, "val", VAL[0])[1]


def test_splits_and_roots_are_checked(tmp_path: Path, root: Path) -> None:
    with pytest.raises(FcnsegError, match=r"^--split 'test': ade20k has splits train, val$"):
        ADE20KSegmentation(root, "test")
    with pytest.raises(FcnsegError, match=r"^--root: no dataset folder given"):
        ADE20KSegmentation(None, "train")
    with pytest.raises(FcnsegError, match=r"no ADEChallengeData2016/images and annotations folders in it"):
        ADE20KSegmentation(tmp_path, "train")
    with pytest.raises(FcnsegError, match=r"takes no option mode"):
        get_dataset("ade20k", root=root, split="train", mode="fine")
    for stem in VAL:
        _paths(root, "val", stem)[1].unlink()
    _paths(root, "val", VAL[0])[1].parent.rmdir()
    with pytest.raises(SplitError, match=r"annotations[/\\]validation: folder not found") as e:
        ADE20KSegmentation(root, "val")
    assert e.value.kind == "empty-split"


def test_a_value_above_150_is_refused_not_made_void(root: Path) -> None:
    values = annotation_of(VAL[0])
    values[0, :3] = [151, 151, 255]
    Image.fromarray(values, mode="L").save(_paths(root, "val", VAL[0])[1])
    ds = ADE20KSegmentation(root, "val")
    with pytest.raises(ADE20KLabelError, match=r"values 151 \(2 px\), 255 \(1 px\) are above 150"):
        ds[0]
    np.testing.assert_array_equal(ds[1][1].numpy(), expected_mask(annotation_of(VAL[1])))


# -- check-data -------------------------------------------------------------------------------------------------------


def test_check_data_passes_on_a_clean_tree_and_counts_classes(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-data", "--dataset", "ade20k", "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "ade20k split 'train': 3 images, 3 read cleanly"
    assert "no problems" in out and "fcnseg: error" not in err
    report = check_dataset(ADE20KSegmentation(root, "val"))
    masks = [expected_mask(annotation_of(s)) for s in VAL]
    assert report.class_pixels == [sum(int((m == k).sum()) for m in masks) for k in range(150)]
    assert report.void_pixels == sum(int((m == 255).sum()) for m in masks)


def test_check_data_reports_each_problem_once(root: Path, capsys: pytest.CaptureFixture) -> None:
    image0, annotation0 = _paths(root, "train", TRAIN[0])
    annotation0.unlink()  # an image without its annotation
    values = annotation_of(TRAIN[1])
    values[4, 4:6] = 200
    Image.fromarray(values, mode="L").save(_paths(root, "train", TRAIN[1])[1])
    _paths(root, "val", VAL[1])[0].unlink()  # an annotation without its image
    assert main(["check-data", "--dataset", "ade20k", "--root", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert err == "fcnseg: error: 3 problem(s) in ade20k split(s) train, val\n"
    annotation1, orphan = _paths(root, "train", TRAIN[1])[1], _paths(root, "val", VAL[1])[1]
    assert sorted(out.splitlines()) == sorted(
        [
            f"{image0}: its mask {annotation0} does not exist [image-without-mask]",
            f"{annotation1}: values 200 (2 px) are above 150; expected an ADEChallengeData2016 annotation PNG of "
            "values 0..150 (0 = other objects) [bad-mask-values]",
            f"{orphan}: its image images/validation/{VAL[1]}.jpg does not exist [mask-without-image]",
        ]
    )
