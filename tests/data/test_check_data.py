"""check-data: a clean tree passes with exact pixel counts; a tree with one problem of each kind is found completely."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.data.base import SegmentationDataset
from fcnseg.data.check import PROBLEM_KINDS, Problem, check_dataset
from fcnseg.data.folder import FolderDataset
from fcnseg.imageio import read_mask_png
from tests.helpers import HANG_TIMEOUT

BG, CAT, DOG = (0, 0, 0), (250, 0, 0), (0, 250, 0)
VOID = (224, 224, 192)


# ------------------------------------------------------------------------------------------- writers


def _image(root: Path, name: str, w: int, h: int) -> Path:
    path = root / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _mask(root: Path, stem: str, values, mode: str = "L") -> Path:
    """``mode`` "L": grey values; "P": palette PNG of the indices; "RGB": ``values`` are colour triples."""
    path = root / "masks" / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(values, dtype=np.uint8)
    if mode == "P":
        img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.tobytes())
        img.putpalette([255 - (i % 256) for i in range(768)])
    else:
        img = Image.fromarray(arr)
    img.save(path)
    with Image.open(path) as back:
        assert back.mode == mode
    return path


def clean_tree(root: Path) -> Path:
    """Three pairs, one per mask format. Pixels: background 8, cat 4, dog 4, void 3 (19 in all)."""
    root.mkdir(exist_ok=True)
    (root / "classes.txt").write_text("background\t0,0,0\ncat\t250,0,0\ndog\t0,250,0\n")
    _image(root, "a.jpg", 4, 3)
    _mask(root, "a", [[0, 0, 1, 1], [0, 2, 2, 255], [0, 0, 0, 0]], "P")  # bg 7, cat 2, dog 2, void 1
    _image(root, "b.png", 2, 2)
    _mask(root, "b", [[1, 1], [255, 2]])  # cat 2, dog 1, void 1
    _image(root, "c.jpeg", 3, 1)
    _mask(root, "c", [[BG, DOG, VOID]], "RGB")  # bg 1, dog 1, void 1
    return root


def problem_tree(root: Path) -> tuple[Path, set[tuple[str, str]]]:
    """Two good pairs and one problem of each kind; returns the root and the (file, kind) pairs to expect."""
    clean_tree(root)  # a, b, c: good
    images, masks = root / "images", root / "masks"
    (images / "badimg.jpg").write_bytes(b"this is not a JPEG file")
    _mask(root, "badimg", [[0, 1], [1, 0]])
    # A noisy mask compresses badly, so cutting the file in half lands inside its pixel data.
    _image(root, "trunc.png", 40, 30)
    full = _mask(root, "trunc", np.random.default_rng(1).integers(0, 3, (30, 40))).read_bytes()
    (masks / "trunc.png").write_bytes(full[: len(full) // 2])
    _image(root, "lonely.jpg", 2, 2)
    _mask(root, "orphan", [[0]])
    _image(root, "size.png", 5, 4)
    _mask(root, "size", np.zeros((4, 4)))
    _image(root, "seven.png", 3, 2)
    _mask(root, "seven", [[0, 7, 1], [7, 255, 2]])
    _image(root, "foreign.png", 2, 2)
    _mask(root, "foreign", [[CAT, (9, 9, 9)], [(9, 9, 9), (9, 9, 9)]], "RGB")
    stems = ["a", "b", "badimg", "trunc", "lonely", "orphan", "size", "seven", "foreign", "ghost", "c"]
    (root / "train.txt").write_text("\n".join(stems) + "\n")
    (root / "val.txt").write_text("\n")
    expected = {
        (str(images / "badimg.jpg"), "unreadable-image"),
        (str(masks / "trunc.png"), "unreadable-mask"),
        (str(images / "lonely.jpg"), "image-without-mask"),
        (str(masks / "orphan.png"), "mask-without-image"),
        (str(masks / "size.png"), "size-mismatch"),
        (str(masks / "seven.png"), "bad-mask-values"),
        (str(masks / "foreign.png"), "unknown-colour"),
        (str(root / "train.txt"), "id-without-files"),
        (str(root / "val.txt"), "empty-split"),
    }
    return root, expected


def _table(stdout: str) -> dict[str, list[str]]:
    """Summary rows by their first word."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.strip()}


PROBLEM_LINE = __import__("re").compile(r"^(?P<file>[^:]+): .* \[(?P<kind>[a-z-]+)\]$")


