"""Atomic writes leave files with the mode a plain write would: the umask's, or the replaced file's own."""

import errno
import os
import stat

import numpy as np
import pytest

import fcnseg
from fcnseg.imageio import save_mask_png
from fcnseg.io import atomic_write, current_umask, staged_path
from tests.helpers import TINY


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_a_new_file_gets_what_the_umask_leaves_of_0666(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"x")
    with open(tmp_path / "plain.bin", "wb") as f:  # the oracle: what open() itself does under this umask
        f.write(b"x")
    assert _mode(tmp_path / "a.bin") == expected == _mode(tmp_path / "plain.bin")


def test_a_replaced_file_keeps_its_own_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "a.txt"
    path.write_text("old")
    os.chmod(path, 0o604)
    with atomic_write(path, "w") as f:
        f.write("new")
    assert path.read_text() == "new" and _mode(path) == 0o604


def test_masks_and_checkpoints_are_readable_by_others_under_umask_022(tmp_path, umask):
    # The files users share: a palette mask and a checkpoint (both written through the atomic writer).
    umask(0o022)
    save_mask_png(tmp_path / "m.png", np.zeros((4, 5), np.uint8), np.zeros((2, 3), np.uint8))
    ckpt = fcnseg.save_checkpoint(fcnseg.get_model("fcn32s", num_classes=2, **TINY), tmp_path / "m.pt")
    assert _mode(tmp_path / "m.png") == 0o644 and _mode(ckpt) == 0o644


def test_a_staged_file_written_by_name_gets_the_mode_of_a_plain_write(tmp_path, umask):
    # Exports and downloads write the staged file by its name (torch.jit.save, onnx.save, urllib): mkstemp made it
    # 0600, the rename must not keep that.
    umask(0o022)
    with staged_path(tmp_path / "m.onnx") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".m.onnx.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"graph")
    assert (tmp_path / "m.onnx").read_bytes() == b"graph" and _mode(tmp_path / "m.onnx") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EIO, errno.ENOSPC])
def test_without_sync_the_file_is_written_and_a_failed_sync_keeps_the_old_one(tmp_path, monkeypatch, code):
    (tmp_path / "a.bin").write_bytes(b"old")

    def failing_sync(fd):
        assert os.pread(fd, 8, 0) == b"new"  # synced once written and closed
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_sync)
    if code in (errno.EINVAL, errno.ENOSYS):  # fsync(2): the file system offers no sync
        with atomic_write(tmp_path / "a.bin") as f:
            f.write(b"new")
        assert (tmp_path / "a.bin").read_bytes() == b"new"
    else:  # the data did not reach the disk
        with pytest.raises(OSError, match=os.strerror(code)), atomic_write(tmp_path / "a.bin") as f:
            f.write(b"new")
        assert (tmp_path / "a.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_block_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="failed"), staged_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("failed")
    with pytest.raises(OSError, match="disk full"), atomic_write(tmp_path / "a.bin") as f:
        f.write(b"half")
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"old"
    with pytest.raises(FileNotFoundError), staged_path(tmp_path / "missing" / "a.bin"):
        raise AssertionError("the block does not run without the folder")
