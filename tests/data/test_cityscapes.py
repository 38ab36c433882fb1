"""Cityscapes on a fake tree laid out as the leftImg8bit, gtFine and gtCoarse archives unpack."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcnseg.data.cityscapes  # noqa: F401  (registers "cityscapes")
from fcnseg.cli import main
from fcnseg.data.base import SplitError, get_dataset
from fcnseg.data.check import check_dataset
from fcnseg.data.cityscapes import CityscapesLabelError, CityscapesSegmentation
from fcnseg.errors import FcnsegError

SIZE = (24, 32)  # (H, W); the release's are 1024x2048
BLOCK = 4  # labels come in 4x4 blocks, as regions do, so that a model can learn them in an end-to-end test
TRAIN = {"aachen": ["aachen_000000_000019", "aachen_000001_000019"], "bochum": ["bochum_000000_000313"]}
VAL = {"frankfurt": ["frankfurt_000000_000294", "frankfurt_000001_005184"]}
TRAIN_EXTRA = {"augsburg": ["augsburg_000000_000000"]}

# cityscapesScripts' helpers/labels.py, typed from its table: label id -> (train id, name, colour). License plate
# (id -1) is left out: json2labelImg.py skips labels with a negative id, so it never appears in a labelIds image.
PUBLISHED = {
    0: (255, "unlabeled", (0, 0, 0)),
    1: (255, "ego vehicle", (0, 0, 0)),
    2: (255, "rectification border", (0, 0, 0)),
    3: (255, "out of roi", (0, 0, 0)),
    4: (255, "static", (0, 0, 0)),
    5: (255, "dynamic", (111, 74, 0)),
    6: (255, "ground", (81, 0, 81)),
    7: (0, "road", (128, 64, 128)),
    8: (1, "sidewalk", (244, 35, 232)),
    9: (255, "parking", (250, 170, 160)),
    10: (255, "rail track", (230, 150, 140)),
    11: (2, "building", (70, 70, 70)),
    12: (3, "wall", (102, 102, 156)),
    13: (4, "fence", (190, 153, 153)),
    14: (255, "guard rail", (180, 165, 180)),
    15: (255, "bridge", (150, 100, 100)),
    16: (255, "tunnel", (150, 120, 90)),
    17: (5, "pole", (153, 153, 153)),
    18: (255, "polegroup", (153, 153, 153)),
    19: (6, "traffic light", (250, 170, 30)),
    20: (7, "traffic sign", (220, 220, 0)),
    21: (8, "vegetation", (107, 142, 35)),
    22: (9, "terrain", (152, 251, 152)),
    23: (10, "sky", (70, 130, 180)),
    24: (11, "person", (220, 20, 60)),
    25: (12, "rider", (255, 0, 0)),
    26: (13, "car", (0, 0, 142)),
    27: (14, "truck", (0, 0, 70)),
    28: (15, "bus", (0, 60, 100)),
    29: (255, "caravan", (0, 0, 90)),
    30: (255, "trailer", (0, 0, 110)),
    31: (16, "train", (0, 80, 100)),
    32: (17, "motorcycle", (0, 0, 230)),
    33: (18, "bicycle", (119, 11, 32)),
}


def _rng(name: str, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{salt}:{name}".encode()))


def label_ids_of(base: str, gt: str = "gtFine") -> np.ndarray:
    """Label ids as a labelIds PNG stores them: uint8, every id 0..33 present (in shuffled blocks)."""
    rng = _rng(base, gt)
    blocks = rng.integers(0, 34, (SIZE[0] // BLOCK) * (SIZE[1] // BLOCK))
    blocks[:34] = rng.permutation(34)
    grid = blocks.reshape(SIZE[0] // BLOCK, SIZE[1] // BLOCK).astype(np.uint8)
    return np.kron(grid, np.ones((BLOCK, BLOCK), dtype=np.uint8))


def image_of(base: str, ids: np.ndarray) -> np.ndarray:
    """Each label's published colour plus noise: the image tells the labels apart, as a photo would."""
    colours = np.array([PUBLISHED[i][2] for i in range(34)], dtype=np.int64)
    noise = _rng(base, "img").integers(-12, 13, (*SIZE, 3))
    return np.clip(colours[ids] + noise, 0, 255).astype(np.uint8)


def expected_mask(ids: np.ndarray) -> np.ndarray:
    return np.array([[PUBLISHED[int(v)][0] for v in row] for row in ids], dtype=np.int64)