def _problem_lines(stdout: str) -> list[str]:
    """The problem lines among the summaries on stdout: ``<file>: <message> [<kind>]``."""
    return [line for line in stdout.splitlines() if PROBLEM_LINE.match(line)]


def _reported(stdout: str) -> set[tuple[str, str]]:
    return {PROBLEM_LINE.match(line).group("file", "kind") for line in _problem_lines(stdout)}


def _only_progress(stderr: str, count: int | None = None) -> None:
    """stderr holds the progress bar and, when there were problems, the one-line count."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fcnseg: error: ")]
    assert all(line.startswith("check-data:") for line in lines if line not in errors), stderr
    assert errors == ([] if count is None else [errors[0]]) and (count is None or f" {count} problem(s) " in errors[0])


# ------------------------------------------------------------------------------------------- clean


def test_clean_tree_passes_with_exact_counts(tmp_path, capsys):
    root = clean_tree(tmp_path / "data")
    report = check_dataset(FolderDataset(root, "all"))
    assert report.ok and report.problems == []
    assert (report.images, report.clean) == (3, 3)
    assert report.class_pixels == [8, 4, 4] and report.void_pixels == 3 and report.total_pixels == 19

    assert main(["check-data", "--dataset", "folder", "--root", str(root), "--split", "all"]) == 0
    out, err = capsys.readouterr()
    rows = _table(out)
    assert out.splitlines()[0] == "folder split 'all': 3 images, 3 read cleanly"
    assert rows["background"] == ["8", "42.11%"]  # 8 / 19
    assert rows["cat"] == ["4", "21.05%"]
    assert rows["dog"] == ["4", "21.05%"]
    assert rows["void"] == ["3", "15.79%"]
    assert rows["total"] == ["19"]
    assert "no problems" in out
    assert _problem_lines(out) == [] and "check-data: 100%" in err  # the progress bar
    _only_progress(err)


def test_quiet_prints_nothing_when_clean(tmp_path, capsys):
    root = clean_tree(tmp_path / "data")
    assert main(["check-data", "--dataset", "folder", "--root", str(root), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------------------------------- problems


def test_every_problem_is_found(tmp_path, capsys):
    root, expected = problem_tree(tmp_path / "data")
    report = check_dataset(FolderDataset(root, "train"))
    assert {(p.file, p.kind) for p in report.problems} == expected
    assert len(report.problems) == len(expected)  # each once
    assert all(p.kind in PROBLEM_KINDS for p in report.problems)
    # The train split holds a, b, c and the five bad stems with both files; a, b, c are clean and counted.
    assert (report.images, report.clean) == (8, 3)
    assert report.class_pixels == [8, 4, 4] and report.void_pixels == 3

    by_kind = {p.kind: p for p in report.problems}
    assert by_kind["bad-mask-values"].message == "values 7 (2 px) are neither a class index 0..2 nor 255 (void)"
    assert by_kind["unknown-colour"].message.startswith("colour 9,9,9 (3 px) not in the palette of")
    assert by_kind["size-mismatch"].message == "mask is 4x4 but its image size.png is 5x4; expected the same size"
    assert by_kind["id-without-files"].message == "'ghost' has no image in images/ and no mask in masks/"
    assert by_kind["empty-split"].message == "split 'val' is empty: lists no stems"
    assert by_kind["unreadable-image"].message.startswith("cannot read image (")
    assert by_kind["unreadable-mask"].message.startswith("cannot read mask (")
    assert by_kind["image-without-mask"].message == "no mask masks/lonely.png for this image; it is skipped"
    assert by_kind["mask-without-image"].message == "no image images/orphan.jpg|jpeg|png for this mask; it is skipped"

    assert main(["check-data", "--dataset", "folder", "--root", str(root)]) == 2
    out, err = capsys.readouterr()
    # Every split by default; the empty val split was seen by train's tree-wide check already: listed once.
    assert _reported(out) == expected
    assert len(_problem_lines(out)) == len(expected)
    assert out.splitlines()[0] == "folder split 'train': 8 images, 3 read cleanly, 5 with problems"
    rows = _table(out)
    assert rows["background"] == ["8", "42.11%"] and rows["void"] == ["3", "15.79%"]
    assert "9 problem(s)" in out
    assert sorted(out.splitlines()[9:]) == sorted(p.line() for p in report.problems)  # right after the summary
    _only_progress(err, count=9)
    assert "Traceback" not in err


def test_tree_level_extras(tmp_path):
    root = clean_tree(tmp_path / "data")
    (root / "images" / "d.bmp").write_bytes(b"BM")
    _image(root, "a.png", 4, 3)  # a.jpg is there already
    (root / "masks" / "notes.txt").write_text("hi")
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("c\nb\n")
    report = check_dataset(FolderDataset(root, "val"))
    assert {(p.file, p.kind) for p in report.problems} == {
        (str(root / "images" / "a.png"), "duplicate-stem"),
        (str(root / "images" / "d.bmp"), "unsupported-file"),
        (str(root / "masks" / "notes.txt"), "unsupported-file"),
        (str(root / "val.txt"), "split-overlap"),
    }
    messages = {p.file: p.message for p in report.problems}
    assert messages[str(root / "images" / "d.bmp")] == "not a .jpg, .jpeg or .png file; it is ignored"
    assert messages[str(root / "masks" / "notes.txt")] == "not a .png file; it is ignored"
    assert messages[str(root / "val.txt")] == "1 stem(s) also in train.txt: 'b'; expected disjoint splits"
    assert messages[str(root / "images" / "a.png")].startswith("a.jpg has the same stem; expected one image per stem")


def test_seeded_split_with_one_image_reports_empty_val(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    _image(root, "x.png", 2, 1)
    _mask(root, "x", [[0, 1]])
    report = check_dataset(FolderDataset(root, "train"))
    assert [(p.file, p.kind) for p in report.problems] == [(str(root), "empty-split")]
    assert report.class_pixels == [1, 1]


def test_missing_split_file_is_an_empty_split(tmp_path):
    root = clean_tree(tmp_path / "data")
    (root / "train.txt").write_text("a\n")
    report = check_dataset(FolderDataset(root, "train"))
    assert [(p.file, p.kind) for p in report.problems] == [(str(root / "val.txt"), "empty-split")]


# ------------------------------------------------------------------------------------------- other datasets


class _FileDataset(SegmentationDataset):
    """A dataset with files and no extra_problems hook: checked per id."""

    classes = ("a", "b")

    def __init__(self, root: Path, ids: list[str]) -> None:
        super().__init__()
        self.root, self.split, self.ids = root, "train", ids

    def image_path(self, index: int) -> Path:
        return self.root / "images" / f"{self.ids[index]}.png"

    def mask_path(self, index: int) -> Path:
        return self.root / "masks" / f"{self.ids[index]}.png"

    def read_mask(self, path: Path) -> np.ndarray:
        return read_mask_png(path)


def test_dataset_with_files_checked_per_id(tmp_path):
    _image(tmp_path, "ok.png", 2, 1)
    _mask(tmp_path, "ok", [[1, 255]])
    _image(tmp_path, "nomask.png", 2, 1)
    _mask(tmp_path, "noimage", [[0, 0]])
    report = check_dataset(_FileDataset(tmp_path, ["ok", "nomask", "noimage", "nothing"]))
    img, msk = tmp_path / "images", tmp_path / "masks"
    assert {(p.file, p.kind) for p in report.problems} == {
        (str(img / "nomask.png"), "image-without-mask"),
        (str(msk / "noimage.png"), "mask-without-image"),
        (str(img / "nothing.png"), "id-without-files"),
    }
    assert report.class_pixels == [0, 1] and report.void_pixels == 1 and report.clean == 1


class _Generated(SegmentationDataset):
    """No files: items come from load_pair only (like the synthetic dataset)."""

    classes = ("a", "b", "c")

    def __init__(self, masks: list[np.ndarray]) -> None:
        super().__init__()
        self.masks, self.split, self.ids = masks, "train", [f"item{i}" for i in range(len(masks))]

    def load_pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.masks[index] is None:
            raise RuntimeError("generator broke")
        mask = np.asarray(self.masks[index], dtype=np.uint8)
        return np.zeros((*mask.shape, 3), np.uint8), mask


def test_dataset_without_files_checked_through_load_pair():
    report = check_dataset(_Generated([[[0, 1, 2]], [[9, 9, 255]], None]))
    assert report.problems == [
        Problem(
            "_Generated[item1]", "bad-mask-values", "values 9 (2 px) are neither a class index 0..2 nor 255 (void)"
        ),
        Problem("_Generated[item2]", "unreadable-item", "cannot read item (RuntimeError: generator broke)"),
    ]
    assert report.class_pixels == [1, 1, 1] and report.clean == 1
    empty = check_dataset(_Generated([]))
    assert [(p.file, p.kind) for p in empty.problems] == [("--split train", "empty-split")]


def test_synthetic_dataset_is_checkable():
    from fcnseg.data import get_dataset

    ds = get_dataset("synthetic", split="val", num_images=2, size=16)
    report = check_dataset(ds)
    assert report.ok and report.clean == 2 and report.total_pixels == 2 * 16 * 16


# ------------------------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--dataset", "folder", "--root", "{tmp}/nowhere"], "--root .*nowhere: no such folder"),
        (["--dataset", "nope", "--root", "{tmp}"], "--dataset 'nope': unknown dataset"),
        (["--dataset", "folder", "--root", "{tmp}/data", "--split", "test"], "--split 'test'"),
        (["--dataset", "folder", "--root", "{tmp}"], r"classes\.txt: class list not found"),
    ],
)
def test_bad_arguments_give_one_line(tmp_path, capsys, argv, pattern):
    clean_tree(tmp_path / "data")
    assert main(["check-data", *(a.format(tmp=tmp_path) for a in argv)]) == 2
    out, err = capsys.readouterr()
    assert len(err.splitlines()) == 1 and err.startswith("fcnseg: error: ")
    assert __import__("re").search(pattern, err)


def test_subprocess_reports_problems_without_traceback(tmp_path):
    root, expected = problem_tree(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, "-m", "fcnseg", "check-data", "--dataset", "folder", "--root", str(root), "--quiet"],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert _reported(proc.stdout) == expected and len(proc.stdout.splitlines()) == len(expected)  # --quiet: no summary
    assert proc.stderr == "fcnseg: error: 9 problem(s) in folder split(s) train, val\n"


# ------------------------------------------------------------------------------------------- every split


def _seeded_tree_with_a_bad_val_image(root: Path) -> tuple[Path, str]:
    """Ten good pairs and no split files (a seeded 80/20 split); one of the val images is then truncated."""
    root.mkdir()
    (root / "classes.txt").write_text("background\ncat\n")
    for i in range(10):
        _image(root, f"im{i}.jpg", 24, 16)
        _mask(root, f"im{i}", np.random.default_rng(i).integers(0, 2, (16, 24)))
    val = FolderDataset(root, "val")
    assert len(val) == 2
    bad = val.image_path(0)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    return root, str(bad)


def test_default_checks_every_split(tmp_path, capsys):
    root, bad = _seeded_tree_with_a_bad_val_image(tmp_path / "data")
    assert main(["check-data", "--dataset", "folder", "--root", str(root), "--split", "train"]) == 0
    assert "no problems" in capsys.readouterr().out  # train alone is clean...
    assert main(["check-data", "--dataset", "folder", "--root", str(root)]) == 2  # ...val is not
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "folder split 'train': 8 images, 8 read cleanly"
    assert "folder split 'val': 2 images, 1 read cleanly, 1 with problems" in out.splitlines()
    assert _reported(out) == {(bad, "unreadable-image")}
    assert out.rstrip().splitlines()[-1].startswith(f"{bad}: cannot read image (")
    _only_progress(err, count=1)


def test_a_split_that_cannot_be_opened_is_one_problem_and_the_others_are_read(tmp_path, capsys):
    from tests.data.test_nyud import make_nyud

    root = make_nyud(tmp_path / "nyud")
    (root / "val.txt").unlink()
    assert main(["check-data", "--dataset", "nyud", "--root", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert _reported(out) == {(str(root / "val.txt"), "unreadable-split-file")}
    assert err == "fcnseg: error: 1 problem(s) in nyud split(s) train, val, test\n"
    # Asked for by name, the same split is the usual one-line error.
    assert main(["check-data", "--dataset", "nyud", "--root", str(root), "--split", "val"]) == 2
    assert capsys.readouterr().err.startswith(f"fcnseg: error: {root / 'val.txt'}: split file not found")


# ------------------------------------------------------------------------------------------- label-value traps


def test_the_label_value_histogram_counts_every_value_seen(tmp_path, capsys):
    root, _ = problem_tree(tmp_path / "data")
    report = check_dataset(FolderDataset(root, "train"))
    # a, b, c as in clean_tree, plus seven.png's values (bg 1, 7 twice, cat 1, void 1, dog 1), which is a problem
    # item and so not in the class table, but is in the histogram: the histogram is what the files hold.
    assert report.values == {0: 9, 1: 5, 2: 5, 7: 2, 255: 4}
    main(["check-data", "--dataset", "folder", "--root", str(root), "--split", "train"])
    assert "label values: 0: 9 px, 1: 5 px, 2: 5 px, 7: 2 px, 255: 4 px" in capsys.readouterr().out.splitlines()


def _trap_tree(root: Path, classes: str, masks: dict[str, list], splits: dict[str, str] | None = None) -> Path:
    root.mkdir()
    (root / "classes.txt").write_text(classes)
    for stem, values in masks.items():
        arr = np.asarray(values, dtype=np.uint8)
        _image(root, f"{stem}.png", arr.shape[1], arr.shape[0])
        _mask(root, stem, arr, "RGB" if arr.ndim == 3 else "L")
    for split, stems in (splits or {}).items():
        (root / f"{split}.txt").write_text("\n".join(stems.split()) + "\n")
    return root


def _warnings(root: Path, capsys, split: str | None = "all") -> tuple[int, list[tuple[str, str]]]:
    code = main(
        ["check-data", "--dataset", "folder", "--root", str(root), "--quiet", *(["--split", split] * bool(split))]
    )
    out = capsys.readouterr().out
    return code, sorted((m.group("file"), m.group("kind")) for m in map(PROBLEM_LINE.match, out.splitlines()) if m)


def test_binary_masks_for_three_classes_warn_once(tmp_path, capsys):
    root = _trap_tree(tmp_path / "d", "background\ncat\ndog\n", {"a": [[0, 1], [1, 1]], "b": [[0, 0], [1, 255]]})
    assert _warnings(root, capsys) == (0, [(str(root), "binary-masks")])  # a warning: the exit code stays 0
    # The same masks with two classes are what binary masks should be: no warning.
    root2 = _trap_tree(tmp_path / "e", "background\ncat\n", {"a": [[0, 1], [1, 1]], "b": [[0, 0], [1, 255]]})
    assert _warnings(root2, capsys) == (0, [])


def test_masks_that_mark_the_foreground_with_255_warn(tmp_path, capsys):
    masks = {"a": [[0, 255], [255, 255]], "b": [[0, 0], [0, 255]], "c": [[0, 1], [1, 255]]}
    root = _trap_tree(tmp_path / "d", "background\nroad\n", masks)
    assert _warnings(root, capsys) == (0, [(str(root), "void-as-class")])  # 2 of 3 masks are 0/255 only
    # VOC-like masks (classes, with 255 only on borders) do not warn.
    masks = {"a": [[0, 255], [1, 1]], "b": [[0, 0], [0, 1]], "c": [[0, 1], [1, 255]]}
    assert _warnings(_trap_tree(tmp_path / "e", "background\nroad\n", masks), capsys) == (0, [])


def test_rgb_masks_in_another_palette_are_problems_and_one_warning(tmp_path, capsys):
    red, blue = (255, 0, 0), (0, 0, 255)
    masks = {"a": [[BG, red], [red, BG]], "b": [[BG, blue], [BG, BG]]}
    root = _trap_tree(tmp_path / "d", "background\t0,0,0\ncat\t250,0,0\ndog\t0,250,0\n", masks)
    code, lines = _warnings(root, capsys)
    masks_dir = root / "masks"
    assert code == 2 and lines == sorted([
        (str(masks_dir / "a.png"), "unknown-colour"),
        (str(masks_dir / "b.png"), "unknown-colour"),
        (str(root), "colours-not-classes"),
    ])  # fmt: skip


def test_a_class_only_in_val_warns(tmp_path, capsys):
    masks = {"a": [[0, 2]], "b": [[0, 2]], "c": [[0, 1, 2]]}
    root = _trap_tree(tmp_path / "d", "background\ncat\ndog\n", masks, {"train": "a b", "val": "c"})
    assert _warnings(root, capsys, split=None) == (0, [(str(root), "class-missing-in-train")])
    main(["check-data", "--dataset", "folder", "--root", str(root), "--quiet"])
    assert "class(es) cat have pixels in val but none in train" in capsys.readouterr().out


def test_check_data_states_ade20ks_label_convention(tmp_path, capsys):
    from tests.data.test_ade20k import make_ade20k_tree

    root = make_ade20k_tree(tmp_path / "ade")
    assert main(["check-data", "--dataset", "ade20k", "--root", str(root), "--split", "val"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "labels: ade20k: annotation 0 ('other objects') is void; 1..150 are classes 0..149" in "\n".join(lines)
    assert not any(line.startswith("labels:") for line in _folder_summary(tmp_path, capsys))


def _folder_summary(tmp_path: Path, capsys) -> list[str]:
    """A folder tree's summary: it has no convention to state."""
    main(["check-data", "--dataset", "folder", "--root", str(clean_tree(tmp_path / "f")), "--split", "all"])
    return capsys.readouterr().out.splitlines()
