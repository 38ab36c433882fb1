"""seg11valid: the fake trees these tests and ``test_pascal.py`` read (VOC2011 and SBD under one root), and the
checks only seg11valid has (a separate SBD root, nothing to exclude). What seg11valid shares with voc and sbd is
checked once for all three in ``test_pascal.py``.
"""

from pathlib import Path

from fcnseg.data.seg11valid import Seg11Valid
from tests.data.fakes_voc import make_sbd, make_voc

# VOC2011 val, deliberately not sorted; SBD train holds 4 of these ids and others besides.
VAL11 = [f"2008_00{k:04d}" for k in (7, 3, 9, 1, 5, 2, 8, 0, 6, 4)]
IN_SBD_TRAIN = ["2008_000003", "2008_000005", "2008_000000", "2008_000004"]
SBD_TRAIN = ["2007_000032", IN_SBD_TRAIN[2], "2009_001234", IN_SBD_TRAIN[0], IN_SBD_TRAIN[3], IN_SBD_TRAIN[1]]
SBD_VAL = ["2010_000002", VAL11[0]]  # SBD val ids stay in seg11valid: only SBD train is excluded
KEPT = ["2008_000007", "2008_000009", "2008_000001", "2008_000002", "2008_000008", "2008_000006"]
EXCLUDED = ["2008_000003", "2008_000005", "2008_000000", "2008_000004"]


def make_tree(root: Path) -> None:
    make_voc(root, "2011", {"train": ["2011_000001"], "val": VAL11})
    make_sbd(root, SBD_TRAIN, SBD_VAL)


def test_separate_sbd_root_and_root_forms(tmp_path: Path) -> None:
    make_voc(tmp_path / "voc", "2011", {"val": VAL11})
    make_sbd(tmp_path / "sbd", SBD_TRAIN, SBD_VAL)
    for voc_root in (tmp_path / "voc", tmp_path / "voc" / "VOCdevkit", tmp_path / "voc" / "VOCdevkit" / "VOC2011"):
        for sbd_root in (tmp_path / "sbd", tmp_path / "sbd" / "benchmark_RELEASE" / "dataset"):
            ds = Seg11Valid(str(voc_root), sbd_root=sbd_root)
            assert ds.ids == KEPT and ds.excluded_ids == EXCLUDED


def test_nothing_excluded_when_sbd_train_shares_no_id(tmp_path: Path) -> None:
    make_voc(tmp_path, "2011", {"val": VAL11})
    make_sbd(tmp_path, ["2007_000032"], [])
    ds = Seg11Valid(tmp_path)
    assert ds.ids == VAL11 and ds.excluded_ids == []
