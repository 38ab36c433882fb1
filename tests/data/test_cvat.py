"""The cvat dataset: CVAT's "Segmentation mask 1.1" export, written by datumaro (the exporter CVAT calls) and by
hand after CVAT's format page, read back pixel for pixel; colours, the void label, subsets and check-data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcnseg.data.cvat  # noqa: F401  (registers "cvat")
from fcnseg.data.base import SplitError, get_dataset
from fcnseg.data.check import check_dataset, run_check_data
from fcnseg.data.cvat import CvatDataset, read_labelmap
from fcnseg.data.folder import MaskColorError
from fcnseg.errors import FcnsegError

H, W = 24, 32
# CVAT's format page: background first (0,0,0), then the task's labels with their colours.
LABELS = {"background": (0, 0, 0), "car": (255, 0, 0), "person": (0, 0, 255), "tree": (0, 128, 0)}
VOID_RGB = (224, 224, 192)


# ------------------------------------------------------------------------------------------- a hand-written export


def _index_mask(seed: int, n: int) -> np.ndarray:
    """Blocks of class indices 0..n-1, every index present (4 x 4 blocks of 6 x 8 pixels)."""
    rng = np.random.default_rng(seed)
    blocks = np.concatenate([np.arange(n), rng.integers(0, n, 16 - n)])
    rng.shuffle(blocks)
    return np.kron(blocks.reshape(4, 4), np.ones((H // 4, W // 4), dtype=np.int64)).astype(np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def _paint(indices: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    return np.array(colors, dtype=np.uint8)[indices]


def write_export(root: Path, subsets: dict[str, list[str]], labels: dict = LABELS) -> dict[str, np.ndarray]:
    """A CVAT "Segmentation mask 1.1" export as its format page lays it out; returns each id's class indices."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["# label:color_rgb:parts:actions"] + [f"{n}:{r},{g},{b}::" for n, (r, g, b) in labels.items()]
    (root / "labelmap.txt").write_bytes(("\n".join(lines) + "\n").encode())
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    truth = {}
    for seed, image_id in enumerate(i for ids in subsets.values() for i in ids):
        truth[image_id] = indices = _index_mask(seed, len(labels))
        _write_rgb(root / "SegmentationClass" / f"{image_id}.png", _paint(indices, list(labels.values())))
        # Instance masks in VOC's instance colours: present in every export, never read.
        _write_rgb(
            root / "SegmentationObject" / f"{image_id}.png", _paint((indices > 0).astype(int), [(0, 0, 0), (128, 0, 0)])
        )
        pixels = np.random.default_rng(100 + seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
        _write_rgb(root / "JPEGImages" / f"{image_id}.jpg", pixels)
    for name, ids in subsets.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_bytes("".join(f"{i}\n" for i in ids).encode())
    return truth


def make_cvat_tree(root: Path) -> Path:
    """A small clean CVAT export: subsets train (3 images) and val (2), 24x32, background and 3 classes, every class
    in every mask."""
    write_export(root, {"train": ["frame_000", "frame_001", "frame_002"], "val": ["frame_003", "frame_004"]})
    return root


def test_hand_written_export_reads_pixel_for_pixel(tmp_path):
    truth = write_export(tmp_path, {"train": ["a", "b"], "val": ["c"]})
    train = get_dataset("cvat", root=tmp_path, split="train")
    assert train.classes == ("background", "car", "person", "tree")
    assert train.palette.tolist() == [list(c) for c in LABELS.values()]
    assert train.ids == ["a", "b"]
    for i, image_id in enumerate(train.ids):
        image, mask = train[i]
        assert tuple(image.shape) == (3, H, W)
        assert np.array_equal(mask.numpy(), truth[image_id])
    val = CvatDataset(tmp_path, split="val")
    assert np.array_equal(val[0][1].numpy(), truth["c"])
    assert train.label_mapping() == {"format": "cvat", "colors": {n: list(c) for n, c in LABELS.items()}}
    report = check_dataset(train)
    assert report.ok and report.void_pixels == 0
    assert report.class_pixels == [int(sum((truth[i] == k).sum() for i in "ab")) for k in range(4)]


def test_make_cvat_tree_is_clean_with_every_class_in_train(tmp_path, capsys):
    root = make_cvat_tree(tmp_path / "cvat")
    assert run_check_data("cvat", str(root), quiet=True) == 0
    train = CvatDataset(root, split="train")
    seen = set()
    for i in range(len(train)):
        seen |= set(np.unique(train[i][1].numpy()).tolist())
    assert seen == {0, 1, 2, 3} and len(train) >= 2 and len(CvatDataset(root, split="val")) >= 2


# ------------------------------------------------------------------------------------------- datumaro's own export


def _datumaro_items(dm, subset: str | None, masks: dict[str, dict[str, np.ndarray]], labels: list[str]) -> list:
    items = []
    for k, (image_id, by_label) in enumerate(masks.items()):
        pixels = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
        anns = [dm.Mask(m, label=labels.index(name)) for name, m in by_label.items()]
        kwargs = {"subset": subset} if subset else {}
        media = dm.Image.from_numpy(np.ascontiguousarray(pixels[:, :, ::-1]))  # datumaro holds BGR, as OpenCV
        items.append(dm.DatasetItem(id=image_id, media=media, annotations=anns, **kwargs))
    return items


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _disc(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


MASKS = {
    "train": {"t1": {"car": _box(2, 10, 3, 12), "person": _disc(16, 22, 5)}, "t2": {"tree": _box(0, 24, 0, 5)}},
    "val": {"v1": {"person": _box(5, 20, 10, 30)}, "blank": {}},
}


def _export_with_datumaro(root: Path, subsets: dict[str, dict], **options) -> list[str]:
    """Exported as CVAT exports a task: the task's labels with their colours as the label map (CVAT adds
    background), through datumaro's voc_segmentation exporter; returns the source label order."""
    dm = pytest.importorskip("datumaro")
    labels = ["car", "person", "tree"]  # the task's labels, in the task's (not the label map's) order
    items = [it for subset, masks in subsets.items() for it in _datumaro_items(dm, subset, masks, labels)]
    dataset = dm.Dataset.from_iterable(items, categories=labels)
    label_map = {"background": [(0, 0, 0), [], []], **{n: [LABELS[n], [], []] for n in labels}}
    dataset.export(str(root), "voc_segmentation", save_media=True, image_ext=".png", label_map=label_map, **options)
    return labels


def _expected(by_label: dict[str, np.ndarray], classes: tuple[str, ...]) -> np.ndarray:
    out = np.zeros((H, W), dtype=np.uint8)
    for name, m in by_label.items():
        out[m] = classes.index(name)
    return out


def test_datumaro_export_reads_pixel_for_pixel(tmp_path):
    _export_with_datumaro(tmp_path, MASKS)
    # The label order is labelmap.txt's lines, as datumaro wrote them.
    lines = [ln.split(":")[0] for ln in (tmp_path / "labelmap.txt").read_text().splitlines() if ln[:1] != "#"]
    for split in ("train", "val"):
        ds = CvatDataset(tmp_path, split=split)
        assert ds.classes == tuple(lines) == ("background", "car", "person", "tree")
        assert ds.ids == [i for i, m in MASKS[split].items() if m]  # an image without annotations has no mask
        for i, image_id in enumerate(ds.ids):
            image, mask = ds[i]
            assert np.array_equal(mask.numpy(), _expected(MASKS[split][image_id], ds.classes))
            k = list(MASKS[split]).index(image_id)
            pixels = np.random.default_rng(k).integers(0, 256, (H, W, 3), dtype=np.uint8)
            assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels)
    problems = CvatDataset(tmp_path, split="val").extra_problems()
    assert [(Path(p.file).name, p.kind) for p in problems] == [("blank.png", "image-without-mask")]


def test_datumaro_export_without_colour_map_reads_label_line_indices(tmp_path):
    _export_with_datumaro(tmp_path, {"train": MASKS["train"]}, apply_colormap=False)
    ds = CvatDataset(tmp_path, split="train")
    with Image.open(ds.mask_path(0)) as img:
        assert img.mode == "L"
    for i, image_id in enumerate(ds.ids):
        assert np.array_equal(ds[i][1].numpy(), _expected(MASKS["train"][image_id], ds.classes))


def test_datumaro_default_subset(tmp_path, capsys):
    _export_with_datumaro(tmp_path, {None: MASKS["train"]})
    assert sorted(p.name for p in (tmp_path / "ImageSets" / "Segmentation").iterdir()) == ["default.txt"]
    assert CvatDataset.splits_in(tmp_path) == ("default",)
    ds = get_dataset("cvat", root=tmp_path, split="default")
    assert ds.ids == ["t1", "t2"]
    assert np.array_equal(ds[0][1].numpy(), _expected(MASKS["train"]["t1"], ds.classes))
    with pytest.raises(SplitError, match=r"train\.txt: split file not found; this export has the subset\(s\) default"):
        CvatDataset(tmp_path, split="train")
    assert run_check_data("cvat", str(tmp_path), "default", quiet=True) == 0


def test_check_data_without_split_reads_the_default_subset(tmp_path, capsys):
    _export_with_datumaro(tmp_path, {None: MASKS["train"]})
    assert run_check_data("cvat", str(tmp_path), quiet=True) == 0
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------------------- colours and labels


def test_unlisted_colour_is_one_check_data_line(tmp_path, capsys):
    truth = write_export(tmp_path, {"train": ["a", "b"], "val": ["c", "d"]})
    path = tmp_path / "SegmentationClass" / "b.png"
    rgb = _paint(truth["b"], list(LABELS.values()))
    rgb[0, :3] = (9, 9, 9)
    _write_rgb(path, rgb)
    with pytest.raises(MaskColorError, match=r"colour 9,9,9 \(3 px\) not in .*labelmap\.txt"):
        CvatDataset(tmp_path)[1]
    assert run_check_data("cvat", str(tmp_path), quiet=True) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{path}: colour 9,9,9 (3 px) not in {tmp_path / 'labelmap.txt'}; expected the colours of its "
                     "labels [unknown-colour]"]  # fmt: skip


