"""The labelme dataset: JSON files in the schema labelme writes, drawn into masks compared with an independent
rasterisation after labelme's rules (one PIL.ImageDraw mask per shape, assigned in order, as labelme's
shapes_to_label does) and with hand-computed pixels; labels.txt, __ignore__, splits and check-data."""

from __future__ import annotations

import base64
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import fcnseg.data.labelme  # noqa: F401  (registers "labelme")
from fcnseg.data.base import SplitError, get_dataset
from fcnseg.data.check import check_dataset, run_check_data
from fcnseg.data.labelme import LabelmeDataset, read_labels_file
from fcnseg.errors import FcnsegError

H, W = 24, 32


# ------------------------------------------------------------------------------------------- labelme's files


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _mask_b64(mask: np.ndarray) -> str:
    """A mask shape's "mask" as labelme writes it: a PNG of the uint8 0/1 array, base64."""
    return base64.b64encode(_encode(mask.astype(np.uint8))).decode()


def shape(label: str, points: list, shape_type: str | None = "polygon", mask: np.ndarray | None = None) -> dict:
    """One entry of "shapes", with every key labelme writes."""
    return {
        "label": label,
        "points": [[float(x), float(y)] for x, y in points],
        "group_id": None,
        "description": "",
        "shape_type": shape_type,
        "flags": {},
        "mask": None if mask is None else _mask_b64(mask),
    }


def write_json(root: Path, stem: str, shapes: list[dict], *, seed: int = 0, inline: bool = True, fmt="PNG") -> Path:
    """``root/<stem>.json`` as labelme saves it; the image inline (imageData) or as ``<stem>.png`` beside it."""
    root.mkdir(parents=True, exist_ok=True)
    data = _encode(_pixels(seed), fmt)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    if not inline:
        (root / f"{stem}{suffix}").write_bytes(data)
    doc = {
        "version": "5.5.0",
        "flags": {},
        "shapes": shapes,
        "imagePath": f"{stem}{suffix}",
        "imageData": base64.b64encode(data).decode() if inline else None,
        "imageHeight": H,
        "imageWidth": W,
    }
    path = root / f"{stem}.json"
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2))
    return path


