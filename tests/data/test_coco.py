"""The COCO dataset: masks against pycocotools' own decoding combined by the documented drawing rule, classes and
their category ids, image lookup, the mask cache, check-data's problem lines and the optional pycocotools import.

Annotations are written with pycocotools (compressed RLE from ``pycocotools.mask.encode``, bounding boxes from
``toBbox``), uncompressed RLE counts and polygons by hand; the oracle is ``pycocotools.coco.COCO.annToMask``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcnseg.data.coco as coco_module
from fcnseg.cli import main
from fcnseg.data.base import SplitError, get_dataset
from fcnseg.data.check import check_dataset, run_check_data
from fcnseg.data.coco import CocoDataset, rle_string_counts
from fcnseg.errors import FcnsegError
from fcnseg.palette import palette_for

pycocotools_mask = pytest.importorskip("pycocotools.mask")
from pycocotools.coco import COCO  # noqa: E402

# pycocotools built against NumPy 1 warns under NumPy 2 on every decode (the oracle's too); its masks are right.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

W, H = 32, 24
# Listed out of id order on purpose: classes follow the ids (1, 5, 90), not the file's order.
CATEGORIES = [{"id": 90, "name": "kite"}, {"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}]


# ------------------------------------------------------------------------------------------------ writers


def box(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """A H x W binary mask, ones in rows y0..y1-1 and columns x0..x1-1."""
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def compressed_rle(mask: np.ndarray) -> dict:
    rle = pycocotools_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Run lengths of the column-major pixel order, starting with a run of zeros (COCO's data format page)."""
    flat = mask.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [H, W], "counts": counts}


def polygon_ann(ann_id: int, image_id: int, cat: int, *parts: list[float]) -> dict:
    xs = [v for p in parts for v in p[0::2]]
    ys = [v for p in parts for v in p[1::2]]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0, "segmentation": list(parts),
            "bbox": bbox, "area": 0.0}  # fmt: skip


def rle_ann(ann_id: int, image_id: int, cat: int, segm: dict, crowd: int = 0) -> dict:
    rle = segm if isinstance(segm["counts"], str) else pycocotools_mask.frPyObjects(segm, H, W)
    bbox = [float(v) for v in pycocotools_mask.toBbox(rle)]
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": crowd, "segmentation": segm,
            "bbox": bbox, "area": float(pycocotools_mask.area(rle))}  # fmt: skip


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_json(path: Path, images: list[dict], anns: list[dict], categories: list[dict] = CATEGORIES) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path


def image_entry(image_id: int, file_name: str) -> dict:
    return {"id": image_id, "file_name": file_name, "width": W, "height": H}


def train_annotations() -> list[dict]:
    """Image 1: a big dog polygon, a smaller cat polygon inside it (listed first: the file's order is not the
    drawing order), a kite as compressed RLE overlapping both, and a crowd region (uncompressed RLE) half under
    the dog. Image 2: a two-part cat polygon, a cat and a kite of equal area overlapping (the tie), a dog as
    uncompressed RLE. Image 3 has none."""
    return [
        polygon_ann(11, 1, 1, [8.0, 6.0, 16.0, 6.0, 16.0, 14.0, 8.0, 14.0]),
        polygon_ann(10, 1, 5, [2.0, 2.0, 22.0, 2.0, 22.0, 20.0, 2.0, 20.0]),
        rle_ann(12, 1, 90, compressed_rle(box(12, 10, 26, 16))),
        rle_ann(13, 1, 5, uncompressed_rle(box(18, 0, 32, 8)), crowd=1),
        polygon_ann(20, 2, 1, [1.0, 1.0, 9.0, 1.0, 5.0, 9.0], [20.0, 14.0, 30.0, 14.0, 30.0, 22.0, 20.0, 22.0]),
        rle_ann(22, 2, 1, compressed_rle(box(4, 10, 12, 18))),
        rle_ann(21, 2, 90, compressed_rle(box(8, 12, 16, 20))),
        rle_ann(23, 2, 5, uncompressed_rle(box(0, 0, 14, 22))),
    ]