def write_labels(root: Path, gt: str, split: str, city: str, base: str, ids: np.ndarray) -> None:
    """The label files of one image, with the archive's other files beside the labelIds PNG."""
    folder = root / gt / split / city
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids, mode="L").save(folder / f"{base}_{gt}_labelIds.png")
    colours = np.array([PUBLISHED[i][2] for i in range(34)], dtype=np.uint8)
    Image.fromarray(colours[ids]).save(folder / f"{base}_{gt}_color.png")
    instances = ids.astype(np.int32) * 1000 + 1  # as instanceIds.png: label id * 1000 + instance, 16 bits
    Image.fromarray(instances.astype(np.uint16)).save(folder / f"{base}_{gt}_instanceIds.png")
    (folder / f"{base}_{gt}_polygons.json").write_text(json.dumps({"imgHeight": SIZE[0], "imgWidth": SIZE[1]}))


def write_split(root: Path, split: str, cities: dict[str, list[str]], gts: tuple[str, ...] = ("gtFine",)) -> None:
    for city, bases in cities.items():
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        for base in bases:
            ids = label_ids_of(base)
            Image.fromarray(image_of(base, ids)).save(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png")
            for gt in gts:
                write_labels(root, gt, split, city, base, label_ids_of(base, gt))


def make_cityscapes_tree(root: Path) -> Path:
    """A small clean Cityscapes tree (fine labels; splits train: 3 images in 2 cities, val: 2) at ``root``."""
    write_split(root, "train", TRAIN)
    write_split(root, "val", VAL)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_cityscapes_tree(tmp_path / "cityscapes")


def _label(root: Path, split: str, base: str, gt: str = "gtFine") -> Path:
    return root / gt / split / base.split("_")[0] / f"{base}_{gt}_labelIds.png"


def _image(root: Path, split: str, base: str) -> Path:
    return root / "leftImg8bit" / split / base.split("_")[0] / f"{base}_leftImg8bit.png"


# -- classes and ids --------------------------------------------------------------------------------------------------


def test_classes_colours_and_mapping_are_the_published_train_ids(root: Path) -> None:
    ds = CityscapesSegmentation(root, "train")
    by_train_id = sorted((t, name, colour) for t, name, colour in PUBLISHED.values() if t != 255)
    assert [t for t, _, _ in by_train_id] == list(range(19))
    assert ds.classes == tuple(name for _, name, _ in by_train_id) and ds.num_classes == 19
    assert ds.palette.dtype == np.uint8 and ds.palette.tolist() == [list(c) for _, _, c in by_train_id]
    assert ds.label_mapping() == {
        "format": "cityscapes",
        "train_ids": {i: t for i, (t, _, _) in PUBLISHED.items() if t != 255},
    }
    assert "void" in ds.label_convention and "\n" not in ds.label_convention


def test_fake_labels_hold_every_label_id(root: Path) -> None:
    with Image.open(_label(root, "train", TRAIN["aachen"][0])) as im:
        assert im.mode == "L" and im.size == (SIZE[1], SIZE[0])
        assert sorted(np.unique(np.array(im)).tolist()) == list(range(34))


# -- contents ---------------------------------------------------------------------------------------------------------


def test_items_are_every_image_by_city_and_map_pixel_for_pixel(root: Path) -> None:
    ds = CityscapesSegmentation(root, "train")
    assert ds.ids == TRAIN["aachen"] + TRAIN["bochum"] and len(ds) == 3
    assert ds.image_path(2) == _image(root, "train", TRAIN["bochum"][0])
    assert ds.mask_path(2) == _label(root, "train", TRAIN["bochum"][0])
    for i, base in enumerate(ds.ids):
        image, mask = ds[i]
        ids = label_ids_of(base)
        assert str(image.dtype) == "torch.uint8" and tuple(image.shape) == (3, *SIZE)
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), image_of(base, ids))
        assert str(mask.dtype) == "torch.int64"
        np.testing.assert_array_equal(mask.numpy(), expected_mask(ids))
    val = get_dataset("cityscapes", root=root, split="val")
    assert val.ids == VAL["frankfurt"]
    np.testing.assert_array_equal(val[1][1].numpy(), expected_mask(label_ids_of(VAL["frankfurt"][1])))


def test_coarse_mode_reads_gt_coarse_and_train_extra(tmp_path: Path) -> None:
    root = tmp_path / "cs"
    write_split(root, "train", TRAIN, gts=("gtFine", "gtCoarse"))
    write_split(root, "train_extra", TRAIN_EXTRA, gts=("gtCoarse",))
    coarse = get_dataset("cityscapes", root=root, split="train", mode="coarse")
    assert coarse.mask_path(0) == _label(root, "train", TRAIN["aachen"][0], "gtCoarse")
    for i, base in enumerate(coarse.ids):
        assert not np.array_equal(label_ids_of(base, "gtCoarse"), label_ids_of(base))  # a mix-up would show
        np.testing.assert_array_equal(coarse[i][1].numpy(), expected_mask(label_ids_of(base, "gtCoarse")))
    extra = CityscapesSegmentation(root, "train_extra", mode="coarse")
    assert extra.ids == TRAIN_EXTRA["augsburg"]
    np.testing.assert_array_equal(extra[0][1].numpy(), expected_mask(label_ids_of(extra.ids[0], "gtCoarse")))