def write_labels(root: Path, *labels: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.txt").write_text("".join(f"{x}\n" for x in labels))


def make_labelme_tree(root: Path) -> Path:
    """A small clean labelme folder: labels.txt (__ignore__, _background_, cat, dog), 5 JSON files of 24x32 with
    inline PNG images, train.txt (3 stems) and val.txt (2); cat and dog in every file."""
    write_labels(root, "__ignore__", "_background_", "cat", "dog")
    for k in range(5):
        write_json(
            root,
            f"img{k}",
            [
                shape("cat", [(2 + k, 2), (14 + k, 3), (9, 18)]),
                shape("dog", [(18, 4 + k), (29, 20)], "rectangle"),
                shape("dog", [(24, 2)], "point"),
            ],
            seed=k,
        )
    (root / "train.txt").write_text("img0\nimg1\nimg2\n")
    (root / "val.txt").write_text("img3\nimg4\n")
    return root


# ------------------------------------------------------------------------------------------- the oracle


def oracle_region(s: dict) -> np.ndarray:
    """labelme's region for one shape, drawn alone with PIL.ImageDraw as its shape_to_mask documents: polygon and
    rectangle filled with their outline, circle as the ellipse around the centre through the rim point, line and
    linestrip 10 wide (joints rounded), point as a radius-5 disc; a mask shape placed at its rounded first point."""
    img = Image.new("L", (W, H), 0)
    draw = ImageDraw.Draw(img)
    xy = [tuple(p) for p in s["points"]]
    kind = s["shape_type"] or "polygon"
    if kind in ("polygon", "oriented_rectangle"):
        draw.polygon(xy, outline=1, fill=1)
    elif kind == "rectangle":
        (a, b), (c, d) = xy
        draw.rectangle([(min(a, c), min(b, d)), (max(a, c), max(b, d))], outline=1, fill=1)
    elif kind == "circle":
        (cx, cy), (px, py) = xy
        r = math.sqrt((cx - px) ** 2 + (cy - py) ** 2)
        draw.ellipse([(cx - r, cy - r), (cx + r, cy + r)], outline=1, fill=1)
    elif kind == "line":
        draw.line(xy, fill=1, width=10)
    elif kind == "linestrip":
        draw.line(xy, fill=1, width=10, joint="curve")
    elif kind == "point":
        (cx, cy) = xy[0]
        draw.ellipse([(cx - 5, cy - 5), (cx + 5, cy + 5)], outline=1, fill=1)
    out = np.array(img, dtype=bool)
    if kind == "mask":
        patch = np.array(Image.open(io.BytesIO(base64.b64decode(s["mask"])))).astype(bool)
        pts = np.array(s["points"])
        x0, y0 = (int(v) for v in np.round(pts[0]))
        if np.all(pts == np.trunc(pts)):
            x1, y1 = (int(v) for v in pts[1])
            patch = patch[: y1 - y0 + 1, : x1 - x0 + 1]
        full = np.zeros((H + 2 * 64, W + 2 * 64), dtype=bool)  # room for a patch hanging over any edge
        full[64 + y0 : 64 + y0 + patch.shape[0], 64 + x0 : 64 + x0 + patch.shape[1]] = patch
        out = full[64 : 64 + H, 64 : 64 + W]
    return out


def oracle_label(shapes: list[dict], value: dict[str, int]) -> np.ndarray:
    """labelme's shapes_to_label: zeros, then each shape's region set to its label's value, in file order."""
    cls = np.zeros((H, W), dtype=np.uint8)
    for s in shapes:
        cls[oracle_region(s)] = value[s["label"]]
    return cls


# ------------------------------------------------------------------------------------------- every shape type

_BLOB = np.zeros((7, 9), dtype=bool)
_BLOB[1:6, 2:8] = True
_BLOB[3, 4] = False
SHAPES = {
    "polygon": shape("a", [(3.2, 2.7), (25.5, 4.1), (12.0, 20.6), (5.0, 12.0)]),
    "null shape_type (a polygon)": shape("a", [(3, 3), (20, 5), (8, 19)], None),
    "rectangle, corners reversed": shape("a", [(27.4, 18.6), (6.2, 4.5)], "rectangle"),
    "circle": shape("a", [(15.5, 11.0), (21.0, 14.0)], "circle"),
    "line": shape("a", [(2, 3), (28, 20)], "line"),
    "linestrip": shape("a", [(2, 20), (10, 2), (18, 20), (30, 4)], "linestrip"),
    "point": shape("a", [(16.0, 12.0)], "point"),
    "oriented_rectangle": shape("a", [(4, 10), (14, 2), (26, 12), (16, 20)], "oriented_rectangle"),
    "mask, integer corners": shape("a", [(5, 4), (13, 10)], "mask", _BLOB),
    "mask, cut by integer corners": shape("a", [(5, 4), (9, 7)], "mask", _BLOB),
    "mask, fractional corners": shape("a", [(20.5, 15.6), (29.4, 22.2)], "mask", _BLOB),
    "mask over the edge": shape("a", [(27, 20), (35, 26)], "mask", _BLOB),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_each_shape_type_is_drawn_as_labelme_draws_it(tmp_path, name):
    s = SHAPES[name]
    write_labels(tmp_path, "__ignore__", "_background_", "a")
    write_json(tmp_path, "x", [s])
    ds = LabelmeDataset(tmp_path, split="all")
    image, mask = ds[0]
    expected = oracle_region(s).astype(np.uint8)
    assert expected.sum() > 0
    assert np.array_equal(mask.numpy(), expected)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), _pixels(0))


