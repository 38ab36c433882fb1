"""Each annotation format end to end: a small tree written as the tool writes it trains for two iterations,
evaluates, and predicts with the format's own class names in the checkpoint, the metrics and the legend."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import fcnseg.predict
from fcnseg.checkpoint import read_checkpoint
from fcnseg.cli import main
from tests.data.test_ade20k import make_ade20k_tree
from tests.data.test_cityscapes import make_cityscapes_tree
from tests.data.test_coco import make_coco_tree
from tests.data.test_cvat import make_cvat_tree
from tests.data.test_labelme import make_labelme_tree

CITYSCAPES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
              "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
              "bicycle")  # fmt: skip


# The class names each format's own files give, read here without fcnseg: the ground truth of the names.
def _coco_names(root: Path) -> list[str]:
    cats = json.loads((root / "annotations/instances_train.json").read_text())["categories"]
    return ["background"] + [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def _cvat_names(root: Path) -> list[str]:
    lines = (root / "labelmap.txt").read_text().splitlines()
    return [line.split(":")[0] for line in lines if line.strip() and not line.startswith("#")]


def _labelme_names(root: Path) -> list[str]:
    return [x for x in (root / "labels.txt").read_text().split() if x != "__ignore__"]


def _ade20k_names(root: Path) -> list[str]:
    return []  # 150 names: checked by their known first ones below


FORMATS: dict[str, tuple[Callable[[Path], Path], Callable[[Path], list[str]]]] = {
    "coco": (make_coco_tree, _coco_names),
    "cvat": (make_cvat_tree, _cvat_names),
    "labelme": (make_labelme_tree, _labelme_names),
    "cityscapes": (make_cityscapes_tree, lambda root: list(CITYSCAPES)),
    "ade20k": (make_ade20k_tree, _ade20k_names),
}

TINY = ["--model", "fcn8s", "--width", "0.0625", "--fc-dim", "16", "--preset", "modern", "--crop-size", "0",
        "--batch-size", "2", "--iters", "2", "--val-every", "2", "--num-workers", "0", "--no-progress"]  # fmt: skip


def _first_val_image(name: str, root: Path, out: Path) -> Path:
    """The first val image as a PNG file (labelme's may live inline in its JSON)."""
    from PIL import Image

    from fcnseg.data import get_dataset

    image, _ = get_dataset(name, root=root, split="val").load_pair(0)
    Image.fromarray(image).save(out)
    return out


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_trains_evaluates_and_predicts_with_the_formats_class_names(name, tmp_path, monkeypatch, capsys):
    make_tree, names_of = FORMATS[name]
    root = make_tree(tmp_path / "data")
    expected = names_of(root)
    run, ev, pred = tmp_path / "run", tmp_path / "eval", tmp_path / "pred"
    data = ["--dataset", name, "--root", str(root)]
    assert main(["train", *data, *TINY, "--out", str(run)]) == 0

    ckpt = read_checkpoint(run / "best.pt")
    if name == "ade20k":
        assert len(ckpt["classes"]) == 150 and ckpt["classes"][:3] == ["wall", "building", "sky"]
        expected = ckpt["classes"]
    assert ckpt["classes"] == expected
    assert ckpt["extra"]["label_mapping"]["format"] == name  # how the files' labels became these classes

    assert main(["eval", str(run / "best.pt"), *data, "--split", "val", "--out", str(ev), "--quiet"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert list(metrics["per_class"]) == expected

    drawn: list[list[str]] = []
    real = fcnseg.predict.add_legend
    monkeypatch.setattr(fcnseg.predict, "add_legend", lambda *a: drawn.append(list(a[3])) or real(*a))
    image = _first_val_image(name, root, tmp_path / "photo.png")
    assert main(["predict", str(run / "best.pt"), str(image), "--out", str(pred), "--overlay"]) == 0
    assert drawn == [expected]
    assert (pred / f"{image.stem}.png").is_file() and (pred / f"{image.stem}_overlay.jpg").is_file()