def val_annotations() -> list[dict]:
    return [
        polygon_ann(30, 4, 5, [3.5, 2.5, 28.0, 4.0, 25.0, 21.0, 6.0, 18.5]),
        rle_ann(31, 4, 1, compressed_rle(box(10, 8, 20, 14))),
        polygon_ann(40, 5, 90, [0.0, 0.0, 32.0, 0.0, 32.0, 24.0]),
        rle_ann(41, 5, 1, uncompressed_rle(box(20, 2, 30, 10)), crowd=1),
    ]


def make_coco_tree(root: Path) -> Path:
    """A small clean COCO tree: ``train`` (3 images in ROOT/train/, PNG and JPEG, one without annotations) and
    ``val`` (2 images in ROOT/images/val/), categories 1 cat, 5 dog, 90 kite, each present in train, with
    overlapping objects and crowd regions. Returns ``root``."""
    train = [image_entry(1, "a.png"), image_entry(2, "b.jpg"), image_entry(3, "empty.png")]
    val = [image_entry(4, "c.png"), image_entry(5, "d.jpg")]
    for i, entry in enumerate(train):
        write_image(root / "train" / entry["file_name"], i)
    for i, entry in enumerate(val):
        write_image(root / "images" / "val" / entry["file_name"], 10 + i)
    write_json(root / "annotations" / "instances_train.json", train, train_annotations())
    write_json(root / "annotations" / "instances_val.json", val, val_annotations())
    return root


# ------------------------------------------------------------------------------------------------ the oracle


def rule(ann: dict, pixels: int) -> tuple[int, int]:
    """The documented drawing order's sort key: decreasing pixel count, then increasing annotation id."""
    return (-pixels, ann["id"])


def oracle_masks(json_path: Path, crowd: str = "void", skip: tuple[int, ...] = (), key=rule) -> dict[int, np.ndarray]:
    """Per image id, the documented rule applied to pycocotools' own masks: crowd regions 255 first (none with
    crowd="ignore"), then the other annotations sorted by ``key`` (the rule), each painted over the ones before;
    category ids sorted give classes 1..K. ``skip``: annotation ids left out (bad ones)."""
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its loading times
        api = COCO(str(json_path))
    label = {cid: i for i, cid in enumerate(sorted(api.cats), 1)}
    out = {}
    for image_id, img in api.imgs.items():
        mask = np.zeros((img["height"], img["width"]), dtype=np.uint8)
        anns = [a for a in api.imgToAnns[image_id] if a["id"] not in skip]
        if crowd == "void":
            for a in anns:
                if a["iscrowd"]:
                    mask[api.annToMask(a) == 1] = 255
        objects = sorted((a for a in anns if not a["iscrowd"]), key=lambda a: key(a, int(api.annToMask(a).sum())))
        for a in objects:
            mask[api.annToMask(a) == 1] = label[a["category_id"]]
        out[image_id] = mask
    return out


def dataset_masks(ds: CocoDataset) -> dict[int, np.ndarray]:
    return {int(ds.ids[i]): ds[i][1].numpy().astype(np.uint8) for i in range(len(ds))}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_coco_tree(tmp_path / "coco")


# ------------------------------------------------------------------------------------------------ masks


def test_the_fixture_makes_the_drawing_order_matter(tree):
    # Drawing in the file's order, smaller objects first, or ties the other way round must each give other masks,
    # else the comparison below could not tell the rule from them.
    json_path = tree / "annotations" / "instances_train.json"
    right = oracle_masks(json_path)
    position = {a["id"]: n for n, a in enumerate(train_annotations())}
    for key in (lambda a, px: position[a["id"]], lambda a, px: (px, a["id"]), lambda a, px: (-px, -a["id"])):
        wrong = oracle_masks(json_path, key=key)
        assert any((wrong[i] != right[i]).any() for i in right)


@pytest.mark.parametrize("split", ["train", "val"])
def test_masks_equal_pycocotools_by_the_drawing_rule(tree, split):
    ds = CocoDataset(tree, split)
    expected = oracle_masks(tree / "annotations" / f"instances_{split}.json")
    got = dataset_masks(ds)
    assert sorted(got) == sorted(expected)
    for image_id, mask in got.items():
        np.testing.assert_array_equal(mask, expected[image_id], err_msg=f"image {image_id}")
    if split == "train":
        # Where the crowd region lies under the dog the dog is drawn; elsewhere the crowd is void; image 3 is empty.
        assert got[1][0, 20] == 255 and got[1][4, 20] == 2
        assert got[3].max() == 0
        # The tie: kite 21 and cat 22 have equal area; 22, the higher id, is drawn last.
        assert got[2][13, 10] == 1 and got[2][19, 14] == 3
        # The small cat (listed first) lies on the big dog.
        assert got[1][8, 10] == 1