def test_rectangle_and_point_by_hand(tmp_path):
    write_labels(tmp_path, "_background_", "a", "b")
    write_json(tmp_path, "x", [shape("a", [(20, 15), (4, 3)], "rectangle"), shape("b", [(30, 2)], "point")])
    mask = LabelmeDataset(tmp_path, split="all")[0][1].numpy()
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[3:16, 4:21] = 1  # both corners' pixels included
    assert np.array_equal(mask == 1, expected == 1)
    ys, xs = np.nonzero(mask == 2)
    # A radius-5 disc around (30, 2), cut by the image: pixels within 5 of the centre, none beyond 5.5.
    assert ((xs - 30) ** 2 + (ys - 2) ** 2 <= 5.5**2).all()
    assert {(30, 0), (31, 2), (30, 7), (25, 2)} <= set(zip(xs.tolist(), ys.tolist(), strict=True))


def test_later_shapes_win_and_ignore_is_void(tmp_path):
    shapes = [
        shape("cat", [(0, 0), (20, 16)], "rectangle"),
        shape("dog", [(10, 8), (31, 23)], "rectangle"),
        shape("__ignore__", [(16, 12), (19, 12)], "circle"),
        shape("cat", [(2, 20)], "point"),
    ]
    write_labels(tmp_path, "__ignore__", "_background_", "dog", "cat")
    write_json(tmp_path, "x", shapes)
    ds = LabelmeDataset(tmp_path, split="all")
    assert ds.classes == ("_background_", "dog", "cat")  # labels.txt's order, not sorted
    mask = ds[0][1].numpy()
    assert np.array_equal(mask, oracle_label(shapes, {"dog": 1, "cat": 2, "__ignore__": 255}))
    assert mask[12, 12] == 1 and mask[1, 1] == 2 and mask[12, 16] == 255 and mask[2, 28] == 0
    assert ds.label_mapping() == {
        "format": "labelme",
        "labels": {"_background_": 0, "dog": 1, "cat": 2, "__ignore__": 255},
    }


def test_image_from_image_path_and_from_jpeg_image_data(tmp_path):
    write_labels(tmp_path, "_background_", "a")
    write_json(tmp_path, "beside", [shape("a", [(1, 1), (5, 5)], "rectangle")], seed=3, inline=False)
    write_json(tmp_path, "jpeg", [shape("a", [(1, 1), (5, 5)], "rectangle")], seed=4, fmt="JPEG")
    ds = LabelmeDataset(tmp_path, split="all")
    assert ds.ids == ["beside", "jpeg"]
    assert np.array_equal(ds[0][0].permute(1, 2, 0).numpy(), _pixels(3))
    decoded = np.array(Image.open(io.BytesIO(_encode(_pixels(4), "JPEG"))).convert("RGB"))
    assert np.array_equal(ds[1][0].permute(1, 2, 0).numpy(), decoded)


# ------------------------------------------------------------------------------------------- classes


def test_without_labels_txt_labels_are_gathered_with_one_warning(tmp_path):
    write_json(tmp_path, "a", [shape("zebra", [(1, 1), (5, 5)], "rectangle"), shape("__ignore__", [(3, 3)], "point")])
    write_json(tmp_path, "b", [shape("ant", [(1, 1), (5, 5)], "rectangle"), shape("_background_", [(9, 9)], "point")])
    with pytest.warns(UserWarning) as record:
        ds = LabelmeDataset(tmp_path, split="all")
    assert len(record) == 1
    assert "labels.txt: not found" in str(record[0].message) and "\n" not in str(record[0].message)
    assert ds.classes == ("_background_", "ant", "zebra")
    write_labels(tmp_path, "__ignore__", "_background_", "zebra", "ant")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LabelmeDataset(tmp_path, split="all").classes == ("_background_", "zebra", "ant")


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        (["__ignore__", "cat", "_background_"], r"labels\.txt:2: first class 'cat'; expected _background_"),
        (["_background_", "cat", "cat"], r"labels\.txt:3: label 'cat' is listed twice"),
        (["__ignore__", ""], r"labels\.txt: lists no labels"),
    ],
)
def test_bad_labels_file_is_one_line(tmp_path, lines, pattern):
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(FcnsegError, match=pattern) as info:
        read_labels_file(tmp_path / "labels.txt")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- check-data


