"""Label ``.mat`` files are size-checked before scipy reads them: a small compressed file that inflates to a huge
matrix (at the top level, or nested in SBD's struct or a cell) is refused in one line naming the file, and the
release's own files still read."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from fcnseg.cli import main
from fcnseg.data.matfile import MAX_LABEL_ELEMENTS, check_mat_size
from fcnseg.data.nyud import read_nyud_mask
from fcnseg.data.sbd import read_sbd_mask
from fcnseg.data.siftflow import read_semantic_labels
from fcnseg.errors import FcnsegError
from tests.data.fakes_voc import make_sbd, write_sbd_mat

# Just over the cap of 4096 x 4096 elements: 16.8 MB of zeros that compress to about 16 KB.
BIG = (4097, 4097)


def _refused(read, path: Path, what: str) -> str:
    """Read ``path`` with ``read`` expecting a refusal; it must come quickly and without inflating the matrix."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FcnsegError) as caught:
            read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert message.startswith(f"{path}: too large for a label file: {what}"), message
    assert message.endswith("expected at most 4096 x 4096 labels") and "\n" not in message
    assert peak < 4_000_000, f"{peak:,} bytes allocated: the matrix was inflated"
    assert time.perf_counter() - t0 < 5
    return message


def test_a_compressed_sbd_mask_bomb_is_refused(tmp_path):
    path = tmp_path / "cls" / "2008_000001.mat"
    path.parent.mkdir()
    scipy.io.savemat(path, {"GTcls": {"Segmentation": np.zeros(BIG, np.uint8)}}, do_compression=True)
    assert path.stat().st_size < 100_000  # small on disk: 16.8 MB once inflated
    _refused(read_sbd_mask, path, "an array of 4097 x 4097 = 16,785,409 elements")


def test_a_compressed_nyud_and_siftflow_label_bomb_is_refused(tmp_path):
    nyud, sift = tmp_path / "img_5001.mat", tmp_path / "coast.mat"
    scipy.io.savemat(nyud, {"segmentation": np.zeros(BIG, np.uint8)}, do_compression=True)
    scipy.io.savemat(sift, {"S": np.zeros(BIG, np.uint8)}, do_compression=True)
    _refused(read_nyud_mask, nyud, "an array of 4097 x 4097")
    _refused(read_semantic_labels, sift, "an array of 4097 x 4097")


def test_a_cell_of_many_arrays_is_refused(tmp_path):
    # loadmat sets aside a slot for every element of a cell before reading one: the count is checked first.
    cells = np.empty((1, 20_000), dtype=object)
    for i in range(cells.shape[1]):
        cells[0, i] = np.zeros((0, 0))
    path = tmp_path / "cells.mat"
    scipy.io.savemat(path, {"GTcls": {"Segmentation": np.zeros((3, 4), np.uint8), "Boundaries": cells}})
    _refused(read_sbd_mask, path, "a cell or struct array holds 20,000 arrays")


def test_inflated_bytes_are_counted_whatever_the_headers_say(tmp_path):
    # Within the element cap, the bytes a variable inflates to are still counted against a byte cap.
    path = tmp_path / "d.mat"
    scipy.io.savemat(path, {"S": np.zeros((100, 100))}, do_compression=True)
    check_mat_size(path)
    with pytest.raises(FcnsegError, match="its variables inflate to more than 50,000 bytes"):
        check_mat_size(path, max_bytes=50_000)
    with pytest.raises(FcnsegError, match="an array of 100 x 100 = 10,000 elements"):
        check_mat_size(path, max_elements=9_999)
    assert MAX_LABEL_ELEMENTS == 4096 * 4096


def test_the_byte_cap_holds_for_all_variables_together(tmp_path):
    # loadmat reads every variable: four of 80 KB inflated each pass a cap of 200 KB alone, not together.
    path = tmp_path / "many.mat"
    zeros = np.zeros((100, 100))
    scipy.io.savemat(path, {"a": zeros, "b": zeros, "c": zeros, "d": zeros}, do_compression=True)
    check_mat_size(path, max_bytes=400_000)
    with pytest.raises(FcnsegError, match="its variables inflate to more than 200,000 bytes"):
        check_mat_size(path, max_bytes=200_000)


@pytest.mark.parametrize("compressed", [False, True])
def test_the_largest_legitimate_mask_still_reads(tmp_path, compressed):
    path = tmp_path / "m.mat"
    seg = np.zeros((4096, 4096), np.uint8)
    seg[0, :21] = np.arange(21)
    scipy.io.savemat(path, {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.arange(1, 21)}},
                     do_compression=compressed)  # fmt: skip
    np.testing.assert_array_equal(read_sbd_mask(path), seg)


def test_check_data_reports_the_bomb_and_goes_on(tmp_path, capsys):
    sbd_dir = make_sbd(tmp_path, ["2008_000001", "2008_000002"], ["2008_000003"])
    bomb = sbd_dir / "cls" / "2008_000002.mat"
    scipy.io.savemat(bomb, {"GTcls": {"Segmentation": np.zeros(BIG, np.uint8)}}, do_compression=True)
    assert main(["check-data", "--dataset", "sbd", "--root", str(tmp_path), "--quiet"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{bomb}: too large for a label file: an array of 4097 x 4097 = 16,785,409 elements; expected at "
                     "most 4096 x 4096 labels [unreadable-mask]"]  # fmt: skip


def test_damaged_and_release_files_keep_their_messages(tmp_path):
    good = tmp_path / "good.mat"
    write_sbd_mat(good, np.arange(12, dtype=np.uint8).reshape(3, 4) % 21)
    np.testing.assert_array_equal(read_sbd_mask(good), np.arange(12).reshape(3, 4) % 21)
    cut = tmp_path / "cut.mat"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(FcnsegError, match=f"^{cut}: cannot read .mat file"):
        read_sbd_mask(cut)