def test_images_are_the_files_pixels(tree):
    ds = CocoDataset(tree, "train")
    for i in range(len(ds)):
        with Image.open(ds.image_path(i)) as im:
            np.testing.assert_array_equal(ds[i][0].permute(1, 2, 0).numpy(), np.asarray(im.convert("RGB")))


def test_crowd_ignore_draws_no_crowd(tree):
    ds = CocoDataset(tree, "train", crowd="ignore")
    expected = oracle_masks(tree / "annotations" / "instances_train.json", crowd="ignore")
    for image_id, mask in dataset_masks(ds).items():
        np.testing.assert_array_equal(mask, expected[image_id])
        assert 255 not in mask
    assert ds.label_mapping()["crowd"] == "ignore"
    assert ds.cache_dirs[0] != CocoDataset(tree, "train").cache_dirs[0]


def test_classes_follow_category_ids_and_the_mapping_is_recorded(tree):
    ds = get_dataset("coco", root=tree, split="train")
    assert isinstance(ds, CocoDataset)
    assert ds.classes == ("background", "cat", "dog", "kite")
    mapping = ds.label_mapping()
    assert mapping == {"format": "coco", "category_ids": [0, 1, 5, 90], "crowd": "void"}
    assert json.loads(json.dumps(mapping)) == mapping
    np.testing.assert_array_equal(ds.palette, palette_for(ds.classes, 4))
    assert tuple(ds.palette[0]) == (0, 0, 0)


def test_image_lookup_order_and_options(tree, tmp_path):
    # COCO's layout (ROOT/<split>/) wins over ROOT/images/<split>/ and ROOT/images/.
    write_image(tree / "images" / "train" / "a.png", 99)
    write_image(tree / "images" / "b.jpg", 98)
    ds = CocoDataset(tree, "train")
    assert [ds.image_path(i) for i in range(3)] == [tree / "train" / n for n in ("a.png", "b.jpg", "empty.png")]
    assert CocoDataset(tree, "val").image_path(0) == tree / "images" / "val" / "c.png"
    # ROOT/images/ is the last place looked in.
    (tree / "images" / "val" / "d.jpg").rename(tree / "images" / "d.jpg")
    assert CocoDataset(tree, "val").image_path(1) == tree / "images" / "d.jpg"
    # annotations=FILE and images=DIR replace the split's file and folders.
    other = tmp_path / "elsewhere"
    json_path = (tree / "annotations" / "instances_val.json").rename(tmp_path / "mine.json")
    for name in ("c.png", "d.jpg"):
        write_image(other / name, 5)
    ds = CocoDataset(tree, "whatever", annotations=json_path, images=other)
    assert ds.ids == ["4", "5"] and ds.image_path(0) == other / "c.png"
    assert ds.cache_dirs[0].name.startswith("coco-mine-")


def test_any_split_whose_json_exists(tmp_path):
    root = tmp_path / "coco"
    write_image(root / "val2017" / "x.png", 1)
    write_json(root / "annotations" / "instances_val2017.json", [image_entry(7, "x.png")], [])
    ds = get_dataset("coco", root=root, split="val2017")
    assert ds.ids == ["7"] and ds.image_path(0) == root / "val2017" / "x.png"
    assert ds[0][1].numpy().max() == 0  # no annotation: all background
    with pytest.raises(SplitError) as info:
        CocoDataset(root, "train")
    text = str(info.value)
    assert "\n" not in text and str(root / "annotations" / "instances_train.json") in text
    assert "annotations/instances_<split>.json" in text and "--split val2017" in text