def _problem_lines(root: Path, capsys, split: str | None = None) -> list[str]:
    code = run_check_data("labelme", str(root), split, quiet=True)
    lines = capsys.readouterr().out.splitlines()
    assert code == (2 if lines else 0)
    return lines


def test_unknown_label_is_one_check_data_line_and_an_error(tmp_path, capsys):
    root = make_labelme_tree(tmp_path / "lm")
    bad = write_json(root, "img1", [shape("cat", [(1, 1), (5, 5)], "rectangle"), shape("cow", [(3, 3)], "point"),
                                    shape("cow", [(9, 9)], "point")], seed=1)  # fmt: skip
    lines = _problem_lines(root, capsys)
    assert lines == [f"{bad}: label(s) 'cow' not in labels.txt; expected one of _background_, cat, dog or __ignore__ "
                     "[unknown-category]"]  # fmt: skip
    with pytest.raises(FcnsegError, match="'cow' not in labels.txt"):
        LabelmeDataset(root)[1]


def test_shape_and_file_problems_are_reported(tmp_path, capsys):
    root = make_labelme_tree(tmp_path / "lm")
    degenerate = write_json(root, "img0", [shape("cat", [(1, 1), (5, 5)]), shape("dog", [(3, 3), (9, 9)], "rectangle")])
    outside = write_json(root, "img2", [shape("dog", [(-1, 3), (9, 9)], "rectangle")], seed=2)
    (root / "img3.json").write_text('{"version": "5.5.0", "shapes": [')
    missing = write_json(root, "img4", [shape("dog", [(3, 3), (9, 9)], "rectangle")], inline=False)
    (root / "img4.png").unlink()
    lines = _problem_lines(root, capsys)
    assert sorted(line.rsplit(" [", 1)[1] for line in lines) == [
        "annotation-out-of-bounds]",
        "degenerate-annotation]",
        "listed-image-missing]",
        "unreadable-annotations]",
    ]
    assert f"{degenerate}: shapes[0] 'cat': polygon with 2 point(s); expected at least 3 (skipped) [" in "\n".join(
        lines
    )
    assert any(line.startswith(f"{outside}: shapes[0] 'dog': a point lies outside the 32x24 image") for line in lines)
    assert any(line.startswith(f"{missing}: imageData is null") for line in lines)
    assert any(line.startswith(f"{root / 'img3.json'}: cannot read it (JSONDecodeError)") for line in lines)
    # The degenerate polygon is skipped, the rectangle still drawn; the point outside is drawn cut to the image.
    ds = LabelmeDataset(root)
    assert np.array_equal(ds[0][1].numpy(), oracle_label([shape("dog", [(3, 3), (9, 9)], "rectangle")], {"dog": 2}))
    assert np.array_equal(ds[2][1].numpy(), oracle_label([shape("dog", [(-1, 3), (9, 9)], "rectangle")], {"dog": 2}))


def test_make_labelme_tree_is_clean_with_every_class_in_train(tmp_path, capsys):
    root = make_labelme_tree(tmp_path / "lm")
    assert _problem_lines(root, capsys) == []
    train = get_dataset("labelme", root=root, split="train")
    assert train.ids == ["img0", "img1", "img2"] and len(get_dataset("labelme", root=root, split="val")) == 2
    report = check_dataset(train)
    assert report.ok and all(n > 0 for n in report.class_pixels)


def test_splits_from_files_or_seeded(tmp_path):
    root = make_labelme_tree(tmp_path / "lm")
    (root / "val.txt").unlink()
    with pytest.raises(SplitError, match="val.txt: split file not found; train.txt exists"):
        LabelmeDataset(root, split="val")
    (root / "train.txt").unlink()
    train, val = LabelmeDataset(root, seed=3), LabelmeDataset(root, split="val", seed=3)
    assert sorted(train.ids + val.ids) == [f"img{k}" for k in range(5)] and len(val.ids) == 1
    assert set(train.ids).isdisjoint(val.ids)
    with pytest.raises(FcnsegError, match="--split 'test'"):
        LabelmeDataset(root, split="test")
