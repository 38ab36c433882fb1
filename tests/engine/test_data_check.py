"""`fcnseg train` checks its data before it makes the run folder, and an error in a DataLoader worker reaches the
user as its one line."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnseg.cli import main
from fcnseg.data import get_dataset
from fcnseg.data.base import SegmentationDataset
from fcnseg.data.check import quick_problems
from fcnseg.errors import FcnsegError, user_message
from tests.engine.test_train import _blocks_tree
from tests.helpers import TINY


def _truncate_as_jpeg(root, stem="im1"):
    """Replace ``stem``'s PNG image by a JPEG cut to its first half: its header still opens, its data ends early."""
    png = root / "images" / f"{stem}.png"
    Image.open(png).save(root / "images" / f"{stem}.jpg", quality=95)
    png.unlink()
    jpg = root / "images" / f"{stem}.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    return jpg


def _train_args(root, out, *extra):
    return ["train", "--dataset", "folder", "--root", str(root), "--model", "fcn32s", "--width", str(TINY["width"]),
            "--fc-dim", str(TINY["fc_dim"]), "--iters", "2", "--batch-size", "1", "--crop-size", "0",
            "--val-every", "2", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def test_a_truncated_image_stops_training_before_the_run_folder_is_made(tmp_path, capsys):
    _blocks_tree(tmp_path / "data", n=3, size=48)
    bad = _truncate_as_jpeg(tmp_path / "data")
    out = tmp_path / "run"
    assert main(_train_args(tmp_path / "data", out, "--num-workers", "0")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fcnseg: error: {bad}: "), err
    assert "[unreadable-image]" in err and "--no-check-data" in err
    assert not out.exists()


class _Listed(SegmentationDataset):
    """Items listed by id, as VOC's split files list them: images/<id>.jpg, masks/<id>.png."""

    classes = ("background", "thing")
    palette = np.zeros((2, 3), np.uint8)

    def __init__(self, root, ids):
        super().__init__()
        self.root, self.ids, self.split = root, ids, "train"

    def image_path(self, index):
        return self.root / "images" / f"{self.ids[index]}.jpg"

    def mask_path(self, index):
        return self.root / "masks" / f"{self.ids[index]}.png"

    def read_mask(self, path):
        return np.asarray(Image.open(path))


def test_quick_problems_finds_missing_files_and_size_mismatches(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("ok", "no_mask", "wide", "turned"):
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / f"{name}.jpg")
    for name, (h, w) in {"ok": (30, 40), "no_image": (30, 40), "wide": (30, 50), "turned": (40, 30)}.items():
        Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "masks" / f"{name}.png")
    # A phone photo stored 40 x 30 with EXIF orientation 6 (turn a quarter): read as 30 x 40, like its mask.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / "turned.jpg", exif=exif)
    ds = _Listed(tmp_path, ["ok", "no_mask", "no_image", "neither", "wide", "turned"])
    found = [(Path(p.file).name, p.kind) for p in quick_problems(ds)]
    assert found == [("no_mask.jpg", "image-without-mask"), ("no_image.png", "mask-without-image"),
                     ("neither.jpg", "id-without-files"), ("wide.png", "size-mismatch")]  # fmt: skip
    wide = [p for p in quick_problems(ds) if p.kind == "size-mismatch"][0]
    assert wide.message == "mask is 50x30 but its image wide.jpg is 40x30; expected the same size"


def test_a_folder_sets_unpaired_image_is_no_item_and_no_problem(tmp_path):
    # The folder dataset leaves an image without a mask out of its items (check-data lists it); training on the
    # other items goes ahead, and the size mismatch of an item is still found.
    root = tmp_path / "data"
    _blocks_tree(root, n=4, size=40)
    (root / "masks" / "im2.png").unlink()
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "masks" / "im3.png")  # 40 wide, 30 high
    found = [(p.file, p.kind) for p in quick_problems(get_dataset("folder", root=str(root), split="train"))]
    assert found == [(str(root / "masks" / "im3.png"), "size-mismatch")]


def test_a_worker_error_reaches_the_user_as_its_one_line(tmp_path, capsys):
    # --no-check-data: the bad file is met inside a DataLoader worker process, whose FcnsegError torch re-raises
    # with the worker's whole traceback as its message.
    _blocks_tree(tmp_path / "data", n=3, size=48)
    bad = _truncate_as_jpeg(tmp_path / "data")
    code = main(_train_args(tmp_path / "data", tmp_path / "run", "--num-workers", "1", "--no-check-data"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"fcnseg: error: {bad}: "), err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_user_message_takes_the_workers_own_line():
    text = ("Caught FcnsegError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise FcnsegError(msg)\n'
            "fcnseg.errors.ImageError: a.jpg: cannot read image (truncated)\n")  # fmt: skip
    wrapped = FcnsegError(text)
    assert user_message(wrapped) == "a.jpg: cannot read image (truncated)"
    assert user_message(FcnsegError("plain: one line")) == "plain: one line"


@pytest.mark.parametrize("flag", ["--check-data", "--no-check-data"])
def test_the_flag_is_in_train_help(flag, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert flag in capsys.readouterr().out