def test_missing_json_is_one_line_from_the_cli(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["check-data", "--dataset", "coco", "--root", str(tmp_path / "empty"), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "instances_train.json: annotation file not found" in err


def test_bad_options_are_user_errors(tree):
    with pytest.raises(FcnsegError, match="crowd='no'"):
        CocoDataset(tree, "train", crowd="no")
    with pytest.raises(FcnsegError, match="images="):
        CocoDataset(tree, "train", images=tree / "nowhere")
    with pytest.raises(FcnsegError, match="--split"):
        CocoDataset(tree, "../train")


# ------------------------------------------------------------------------------------------------ the cache


def test_masks_are_cached_once_under_the_json_hash(tree, monkeypatch):
    json_path = tree / "annotations" / "instances_train.json"
    digest = hashlib.sha256(json_path.read_bytes()).hexdigest()[:16]
    folder = tree / ".fcnseg-cache" / f"coco-instances_train-{digest}"
    calls = []
    original = CocoDataset.rasterise
    monkeypatch.setattr(CocoDataset, "rasterise", lambda self, i: calls.append(i) or original(self, i))
    first = CocoDataset(tree, "train")
    masks = dataset_masks(first)
    assert sorted(calls) == [0, 1, 2]
    assert sorted(p.name for p in folder.iterdir()) == ["1.png", "2.png", "3.png"]
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    expected = oracle_masks(json_path)
    for image_id in masks:  # the cached files themselves hold the class indices
        with Image.open(folder / f"{image_id}.png") as im:
            np.testing.assert_array_equal(np.asarray(im), expected[image_id])
    calls.clear()
    second = dataset_masks(CocoDataset(tree, "train"))
    assert calls == [] and {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == stats
    assert all((second[i] == masks[i]).all() for i in masks)
    # An edited JSON gets a folder of its own; the new masks follow the edit.
    data = json.loads(json_path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 11]
    json_path.write_text(json.dumps(data))
    edited = CocoDataset(tree, "train")
    assert edited.cache_dirs[0] != folder and edited.cache_dirs[0].parent == folder.parent
    np.testing.assert_array_equal(dataset_masks(edited)[1], oracle_masks(json_path)[1])
    assert calls == [0, 1, 2]


def test_the_cache_falls_back_when_the_root_is_not_writable(tree, tmp_path, monkeypatch):
    (tree / ".fcnseg-cache").write_text("in the way")  # no folder can be made there, even as root
    monkeypatch.delenv("FCNSEG_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = CocoDataset(tree, "val")
    masks = dataset_masks(ds)
    folder = tmp_path / "xdg" / "fcnseg" / "masks" / ds.cache_dirs[0].name
    assert sorted(p.name for p in folder.iterdir()) == ["4.png", "5.png"]
    assert ds.mask_path(0) == folder / "4.png"
    expected = oracle_masks(tree / "annotations" / "instances_val.json")
    assert all((masks[i] == expected[i]).all() for i in masks)


# ------------------------------------------------------------------------------------------------ check-data


def test_a_clean_tree_has_no_problem(tree, capsys):
    assert main(["check-data", "--dataset", "coco", "--root", str(tree), "--quiet"]) == 0
    report = check_dataset(CocoDataset(tree, "train"))
    assert report.ok and report.clean == 3
    assert report.void_pixels == int((oracle_masks(tree / "annotations" / "instances_train.json")[1] == 255).sum())


def _edit(tree: Path, change) -> Path:
    path = tree / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _add(ann: dict):
    return lambda data: data["annotations"].append(ann)


SQUARE = [4.0, 4.0, 10.0, 4.0, 10.0, 10.0, 4.0, 10.0]
DEFECTS = {
    "unknown-category": (_add(polygon_ann(50, 3, 7, SQUARE)), "category id 7"),
    "polygon outside": (_add(polygon_ann(50, 3, 1, [20.0, 4.0, 40.0, 4.0, 30.0, 12.0])), "(40, 4) lies outside"),
    "bbox outside": (_add({**polygon_ann(50, 3, 1, SQUARE), "bbox": [20.0, 10.0, 20.0, 5.0]}), "bbox [20, 10"),
    "rle size": (_add(rle_ann(50, 3, 1, {**compressed_rle(box(1, 1, 5, 5)), "size": [20, 30]})), "RLE size is 30x20"),
    "two points": (_add(polygon_ann(50, 3, 1, [1.0, 1.0, 8.0, 8.0])), "2 point(s)"),
    "odd count": (_add(polygon_ann(50, 3, 1, [*SQUARE, 3.0])), "odd number of coordinates"),
    "zero area": (_add(polygon_ann(50, 3, 1, [1.0, 1.0, 5.0, 5.0, 9.0, 9.0])), "zero area"),
}
KINDS = {
    "unknown-category": "unknown-category",
    "polygon outside": "annotation-out-of-bounds",
    "bbox outside": "annotation-out-of-bounds",
    "rle size": "annotation-out-of-bounds",
    "two points": "degenerate-annotation",
    "odd count": "degenerate-annotation",
    "zero area": "degenerate-annotation",
}


def _problem_lines(root: Path, capsys) -> list[str]:
    capsys.readouterr()
    assert run_check_data("coco", str(root), quiet=True) == 2
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_each_annotation_defect_is_one_line_and_items_still_load(tree, capsys, defect):
    change, words = DEFECTS[defect]
    json_path = _edit(tree, change)
    lines = _problem_lines(tree, capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{json_path}: annotation 50 (image 3): ") and words in lines[0]
    assert lines[0].endswith(f"[{KINDS[defect]}]")
    # The bad annotation is skipped (or, reaching outside, drawn clipped as pycocotools draws it); nothing fails.
    drawn = defect in ("polygon outside", "bbox outside")
    expected = oracle_masks(json_path, skip=() if drawn else (50,))
    got = dataset_masks(CocoDataset(tree, "train"))
    assert all((got[i] == expected[i]).all() for i in expected)
    assert (got[3].max() > 0) == drawn


def test_a_listed_image_missing_on_disk_is_one_line_and_left_out(tree, capsys):
    (tree / "train" / "b.jpg").unlink()
    lines = _problem_lines(tree, capsys)
    assert len(lines) == 1 and lines[0].startswith(f"{tree / 'train' / 'b.jpg'}: image 2 of instances_train.json")
    assert lines[0].endswith("[listed-image-missing]")
    assert CocoDataset(tree, "train").ids == ["1", "3"]


@pytest.mark.parametrize("text", ['{"images": [', "[1, 2]", "\xff\xfe"])
def test_unreadable_json_is_one_line(tree, capsys, text):
    path = tree / "annotations" / "instances_train.json"
    path.write_bytes(text.encode("latin-1"))
    lines = _problem_lines(tree, capsys)
    assert len(lines) == 1 and lines[0].startswith(f"{path}: ") and lines[0].endswith("[unreadable-annotations]")


def test_rle_string_counts_match_pycocotools(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = (rng.random((H, W)) < rng.random()).astype(np.uint8)
        counts = rle_string_counts(compressed_rle(mask)["counts"])
        # The runs, by hand: column-major order, starting with zeros.
        assert counts == uncompressed_rle(mask)["counts"]
    good = compressed_rle(box(1, 1, 5, 5))["counts"]
    assert rle_string_counts(good[:-1] + chr(48 + ((ord(good[-1]) - 48) | 0x20))) is None  # ends mid-count
    assert rle_string_counts("0 1") is None  # a character outside COCO's alphabet


# ------------------------------------------------------------------------------------------------ pycocotools


def _block_pycocotools(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "pycocotools" or m.startswith("pycocotools.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import then raises ImportError
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)


def test_without_pycocotools_the_message_is_one_line(tree, monkeypatch, capsys):
    _block_pycocotools(monkeypatch)
    with pytest.raises(FcnsegError) as info:
        CocoDataset(tree, "train")
    assert str(info.value) == 'coco dataset needs pycocotools: pip install "fcnseg[coco]"'
    assert main(["check-data", "--dataset", "coco", "--root", str(tree), "--split", "train"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'fcnseg: error: coco dataset needs pycocotools: pip install "fcnseg[coco]"'
    ]


def test_the_module_imports_without_pycocotools(monkeypatch):
    import fcnseg.data
    from fcnseg.data import base

    _block_pycocotools(monkeypatch)
    # Everything the fresh import replaces is put back afterwards: the registry entry, the module, the attribute.
    monkeypatch.delitem(base._DATASETS, "coco")
    monkeypatch.delitem(sys.modules, "fcnseg.data.coco")
    monkeypatch.setattr(fcnseg.data, "coco", coco_module, raising=False)
    fresh = importlib.import_module("fcnseg.data.coco")
    assert fresh is not coco_module and base._DATASETS["coco"] is fresh.CocoDataset
    assert "pycocotools" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]


def test_after_the_fresh_import_the_original_module_is_back():
    import fcnseg.data
    from fcnseg.data import base

    assert fcnseg.data.coco is coco_module and base._DATASETS["coco"] is CocoDataset