def test_modes_splits_and_roots_are_checked(tmp_path: Path, root: Path) -> None:
    with pytest.raises(FcnsegError, match=r"--split 'train_extra': cityscapes \(mode=fine\) has splits train, val"):
        CityscapesSegmentation(root, "train_extra")
    with pytest.raises(FcnsegError, match=r"--split 'test': cityscapes \(mode=coarse\) has splits .*train_extra"):
        CityscapesSegmentation(root, "test", mode="coarse")
    with pytest.raises(FcnsegError, match=r"mode 'medium': expected one of fine, coarse"):
        CityscapesSegmentation(root, "train", mode="medium")
    with pytest.raises(FcnsegError, match=r"^--root: no dataset folder given"):
        CityscapesSegmentation(None, "train")
    with pytest.raises(FcnsegError, match=r"no leftImg8bit folder in it"):
        CityscapesSegmentation(tmp_path, "train")
    with pytest.raises(SplitError, match=r"gtCoarse[/\\]train: folder not found") as e:
        CityscapesSegmentation(root, "train", mode="coarse")
    assert e.value.kind == "empty-split"
    with pytest.raises(SplitError, match=r"leftImg8bit[/\\]test: folder not found"):
        CityscapesSegmentation(root, "test")


def test_a_value_above_33_is_refused_not_made_void(root: Path) -> None:
    path = _label(root, "val", VAL["frankfurt"][0])
    ids = label_ids_of(VAL["frankfurt"][0])
    ids[0, :3] = [34, 255, 255]  # e.g. a _labelTrainIds.png renamed: its 255 would otherwise pass as void
    Image.fromarray(ids, mode="L").save(path)
    ds = CityscapesSegmentation(root, "val")
    with pytest.raises(CityscapesLabelError, match=r"values 34 \(1 px\), 255 \(2 px\) are no Cityscapes label id"):
        ds[0]
    np.testing.assert_array_equal(ds[1][1].numpy(), expected_mask(label_ids_of(VAL["frankfurt"][1])))


# -- check-data -------------------------------------------------------------------------------------------------------


def test_check_data_passes_on_a_clean_tree_and_counts_train_ids(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check-data", "--dataset", "cityscapes", "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "cityscapes split 'train': 3 images, 3 read cleanly"
    assert "no problems" in out and "fcnseg: error" not in err
    report = check_dataset(CityscapesSegmentation(root, "val"))
    masks = [expected_mask(label_ids_of(b)) for b in VAL["frankfurt"]]
    assert report.class_pixels == [sum(int((m == k).sum()) for m in masks) for k in range(19)]
    assert report.void_pixels == sum(int((m == 255).sum()) for m in masks)


def test_check_data_reports_each_problem_once(root: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = TRAIN["aachen"]
    _label(root, "train", a).unlink()  # an image without its label file
    bad = label_ids_of(b)
    bad[5, 5] = 40
    Image.fromarray(bad, mode="L").save(_label(root, "train", b))
    write_labels(root, "gtFine", "val", "frankfurt", "frankfurt_000009_000019", label_ids_of("x"))  # no image
    _label(root, "val", VAL["frankfurt"][1]).write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    assert main(["check-data", "--dataset", "cityscapes", "--root", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert err == "fcnseg: error: 4 problem(s) in cityscapes split(s) train, val\n"
    unreadable = [line for line in out.splitlines() if line.endswith("[unreadable-mask]")]
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{_label(root, 'val', VAL['frankfurt'][1])}: ")
    assert sorted(line for line in out.splitlines() if line not in unreadable) == sorted(
        [
            f"{_image(root, 'train', a)}: its mask {_label(root, 'train', a)} does not exist [image-without-mask]",
            f"{_label(root, 'train', b)}: values 40 (1 px) are no Cityscapes label id 0..33; expected a "
            "*_labelIds.png as cityscapesScripts writes it [bad-mask-values]",
            f"{_label(root, 'val', 'frankfurt_000009_000019')}: its image "
            "leftImg8bit/val/frankfurt/frankfurt_000009_000019_leftImg8bit.png does not exist [mask-without-image]",
        ]
    )