def test_void_colour_only_when_the_label_map_names_it(tmp_path):
    labels = {**LABELS, "ignored": VOID_RGB}
    truth = write_export(tmp_path / "void", {"train": ["a"]}, labels)
    ds = CvatDataset(tmp_path / "void")
    assert ds.classes == ("background", "car", "person", "tree")  # "ignored" is void, not a class
    expected = np.where(truth["a"] == 4, 255, truth["a"])
    assert np.array_equal(ds[0][1].numpy(), expected)
    assert ds.label_mapping()["void"] == {"ignored": list(VOID_RGB)}
    as_class = CvatDataset(tmp_path / "void", void_label=None)
    assert as_class.classes[-1] == "ignored"
    assert np.array_equal(as_class[0][1].numpy(), truth["a"])
    # Pascal VOC's border colour in a label map without it: no class, so an error rather than a silent void.
    truth = write_export(tmp_path / "plain", {"train": ["a"]})
    rgb = _paint(truth["a"], list(LABELS.values()))
    rgb[5, 5] = VOID_RGB
    _write_rgb(tmp_path / "plain" / "SegmentationClass" / "a.png", rgb)
    with pytest.raises(MaskColorError, match="224,224,192"):
        CvatDataset(tmp_path / "plain")[0]


def test_one_channel_mask_holds_label_lines_with_the_void_line_between_classes(tmp_path):
    write_export(tmp_path, {"train": ["a"]}, {"background": (0, 0, 0), "ignored": VOID_RGB, "car": (255, 0, 0)})
    lines = np.resize(np.array([0, 1, 2, 255], dtype=np.uint8), (H, W))
    Image.fromarray(lines).save(tmp_path / "SegmentationClass" / "a.png")
    ds = CvatDataset(tmp_path)
    assert ds.classes == ("background", "car")
    # Line 0 background -> 0, line 1 ignored -> void, line 2 car -> 1; 255 stays void.
    expected = np.array([0, 255, 1, 255], dtype=np.uint8)[np.resize(np.arange(4), (H, W))]
    assert np.array_equal(ds[0][1].numpy(), expected)


