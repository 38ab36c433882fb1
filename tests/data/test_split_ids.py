"""Split lists name files inside the dataset only: an id that is a path (``../../outside``, ``/etc/x``, ``a/b``), a
folder or holds a NUL is refused by every dataset that reads lists, when the dataset is opened and by check-data,
naming the list file and the id."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from fcnseg.cli import main
from fcnseg.data import list_datasets
from fcnseg.data.base import SplitError, get_dataset, read_split_file
from fcnseg.data.voc import VOCSegmentation
from tests.data.fakes_voc import fake_image, make_sbd, make_voc, voc_mask, write_jpeg, write_voc_png
from tests.data.test_cvat import make_cvat_tree
from tests.data.test_folder import simple_tree
from tests.data.test_labelme import make_labelme_tree
from tests.data.test_nyud import make_nyud
from tests.data.test_siftflow import make_siftflow

ESCAPE = "../../outside"


def _voc(root: Path) -> Path:
    return (
        make_voc(root, "2012", {"train": ["2012_000001"], "val": ["2012_000002"]}) / "ImageSets/Segmentation/train.txt"
    )


def _sbd(root: Path) -> Path:
    return make_sbd(root, ["2008_000001"], ["2008_000002"]) / "train.txt"


def _seg11valid(root: Path) -> Path:
    make_sbd(root, ["2008_000001"], ["2008_000002"])
    return make_voc(root, "2011", {"val": ["2011_000001", "2011_000002"]}) / "ImageSets/Segmentation/val.txt"


def _folder(root: Path) -> Path:
    simple_tree(root, ["a", "b", "c"])
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("c\n")
    return root / "train.txt"


# Each dataset that reads split lists: a fake tree in a folder, and the list file that the first split it checks
# reads (check-data reads the dataset's disjoint splits in order).
TREES: dict[str, Callable[[Path], Path]] = {
    "voc": _voc,
    "sbd": _sbd,
    "seg11valid": _seg11valid,
    "nyud": lambda root: make_nyud(root) / "train.txt",
    "siftflow": lambda root: make_siftflow(root) / "train.txt",
    "folder": _folder,
    "cvat": lambda root: make_cvat_tree(root) / "ImageSets/Segmentation/train.txt",
    "labelme": lambda root: make_labelme_tree(root) / "train.txt",
}


def test_every_registered_dataset_is_covered():
    # synthetic draws its images from a seed; COCO's items are its JSON's images, Cityscapes' and ADE20K's the files
    # in their folders: they read no list. Every other dataset must be in TREES.
    assert set(list_datasets()) == set(TREES) | {"synthetic", "coco", "cityscapes", "ade20k"}


def _corrupt(name: str, tmp_path: Path, bad: str = ESCAPE) -> tuple[Path, Path]:
    root = tmp_path / name
    listed = TREES[name](root)
    listed.write_text(listed.read_text() + f"{bad}\n")
    return root, listed


def _split_of(name: str, listed: Path) -> str:
    return listed.stem if name != "folder" else "train"


@pytest.mark.parametrize("name", sorted(TREES))
def test_opening_the_split_refuses_an_id_that_leaves_the_root(name, tmp_path):
    root, listed = _corrupt(name, tmp_path)
    line = len(listed.read_text().splitlines())
    with pytest.raises(SplitError) as caught:
        get_dataset(name, root=root, split=_split_of(name, listed))
    assert str(caught.value) == (
        f"{listed}: line {line}: id {ESCAPE!r} is not a bare id: it holds a folder separator (absolute paths and "
        "sub-folders are refused); expected one id a line, a file name without folder or suffix"
    )
    assert caught.value.kind == "unsafe-split-id"


@pytest.mark.parametrize("name", sorted(TREES))
def test_check_data_reports_it_and_fails(name, tmp_path, capsys):
    root, listed = _corrupt(name, tmp_path)
    assert main(["check-data", "--dataset", name, "--root", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()
    problems = [line for line in out.splitlines() if "[unsafe-split-id]" in line]
    assert len(problems) == 1 and problems[0].startswith(f"{listed}: line ") and repr(ESCAPE) in problems[0]
    assert err.startswith("fcnseg: error: ") and "problem(s)" in err
    # One split asked for: the usual one-line error, exit status 2.
    assert main(["check-data", "--dataset", name, "--root", str(root), "--split", _split_of(name, listed)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{listed}: line" in err and repr(ESCAPE) in err


def test_a_file_outside_the_root_is_not_read_and_vouched_for(tmp_path, capsys):
    # The files the escaping id names exist, outside the --root folder: without the check, the item loads and
    # check-data reports no problem at all.
    far = "../../../../outside"
    voc_dir = make_voc(tmp_path / "data", "2012", {"train": ["2012_000001"], "val": ["2012_000002"]})
    image = (voc_dir / "JPEGImages" / f"{far}.jpg").resolve()
    assert image == tmp_path / "outside.jpg"
    write_jpeg(image, fake_image("x", (20, 30)))
    write_voc_png(tmp_path / "outside.png", voc_mask("x", (20, 30)))
    listed = voc_dir / "ImageSets/Segmentation/train.txt"
    listed.write_text(f"2012_000001\n{far}\n")
    assert main(["check-data", "--dataset", "voc", "--root", str(tmp_path / "data"), "--quiet"]) == 2
    assert f"{listed}: line 2: id {far!r} is not a bare id" in capsys.readouterr().out
    with pytest.raises(SplitError, match="line 2"):
        VOCSegmentation(tmp_path / "data", "train")


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("../x", "folder separator"),
        ("/etc/passwd", "folder separator"),
        ("sub/2012_000001", "folder separator"),
        ("..\\..\\x", "folder separator"),
        ("..", "names a folder"),
        (".", "names a folder"),
        ("x\x00y", "NUL"),
        ("C:x", "drive"),
    ],
)
def test_what_is_not_a_bare_id(bad, why, tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(f"a\n\n  {bad}  \nb\n")
    with pytest.raises(SplitError, match=f"^{path}: line 3: id .* is not a bare id: .*{why}"):
        read_split_file(path)


def test_bare_ids_still_read_and_long_ones_are_shown_short(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("2008_000001\n img_5001 \ncoast_natu975\n...x\n2008_000001\n")
    assert read_split_file(path) == ["2008_000001", "img_5001", "coast_natu975", "...x"]
    path.write_text("a/" + "b" * 100_000 + "\n")
    with pytest.raises(SplitError) as caught:
        read_split_file(path)
    assert len(str(caught.value)) < 400 and "(100002 chars)" in str(caught.value)
