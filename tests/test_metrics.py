"""Tests of fcnseg.metrics: hand-computed cases, accumulation, a reference, errors, DDP."""

from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from fcnseg.metrics import ConfusionMatrix

TOL = 1e-12
FIGURES = ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")


def assert_close(actual: float, expected: float, tol: float = TOL) -> None:
    """Equal within ``tol``, with NaN equal only to NaN."""
    if math.isnan(expected):
        assert math.isnan(actual), f"expected NaN, got {actual}"
    else:
        assert abs(actual - expected) <= tol, f"{actual} != {expected}"


def assert_list_close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e)


# ---------------------------------------------------------------------------- hand-computed cases


def test_hand_case_void_and_out_of_range_labels_ignored() -> None:
    # n = 3: the 255 pixel (predicted 2) and the label-7 pixel (predicted 0) must not be counted.
    target = np.array([[0, 0, 1, 255], [1, 2, 7, 2]])
    pred = np.array([[0, 1, 1, 2], [1, 2, 0, 0]])
    cm = ConfusionMatrix(3).update(pred, target)
    assert cm.mat.dtype == torch.int64
    assert cm.mat.tolist() == [
        [1, 1, 0],
        [0, 2, 0],
        [1, 0, 1],
    ]
    r = cm.compute()
    # t = (2, 2, 2), column sums = (2, 3, 1), diagonal = (1, 2, 1)
    assert r["pixels"] == [2, 2, 2]
    assert_close(r["pixel_acc"], (1 + 2 + 1) / 6)
    assert_close(r["mean_acc"], (1 / 2 + 2 / 2 + 1 / 2) / 3)
    # IU_0 = 1 / (2 + 2 - 1), IU_1 = 2 / (2 + 3 - 2), IU_2 = 1 / (2 + 1 - 1)
    assert_list_close(r["per_class_iu"], [1 / 3, 2 / 3, 1 / 2])
    assert_list_close(r["per_class_acc"], [1 / 2, 2 / 2, 1 / 2])
    assert_close(r["mean_iu"], (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert_close(r["fw_iu"], (2 * (1 / 3) + 2 * (2 / 3) + 2 * (1 / 2)) / 6)


def test_hand_case_absent_and_never_predicted_classes() -> None:
    # n = 5: class 2 is in the ground truth but never predicted; class 3 is predicted but absent
    # from the ground truth; class 4 appears nowhere (the void pixel predicted 4 does not count).
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([0, 0, 3, 1, 0, 1, 1, 4])
    cm = ConfusionMatrix(5).update(pred, target)
    assert cm.mat.tolist() == [
        [2, 0, 0, 1, 0],
        [1, 1, 0, 0, 0],
        [0, 2, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    r = cm.compute()
    # t = (3, 2, 2, 0, 0), column sums = (3, 3, 0, 1, 0), diagonal = (2, 1, 0, 0, 0)
    assert r["pixels"] == [3, 2, 2, 0, 0]
    assert_close(r["pixel_acc"], (2 + 1 + 0) / 7)
    # accuracy: undefined (NaN, skipped) for classes 3 and 4; 0 for the never-predicted class 2
    assert_list_close(r["per_class_acc"], [2 / 3, 1 / 2, 0 / 2, math.nan, math.nan])
    assert_close(r["mean_acc"], (2 / 3 + 1 / 2 + 0) / 3)
    # IU: class 2 = 0 / (2 + 0 - 0) = 0, class 3 = 0 / (0 + 1 - 0) = 0 (counts),
    # class 4 NaN (skipped)
    assert_list_close(r["per_class_iu"], [2 / 4, 1 / 4, 0.0, 0.0, math.nan])
    assert_close(r["mean_iu"], (2 / 4 + 1 / 4 + 0 + 0) / 4)
    assert_close(r["fw_iu"], (3 * (2 / 4) + 2 * (1 / 4) + 2 * 0) / 7)


def test_excluded_classes_leave_the_means_only() -> None:
    # The same hand case with class 3 excluded (as SIFT Flow's test set excludes the classes it lacks): its IU of 0
    # (predicted, never present) leaves the mean IU; pixel acc and f.w. IU count every pixel as before.
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255])
    pred = torch.tensor([0, 0, 3, 1, 0, 1, 1, 4])
    cm = ConfusionMatrix(5, exclude=[3]).update(pred, target)
    r = cm.compute()
    assert_close(r["mean_iu"], (2 / 4 + 1 / 4 + 0) / 3)
    assert_close(r["mean_acc"], (2 / 3 + 1 / 2 + 0) / 3)
    assert_close(r["pixel_acc"], 3 / 7)
    assert_close(r["fw_iu"], (3 * (2 / 4) + 2 * (1 / 4) + 2 * 0) / 7)
    assert_list_close(r["per_class_iu"], [2 / 4, 1 / 4, 0.0, 0.0, math.nan])  # still reported per class
    assert cm.copy().exclude == (3,) and "(excluded)" in cm.table()
    restored = ConfusionMatrix(5)
    restored.load_state_dict(cm.state_dict())
    assert restored.exclude == (3,) and restored.compute()["mean_iu"] == r["mean_iu"]
    assert ConfusionMatrix.from_matrix(cm.mat, exclude=[3]).compute()["mean_iu"] == r["mean_iu"]
    with pytest.raises(ValueError, match="excluding"):
        cm.merge(ConfusionMatrix(5))
    with pytest.raises(ValueError, match="exclude"):
        ConfusionMatrix(5, exclude=[5])


def test_hand_case_batched_uint8_labels_do_not_overflow() -> None:
    # uint8 maps with 255 void: n * target must be computed in int64 (21 * 255 wraps in uint8).
    target = torch.tensor([[[20, 255], [3, 20]], [[255, 0], [3, 3]]], dtype=torch.uint8)
    pred = torch.tensor([[[20, 20], [3, 0]], [[5, 0], [3, 20]]], dtype=torch.uint8)
    cm = ConfusionMatrix(21).update(pred, target)
    expected = torch.zeros(21, 21, dtype=torch.int64)
    expected[20, 20] = 1
    expected[3, 3] = 2
    expected[20, 0] = 1
    expected[0, 0] = 1
    expected[3, 20] = 1
    assert torch.equal(cm.mat, expected)
    r = cm.compute()
    # classes 0, 3, 20 present: t = (1, 3, 2); column sums: 0 -> 2, 3 -> 2, 20 -> 2
    assert_close(r["pixel_acc"], (1 + 2 + 1) / 6)
    assert_close(r["mean_acc"], (1 / 1 + 2 / 3 + 1 / 2) / 3)
    # IU_0 = 1 / (1 + 2 - 1), IU_3 = 2 / (3 + 2 - 2), IU_20 = 1 / (2 + 2 - 1);
    # the 18 other classes are absent (NaN)
    assert_close(r["mean_iu"], (1 / 2 + 2 / 3 + 1 / 3) / 3)
    assert_close(r["fw_iu"], (1 * (1 / 2) + 3 * (2 / 3) + 2 * (1 / 3)) / 6)
    assert sum(math.isnan(v) for v in r["per_class_iu"]) == 18


def test_perfect_prediction_scores_one() -> None:
    target = np.array([[0, 1, 2], [2, 2, 255]])
    cm = ConfusionMatrix(4).update(np.where(target == 255, 0, target), target)
    r = cm.compute()
    for key in FIGURES:
        assert_close(r[key], 1.0)
    assert math.isnan(r["per_class_iu"][3]) and math.isnan(r["per_class_acc"][3])


@pytest.mark.parametrize("target", [np.zeros((0,), dtype=np.int64), np.full((2, 3), 255)])
def test_empty_matrix_gives_nan_without_warnings(target: np.ndarray) -> None:
    cm = ConfusionMatrix(3).update(np.zeros_like(target), target)
    assert int(cm.mat.sum()) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = cm.compute()
    for key in FIGURES:
        assert math.isnan(r[key]), key
    assert all(math.isnan(v) for v in r["per_class_iu"] + r["per_class_acc"])
    assert r["pixels"] == [0, 0, 0]


def test_compute_returns_python_types() -> None:
    r = ConfusionMatrix(2).update(np.array([0, 1, 1]), np.array([0, 1, 0])).compute()
    for key in FIGURES:
        assert type(r[key]) is float
    assert all(type(v) is float for v in r["per_class_iu"] + r["per_class_acc"])
    assert all(type(v) is int for v in r["pixels"])
    assert_close(r["pixel_acc"], 2 / 3)


def test_prediction_out_of_range_on_void_pixel_is_ignored() -> None:
    cm = ConfusionMatrix(3).update(np.array([9, -4, 1]), np.array([255, -1, 1]))
    assert cm.mat.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_numpy_views_with_negative_strides() -> None:
    target = np.array([0, 1, 2, 2])
    pred = np.array([2, 2, 1, 0])
    cm = ConfusionMatrix(3).update(pred[::-1], target[::-1])
    # reversed pairs (target, pred): (2, 0) (2, 1) (1, 2) (0, 2)
    assert cm.mat.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 0]]