def test_labels_without_colours_take_pascal_vocs_by_line(tmp_path):
    path = tmp_path / "labelmap.txt"
    path.write_text("# label:color_rgb:parts:actions\nbackground:::\naeroplane:::\nbicycle:::\nbird:::\n")
    # The devkit's rule by hand: bits 0, 1, 2 of the index go to bit 7 of red, green, blue.
    assert read_labelmap(path) == [
        ("background", (0, 0, 0)),
        ("aeroplane", (128, 0, 0)),
        ("bicycle", (0, 128, 0)),
        ("bird", (128, 128, 0)),
    ]


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        ("background:0,0,0::\ncar:255,0,0:\n", 2, r"has 3 ':'-separated fields; expected one label a line"),
        ("background:0,0,0::\ncar:255,0::\n", 2, r"colour '255,0' of label 'car'; expected R,G,B"),
        ("background:0,0,0::\ncar:256,0,0::\n", 2, r"colour '256,0,0'"),
        ("# heading\nbackground:0,0,0::\n\ncar:0,0,0::\n", 4, r"labels 'background' and 'car' share the colour 0,0,0"),
        ("background:0,0,0::\nbackground:1,1,1::\n", 2, r"listed twice"),
        ("background:0,0,0::\ncar:::\n", 2, r"label 'car' has no colour; expected a colour on every line or on none"),
        ("background:0,0,0::\n:1,2,3::\n", 2, r"empty label name"),
    ],
)
def test_malformed_label_map_is_one_line_naming_file_and_line(tmp_path, text, line, pattern):
    write_export(tmp_path, {"train": ["a"]})
    (tmp_path / "labelmap.txt").write_text(text)
    with pytest.raises(FcnsegError) as info:
        run_check_data("cvat", str(tmp_path), quiet=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'labelmap.txt'}:{line}: ")
    assert re.search(pattern, message)


def test_layout_errors_are_one_line(tmp_path):
    write_export(tmp_path, {"train": ["a"]})
    for gone, pattern in (("JPEGImages", "Save images"), ("labelmap.txt", "label map not found")):
        moved = tmp_path / gone
        moved.rename(tmp_path / "aside")
        with pytest.raises(FcnsegError, match=pattern):
            CvatDataset(tmp_path)
        (tmp_path / "aside").rename(moved)
    with pytest.raises(FcnsegError, match="void_label"):
        CvatDataset(tmp_path, void_label=3)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("../outside\n")
    with pytest.raises(SplitError, match="not a bare id"):
        CvatDataset(tmp_path)


def test_listed_ids_without_files_are_reported(tmp_path):
    write_export(tmp_path, {"train": ["a", "b"]})
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\nghost\n")
    (tmp_path / "JPEGImages" / "b.jpg").unlink()
    ds = CvatDataset(tmp_path)
    assert ds.ids == ["a", "b"]
    report = check_dataset(ds)
    assert sorted((Path(p.file).name, p.kind) for p in report.problems) == [
        ("b.png", "mask-without-image"),
        ("train.txt", "id-without-files"),
    ]