# ---------------------------------------------------------------------------- accumulation


def numpy_loop_matrix(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """The confusion matrix by a plain double loop over pixels."""
    m = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(target.ravel().tolist(), pred.ravel().tolist(), strict=True):
        if 0 <= t < n:
            m[t, p] += 1
    return m


def random_maps(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Random prediction and target maps; about 10% void (255) and 5% other out-of-range targets."""
    target = rng.integers(0, n, size=shape)
    u = rng.random(shape)
    target[u < 0.10] = 255
    target[(u >= 0.10) & (u < 0.15)] = n + 3
    pred = rng.integers(0, n, size=shape)
    return pred, target


@pytest.mark.parametrize(("n", "shape"), [(2, (5, 7)), (21, (3, 17, 19)), (40, (2, 1, 33, 9))])
def test_matrix_matches_numpy_double_loop(n: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(n)
    pred, target = random_maps(rng, n, shape)
    cm = ConfusionMatrix(n).update(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_array_equal(cm.mat.numpy(), numpy_loop_matrix(pred, target, n))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 8),
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**32 - 1),
)
def test_matrix_matches_numpy_double_loop_hypothesis(n: int, shape: tuple[int, ...], seed: int) -> None:
    pred, target = random_maps(np.random.default_rng(seed), n, shape)
    cm = ConfusionMatrix(n).update(pred, target)
    np.testing.assert_array_equal(cm.mat.numpy(), numpy_loop_matrix(pred, target, n))


def test_several_updates_equal_one_on_concatenation() -> None:
    rng = np.random.default_rng(0)
    n = 6
    batches = [random_maps(rng, n, (b, 8, 9)) for b in (1, 3, 2)]
    acc = ConfusionMatrix(n)
    for pred, target in batches:
        assert acc.update(pred, target) is acc
    whole = ConfusionMatrix(n).update(np.concatenate([p for p, _ in batches]), np.concatenate([t for _, t in batches]))
    assert torch.equal(acc.mat, whole.mat)
    got, want = acc.compute(), whole.compute()
    for key in FIGURES:
        assert got[key] == want[key]


def test_merge_add_and_sum_of_halves_equal_the_whole() -> None:
    rng = np.random.default_rng(1)
    n = 5
    pred, target = random_maps(rng, n, (4, 10, 10))
    whole = ConfusionMatrix(n).update(pred, target)
    a = ConfusionMatrix(n).update(pred[:2], target[:2])
    b = ConfusionMatrix(n).update(pred[2:], target[2:])
    a_before = a.mat.clone()

    added = a + b
    assert torch.equal(added.mat, whole.mat)
    assert torch.equal(a.mat, a_before), "__add__ must not modify its operands"
    assert torch.equal(sum([a, b]).mat, whole.mat)

    c = a.copy()
    c += b
    assert torch.equal(c.mat, whole.mat)

    assert a.merge(b) is a
    assert torch.equal(a.mat, whole.mat)
    assert a.compute()["mean_iu"] == whole.compute()["mean_iu"]


def test_reset_zeroes_counts() -> None:
    cm = ConfusionMatrix(3).update(np.array([0, 1]), np.array([1, 1]))
    assert int(cm.mat.sum()) == 2
    cm.reset()
    assert cm.mat.tolist() == [[0] * 3] * 3
    cm.update(np.array([2]), np.array([2]))
    assert cm.mat.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]


# ---------------------------------------------------------------------------- independent reference


def reference_figures(h: np.ndarray) -> dict[str, float]:
    """The four metrics of the paper's section 5 (pixel accuracy, mean accuracy, mean IU, frequency weighted IU),
    class by class with explicit skips where the Caffe release's score.py gets NaN (not vectorised)."""
    n = h.shape[0]
    t = [sum(int(h[i, j]) for j in range(n)) for i in range(n)]
    col = [sum(int(h[j, i]) for j in range(n)) for i in range(n)]
    total = sum(t)
    accs, ius, weighted = [], [], 0.0
    for i in range(n):
        nii = int(h[i, i])
        if t[i] > 0:
            accs.append(nii / t[i])
        denom = t[i] + col[i] - nii
        if denom > 0:
            ius.append(nii / denom)
            if t[i] > 0:
                weighted += t[i] * nii / denom
    nan = float("nan")
    return {
        "pixel_acc": sum(int(h[i, i]) for i in range(n)) / total if total else nan,
        "mean_acc": sum(accs) / len(accs) if accs else nan,
        "mean_iu": sum(ius) / len(ius) if ius else nan,
        "fw_iu": weighted / total if total else nan,
    }


@st.composite
def sparse_matrices(draw: st.DrawFn) -> np.ndarray:
    """Square count matrices with many zeros, so empty rows and columns are common."""
    n = draw(st.integers(1, 7))
    cell = st.one_of(st.just(0), st.integers(0, 3), st.integers(0, 10**6))
    flat = draw(st.lists(cell, min_size=n * n, max_size=n * n))
    h = np.array(flat, dtype=np.int64).reshape(n, n)
    # Knock out whole classes (row and/or column) so absent / never-predicted classes occur often.
    for i in range(n):
        kind = draw(st.integers(0, 5))
        if kind == 1:
            h[i, :] = 0
        elif kind == 2:
            h[:, i] = 0
        elif kind == 3:
            h[i, :] = 0
            h[:, i] = 0
    return h


@settings(max_examples=200, deadline=None)
@given(h=sparse_matrices())
def test_figures_match_independent_reference(h: np.ndarray) -> None:
    r = ConfusionMatrix.from_matrix(h).compute()
    ref = reference_figures(h)
    for key in FIGURES:
        assert_close(r[key], ref[key])
        if not math.isnan(r[key]):
            assert 0.0 <= r[key] <= 1.0
    assert r["pixels"] == h.sum(axis=1).tolist()


# ---------------------------------------------------------------------------- errors


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        ConfusionMatrix(3).update(np.zeros((2, 3), dtype=np.int64), np.zeros((3, 2), dtype=np.int64))


@pytest.mark.parametrize("bad", [3, 17, -1])
def test_prediction_out_of_range_names_the_value(bad: int) -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=rf"prediction {bad} is outside"):
        cm.update(torch.tensor([0, bad, 2]), torch.tensor([0, 1, 2]))
    assert int(cm.mat.sum()) == 0, "a rejected batch must not be counted"


def test_merge_with_different_num_classes() -> None:
    with pytest.raises(ValueError, match="3 and 4"):
        ConfusionMatrix(3).merge(ConfusionMatrix(4))
    with pytest.raises(ValueError):
        ConfusionMatrix(3) + ConfusionMatrix(4)
    a = ConfusionMatrix(3)
    with pytest.raises(ValueError):
        a += ConfusionMatrix(2)


@pytest.mark.parametrize("n", [0, -2, 2.0, True])
def test_bad_num_classes(n: object) -> None:
    with pytest.raises(ValueError):
        ConfusionMatrix(n)  # type: ignore[arg-type]


def test_bad_class_names_and_float_inputs() -> None:
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        ConfusionMatrix(3, ["a", "b"])
    with pytest.raises(TypeError, match="integer"):
        ConfusionMatrix(3).update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        ConfusionMatrix(3).update(np.zeros(4, dtype=np.int64), np.zeros(4))


@pytest.mark.parametrize("mat", [[[1, 2, 3]], [[1, -1], [0, 0]], [[0.5, 0.0], [0.0, 1.0]], np.zeros((2, 2, 2))])
def test_from_matrix_rejects_bad_matrices(mat: object) -> None:
    with pytest.raises(ValueError):
        ConfusionMatrix.from_matrix(mat)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- serialisation, table


def test_from_matrix_state_dict_and_pickle_round_trip() -> None:
    h = [[5, 1, 0], [2, 7, 1], [0, 0, 0]]
    cm = ConfusionMatrix.from_matrix(np.array(h), ["bg", "cat", "dog"])
    assert cm.num_classes == 3 and cm.mat.dtype == torch.int64 and cm.mat.tolist() == h

    other = ConfusionMatrix(3)
    other.load_state_dict(cm.state_dict())
    assert other.mat.tolist() == h and other.class_names == ["bg", "cat", "dog"]
    with pytest.raises(ValueError):
        ConfusionMatrix(4).load_state_dict(cm.state_dict())

    clone = pickle.loads(pickle.dumps(cm))
    assert clone.mat.tolist() == h and clone.class_names == ["bg", "cat", "dog"]
    assert clone.compute()["mean_iu"] == cm.compute()["mean_iu"]
    # t = (6, 10, 0), column sums = (7, 8, 1): IU = 5 / 8, 7 / 11, 0 / 1
    assert_close(cm.compute()["mean_iu"], (5 / 8 + 7 / 11 + 0) / 3)
    # state is independent of the original
    cm.reset()
    assert other.mat.tolist() == h and clone.mat.tolist() == h


def test_table_shows_percentages() -> None:
    target = np.array([0, 0, 0, 1, 1, 2, 2, 255])
    pred = np.array([0, 0, 3, 1, 0, 1, 1, 4])
    cm = ConfusionMatrix(5, ["background", "cat", "dog", "cow", "moon"]).update(pred, target)
    text = cm.table()
    lines = text.splitlines()
    row = {line.split()[0]: line.split()[1:] for line in lines[2:7]}
    assert row["background"] == ["50.00", "66.67", "3"]  # IU 2/4, acc 2/3
    assert row["cat"] == ["25.00", "50.00", "2"]
    assert row["dog"] == ["0.00", "0.00", "2"]
    assert row["cow"] == ["0.00", "-", "0"]
    assert row["moon"] == ["-", "-", "0"]
    # pixel acc 3/7, mean acc 7/18, mean IU 3/16, f.w. IU 2/7
    assert lines[-1] == "pixel acc 42.86  mean acc 38.89  mean IU 18.75  f.w. IU 28.57"
    # names passed to table() override the stored ones
    assert cm.table(["a", "b", "c", "d", "e"]).splitlines()[2].split()[0] == "a"
    assert ConfusionMatrix(2).table().splitlines()[2].split() == ["0", "-", "-", "0"]


# ---------------------------------------------------------------------------- devices, distributed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_updates_and_mixed_devices() -> None:
    rng = np.random.default_rng(3)
    n = 21
    pred, target = random_maps(rng, n, (2, 31, 29))
    cm = ConfusionMatrix(n).update(torch.from_numpy(pred).cuda(), torch.from_numpy(target).cuda())
    assert cm.mat.device.type == "cuda"
    cm.update(pred, target)  # a CPU batch is added to the CUDA matrix
    np.testing.assert_array_equal(cm.mat.cpu().numpy(), 2 * numpy_loop_matrix(pred, target, n))
    cpu = ConfusionMatrix(n).update(pred, target)
    assert torch.equal((cpu + cm).mat.cpu(), 3 * cpu.mat)
    assert cm.compute()["mean_iu"] == cpu.compute()["mean_iu"]
    with pytest.raises(ValueError, match="prediction 21"):
        cm.update(torch.full((3,), 21, device="cuda"), torch.zeros(3, dtype=torch.long, device="cuda"))


def test_all_reduce_is_a_noop_without_process_group() -> None:
    assert not (dist.is_available() and dist.is_initialized())
    cm = ConfusionMatrix(3).update(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 255]))
    before = cm.mat.clone()
    assert cm.all_reduce() is cm
    assert torch.equal(cm.mat, before)


def _rank_maps(rank: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return random_maps(np.random.default_rng(100 + rank), n, (2, 6, 7))


def _all_reduce_worker(rank: int, world: int, init_file: str, out_dir: str, n: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(n).update(*_rank_maps(rank, n))
        cm.all_reduce()
        torch.save(cm.mat, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend unavailable")
def test_all_reduce_sums_over_two_gloo_ranks(tmp_path: Path) -> None:
    n, world = 4, 2
    mp.spawn(
        _all_reduce_worker,
        args=(world, str(tmp_path / "rendezvous"), str(tmp_path), n),
        nprocs=world,
        join=True,
    )
    expected = ConfusionMatrix(n)
    for rank in range(world):
        expected.update(*_rank_maps(rank, n))
    assert int(expected.mat.sum()) > 0
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got, expected.mat), rank
