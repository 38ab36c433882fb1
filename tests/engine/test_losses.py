"""Losses for imbalanced classes and their class weights, each against a hand computation in plain Python (math,
loops, sets): values and gradients with void pixels, the Lovász extension against its definition, median frequency
weights by hand, weight files, and ``fcnseg train --loss / --class-weights`` end to end."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

import fcnseg
from fcnseg.checkpoint import read_checkpoint
from fcnseg.cli import main
from fcnseg.data import get_dataset
from fcnseg.data.base import SegmentationDataset
from fcnseg.engine import losses
from fcnseg.engine import run as run_mod
from fcnseg.engine import train as train_mod
from fcnseg.engine.config import TrainConfig, layered_config
from fcnseg.errors import FcnsegError
from fcnseg.models.multi import split_heads
from tests.helpers import TINY, randomise

VOID = 255
WEIGHTS = [0.5, 2.0, 1.25]
# Two images of 2 x 3 pixels: the first holds classes 0 and 2 only (class 1 absent) and a void column, the second
# all three classes and one void pixel, so that valid-pixel counts differ (4 and 5).
MASKS = [[[0, VOID, 2], [2, VOID, 0]], [[1, 1, 0], [VOID, 1, 2]]]


def _logits() -> list:
    """2 x 3 x 2 x 3 logits as nested lists (the hand computations' input)."""
    g = torch.Generator().manual_seed(7)
    return (1.5 * torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)).tolist()


# ----------------------------------------------------------------------------------------- the hand computations


def _softmax(z: list[float]) -> list[float]:
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def _valid_pixels(logits: list, masks: list, image: int | None = None):
    """(probabilities over the classes, label) of every valid pixel, image by image (only ``image`` if given)."""
    for n, mask in enumerate(masks):
        if image is not None and n != image:
            continue
        for y, row in enumerate(mask):
            for x, label in enumerate(row):
                if label != VOID:
                    yield _softmax([logits[n][c][y][x] for c in range(len(logits[n]))]), label


def hand_ce(logits, masks, w=None) -> float:
    return sum(-(w[y] if w else 1.0) * math.log(p[y]) for p, y in _valid_pixels(logits, masks))


def hand_focal(logits, masks, w=None, gamma=2.0) -> float:
    return sum(-(w[y] if w else 1.0) * (1 - p[y]) ** gamma * math.log(p[y]) for p, y in _valid_pixels(logits, masks))


def hand_dice(logits, masks, w=None) -> float:
    """Milletari's soft Dice per class over every valid pixel of the batch; 1 - D averaged over the classes present
    (weighted), times the valid pixels."""
    classes = len(logits[0])
    inter, squares, truth, count = [0.0] * classes, [0.0] * classes, [0.0] * classes, 0
    for p, y in _valid_pixels(logits, masks):
        count += 1
        for c in range(classes):
            g = 1.0 if y == c else 0.0
            inter[c] += p[c] * g
            squares[c] += p[c] * p[c]
            truth[c] += g
    present = [c for c in range(classes) if truth[c] > 0]
    ws = {c: (w[c] if w else 1.0) for c in present}
    mean = sum(ws[c] * (1 - 2 * inter[c] / (squares[c] + truth[c])) for c in present) / sum(ws.values())
    return mean * count


def jaccard_loss(mispredicted: set[int], truth: set[int]) -> float:
    """|M| / |G u M|: the Jaccard loss of a class when the pixels M are mispredicted (Berman et al., eq. 4)."""
    return len(mispredicted) / len(truth | mispredicted) if mispredicted else 0.0


def lovasz_by_thresholds(errors: list[float], truth: set[int]) -> float:
    """The Lovász extension as the integral over thresholds t of the set function at {i : m_i >= t} (the Choquet
    integral; Lovász 1983): piecewise constant between the distinct error values."""
    levels = sorted(set(errors), reverse=True) + [0.0]
    return sum(
        (hi - lo) * jaccard_loss({i for i, m in enumerate(errors) if m >= hi}, truth)
        for hi, lo in itertools.pairwise(levels)
    )


def lovasz_by_permutations(errors: list[float], truth: set[int]) -> float:
    """The largest greedy sum over every order of the pixels: the Lovász extension of a submodular set function
    (the Jaccard loss is one; Yu & Blaschko 2015) is the maximum over its base polytope's vertices."""
    best = -math.inf
    for order in itertools.permutations(range(len(errors))):
        total, before, taken = 0.0, 0.0, set()
        for i in order:
            taken.add(i)
            now = jaccard_loss(taken, truth)
            total += errors[i] * (now - before)
            before = now
        best = max(best, total)
    return best


def hand_lovasz(logits, masks, w=None, extension=lovasz_by_thresholds) -> float:
    """Per image: the classes present in its valid ground truth, each the Lovász extension at the errors
    |g - p|; their (weighted) mean, times the image's valid pixels; summed over the images."""
    total = 0.0
    for n in range(len(masks)):
        pixels = list(_valid_pixels(logits, masks, image=n))
        if not pixels:
            continue
        per_class = {}
        for c in range(len(logits[n])):
            truth = {i for i, (_, y) in enumerate(pixels) if y == c}
            if truth:
                errors = [abs((1.0 if y == c else 0.0) - p[c]) for p, y in pixels]
                per_class[c] = extension(errors, truth)
        ws = {c: (w[c] if w else 1.0) for c in per_class}
        total += sum(ws[c] * v for c, v in per_class.items()) / sum(ws.values()) * len(pixels)
    return total


def finite_difference_gradient(f, logits: list, h: float = 1e-6) -> list:
    """Central differences of ``f`` (a function of nested-list logits) at every logit."""
    grad = copy.deepcopy(logits)
    for n, c, y, x in itertools.product(*(range(k) for k in np.shape(logits))):
        up, down = copy.deepcopy(logits), copy.deepcopy(logits)
        up[n][c][y][x] += h
        down[n][c][y][x] -= h
        grad[n][c][y][x] = (f(up) - f(down)) / (2 * h)
    return grad


# ---------------------------------------------------------------------------------------- values and gradients


def _ours(kind: str, logits: list, w=None, **kw) -> tuple[float, torch.Tensor]:
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    weights = None if w is None else torch.tensor(w, dtype=torch.float64)
    loss = losses.pixel_loss(kind, z, torch.tensor(MASKS), weights, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.item(), grad


HAND = {"ce": hand_ce, "focal": hand_focal, "dice": hand_dice, "lovasz": hand_lovasz}


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", list(HAND))
def test_each_loss_and_its_gradient_equal_the_hand_computation(kind, weighted):
    w = WEIGHTS if weighted else None
    logits = _logits()
    value, grad = _ours(kind, logits, w)
    assert value == pytest.approx(HAND[kind](logits, MASKS, w), rel=1e-12, abs=1e-12)
    want = torch.tensor(finite_difference_gradient(lambda z: HAND[kind](z, MASKS, w), logits), dtype=torch.float64)
    torch.testing.assert_close(grad, want, rtol=1e-6, atol=1e-8)
    # Void pixels (the middle column of the first image, the first pixel of the second row of the second) get no
    # gradient; the others do.
    assert grad[0, :, :, 1].abs().max() == 0 and grad[1, :, 1, 0].abs().max() == 0
    assert grad[0, :, :, 0].abs().min() > 0


def test_cross_entropy_gradient_is_weight_times_softmax_minus_one_hot():
    # The textbook gradient of -w_y log softmax(z)_y, written out per pixel: w_y (p_c - [c == y]).
    logits = _logits()
    _, grad = _ours("ce", logits, WEIGHTS)
    for n, c, y, x in itertools.product(range(2), range(3), range(2), range(3)):
        label = MASKS[n][y][x]
        p = _softmax([logits[n][k][y][x] for k in range(3)])
        want = 0.0 if label == VOID else WEIGHTS[label] * (p[c] - (1.0 if c == label else 0.0))
        assert grad[n, c, y, x].item() == pytest.approx(want, abs=1e-14)


def test_focal_gamma_changes_the_value_as_the_formula_says():
    logits = _logits()
    for gamma in (0.0, 0.5, 3.0):
        value, _ = _ours("focal", logits, WEIGHTS, gamma=gamma)
        assert value == pytest.approx(hand_focal(logits, MASKS, WEIGHTS, gamma), rel=1e-12)
    assert _ours("focal", logits, gamma=0.0)[0] == pytest.approx(hand_ce(logits, MASKS), rel=1e-12)
    # A pixel predicted with p_y = 1 exactly: (1 - p)^0.5 has an infinite slope there, which must not become NaN.
    z = torch.tensor([[[[100.0]], [[0.0]]]], requires_grad=True)
    loss = losses.focal_loss(z, torch.tensor([[[0]]]), gamma=0.5)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(z.grad).all()


def test_the_hand_values_tell_the_wrong_definitions_apart():
    # So that the checks above would catch them: Dice over every class (absent ones too), Lovász over the batch
    # instead of per image, and a weighted cross-entropy divided by the sum of the weights.
    logits = _logits()
    all_classes_dice = hand_dice(logits, [[[0, 1, 2], [2, VOID, 0]], MASKS[1]])  # class 1 now present in image 0
    assert hand_dice(logits, MASKS) != pytest.approx(all_classes_dice, rel=1e-3)
    side_by_side = [[logits[0][c][y] + logits[1][c][y] for y in range(2)] for c in range(3)]  # one 2 x 6 image
    batch_lovasz = hand_lovasz([side_by_side], [[r0 + r1 for r0, r1 in zip(*MASKS, strict=True)]])
    assert hand_lovasz(logits, MASKS) != pytest.approx(batch_lovasz, rel=1e-3)
    sum_of_weights = sum(WEIGHTS[y] for _, y in _valid_pixels(logits, MASKS))
    assert sum_of_weights != pytest.approx(9, rel=1e-3)  # 9 valid pixels: "mean" divides by 9, not by this


@pytest.mark.parametrize("kind", list(HAND))
def test_wholly_void_masks_give_zero_and_zero_gradient(kind):
    z = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = losses.pixel_loss(kind, z, torch.full((2, 2, 3), VOID), torch.tensor(WEIGHTS, dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


# ------------------------------------------------------------------------------------------------------- Lovász


@pytest.mark.parametrize("seed", range(6))
def test_lovasz_jaccard_is_the_lovasz_extension_by_its_definitions(seed):
    rng = np.random.default_rng(seed)
    pixels = 6
    truth = rng.random(pixels) < 0.5
    truth[0] = True  # the class is present
    errors = rng.random(pixels).round(1 if seed % 2 else 6)  # odd seeds: one decimal, so that errors tie
    got = losses.lovasz_jaccard(torch.tensor(errors)[None], torch.tensor(truth, dtype=torch.float64)[None])
    truth_set = {i for i in range(pixels) if truth[i]}
    assert got.item() == pytest.approx(lovasz_by_thresholds(errors.tolist(), truth_set), abs=1e-12)
    assert got.item() == pytest.approx(lovasz_by_permutations(errors.tolist(), truth_set), abs=1e-12)


def test_lovasz_softmax_also_equals_the_permutation_form():
    logits = _logits()
    value, _ = _ours("lovasz", logits, WEIGHTS)
    assert value == pytest.approx(hand_lovasz(logits, MASKS, WEIGHTS, lovasz_by_permutations), rel=1e-12)


def test_lovasz_of_hard_predictions_is_one_minus_iou():
    # At 0/1 probabilities the Lovász extension is the Jaccard loss itself: per image, the mean over the classes
    # present in its ground truth of 1 - IoU of the predicted label map.
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, (2, 5, 6))
    truth[0, 0] = VOID
    truth[1][truth[1] == 3] = 2  # class 3 absent from image 1
    predicted = np.where(rng.random((2, 5, 6)) < 0.6, truth, rng.integers(0, 4, (2, 5, 6))) % 4
    logits = 60.0 * torch.nn.functional.one_hot(torch.tensor(predicted), 4).permute(0, 3, 1, 2).double()
    want = 0.0
    for n in range(2):
        ious, valid = [], 0
        for c in range(4):
            t = {(y, x) for y in range(5) for x in range(6) if truth[n, y, x] == c}
            p = {(y, x) for y in range(5) for x in range(6) if predicted[n, y, x] == c and truth[n, y, x] != VOID}
            if t:
                ious.append(len(t & p) / len(t | p))
        valid = sum(truth[n, y, x] != VOID for y in range(5) for x in range(6))
        want += (1 - sum(ious) / len(ious)) * valid
    assert losses.lovasz_softmax(logits, torch.tensor(truth)).item() == pytest.approx(want, abs=1e-9)


# -------------------------------------------------------------------------------------------- the training step


def _tiny_model(**kw):
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn32s", num_classes=3, width=1 / 16, fc_dim=8, dropout=0.0, **kw)
    return randomise(model, trainable_only=True, bias_std=None)


@pytest.mark.parametrize("kind", ["ce", "focal", "dice"])
def test_train_step_reports_the_weighted_loss_over_the_valid_pixels(kind):
    # With weights, "mean" divides by the valid pixels of the step (not by the sum of their weights).
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 48, 64, generator=g)
    masks = torch.randint(0, 3, (2, 48, 64), generator=g)
    masks[0, :20] = VOID
    masks[1][masks[1] == 1] = 0  # few pixels of class 1 in the batch: its weight matters
    cfg = TrainConfig(preset="modern", loss=kind, batch_size=2, amp=False, class_weight_values={"out": WEIGHTS})
    cfg = cfg.resolved()
    model = _tiny_model()
    with torch.no_grad():
        logits = model(images).double().tolist()
    valid = int((masks != VOID).sum())
    want = HAND[kind](logits, masks.tolist(), WEIGHTS) / valid
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_mod.train_step(model, [(images, masks)], optimizer, scaler, cfg, torch.device("cpu"),
                                contextlib.nullcontext)  # fmt: skip
    assert loss == pytest.approx(want, rel=1e-5)


def test_a_two_headed_net_sums_its_heads_each_with_its_own_weights():
    model = randomise(fcnseg.get_model("fcn16s_twohead", **TINY), seed=0).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 24, 30, generator=g)
    masks = torch.stack(
        [torch.randint(0, 33, (1, 24, 30), generator=g), torch.randint(0, 3, (1, 24, 30), generator=g)], 1
    )
    masks[0, 1, :4] = VOID
    names = list(model.heads)
    w = {names[0]: [0.5 + 0.05 * c for c in range(33)], names[1]: [3.0, 0.25, 1.0]}
    cfg = TrainConfig(loss="focal", class_weight_values=w)
    with torch.no_grad():
        logits = model(x)
        got = train_mod.summed_loss(model, logits, masks, cfg).item()
    heads = split_heads(model, logits.double())
    want = sum(
        hand_focal(heads[name].tolist(), masks[:, k].tolist(), w[name]) for k, name in enumerate(names)
    )  # fmt: skip
    assert got == pytest.approx(want, rel=1e-5)


# -------------------------------------------------------------------------------------------------- class weights


def test_median_frequency_by_hand():
    masks = [
        np.array([[0, 0, 1], [0, VOID, 1]]),  # 5 labelled pixels: 3 of class 0, 2 of class 1
        np.array([[0, 0], [0, 0]]),  # 4 labelled: 4 of class 0
        np.array([[2, 2, VOID], [0, 1, VOID]]),  # 4 labelled: 1 of class 0, 1 of class 1, 2 of class 2
    ]
    # freq_0 = (3 + 4 + 1) / (5 + 4 + 4) = 8/13; freq_1 = (2 + 1) / (5 + 4) = 1/3; freq_2 = 2/4 = 1/2; class 3
    # never occurs. Median of 8/13, 1/3, 1/2: 1/2. Weights: (1/2) / freq.
    want = [0.5 / (8 / 13), 0.5 / (1 / 3), 0.5 / 0.5, 0.0]
    assert losses.median_frequency_weights(masks, 4) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx([13 / 16, 1.5, 1.0, 0.0])


def _folder_set(root, masks):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    for i, m in enumerate(masks):
        Image.fromarray(np.zeros((*m.shape, 3), np.uint8)).save(root / "images" / f"m{i}.png")
        Image.fromarray(m.astype(np.uint8)).save(root / "masks" / f"m{i}.png")
    (root / "train.txt").write_text("".join(f"m{i}\n" for i in range(len(masks))))


def test_median_frequency_of_a_folder_set_reads_its_mask_files(tmp_path):
    masks = [np.array([[0, 0, 1], [0, VOID, 1]]), np.array([[0, 0, 0], [0, 0, 0]]), np.array([[2, 2, VOID], [0, 1, 2]])]
    _folder_set(tmp_path / "d", masks)
    ds = get_dataset("folder", root=str(tmp_path / "d"), split="train")
    cfg = TrainConfig(dataset="folder", class_weights="median-freq")
    # freq: 0: (3 + 6 + 1) / (5 + 6 + 5) = 10/16, 1: (2 + 1) / (5 + 5) = 3/10, 2: 3/5; median 3/5.
    want = [0.6 / (10 / 16), 0.6 / 0.3, 1.0]
    got = run_mod.class_weights(cfg, ds, tmp_path / "run")
    assert list(got) == ["out"] and got["out"] == pytest.approx(want, rel=1e-12)


class _TwoLabelSets(SegmentationDataset):
    """Items whose masks are 2 x H x W, one plane per label set, as SIFT Flow's with target=both."""

    classes = ("a", "b", "c")
    head_classes = {"semantic": ("a", "b", "c"), "geometric": ("sky", "ground")}

    def __init__(self, masks):
        super().__init__()
        self.masks, self.ids = masks, [str(i) for i in range(len(masks))]

    def __getitem__(self, index):
        assert self.transforms is None  # the masks as the files give them, not augmented
        return torch.zeros(3, 2, 3), torch.as_tensor(self.masks[index])


def test_median_frequency_of_two_label_sets_and_its_reuse_on_resume(tmp_path):
    semantic = [np.array([[0, 0, 1], [0, VOID, 1]]), np.array([[0, 0, 0], [0, 0, 0]]), np.array([[2, 2, 2], [0, 1, 2]])]
    geometric = [
        np.array([[0, 0, 0], [1, 1, 1]]),
        np.array([[1, 1, 1], [1, 1, VOID]]),
        np.array([[0, 0, 0], [0, 0, 0]]),
    ]
    ds = _TwoLabelSets([np.stack(pair) for pair in zip(semantic, geometric, strict=True)])
    ds.transforms = lambda image, mask: (image, mask[:, :1])  # what training would do: dropped for the count
    cfg = TrainConfig(class_weights="median-freq")
    got = run_mod.class_weights(cfg, ds, tmp_path)
    # semantic: freq 0: (3 + 6 + 1) / (5 + 6 + 6) = 10/17, 1: (2 + 1) / (5 + 6) = 3/11, 2: 4/6; median 10/17.
    # geometric: freq sky: 9/12 (masks 1 and 3: 6 + 6 labelled), ground: 8/11 (masks 1 and 2: 6 + 5); the median
    # of two is their mean.
    assert got["semantic"] == pytest.approx([1.0, (10 / 17) / (3 / 11), (10 / 17) / (4 / 6)], rel=1e-12)
    median = (9 / 12 + 8 / 11) / 2
    assert got["geometric"] == pytest.approx([median / (9 / 12), median / (8 / 11)], rel=1e-12)
    assert ds.transforms is not None

    # Saved and resumed: the file's weights while --class-weights names the same source, made again otherwise.
    run_mod.save_class_weights(tmp_path / "class_weights.json", replace(cfg, class_weight_values=got), ds.head_classes)
    doc = json.loads((tmp_path / "class_weights.json").read_text())
    doc["label_sets"]["geometric"]["weights"] = [7.0, 8.0]
    (tmp_path / "class_weights.json").write_text(json.dumps(doc))
    assert run_mod.class_weights(replace(cfg, resume=True), ds, tmp_path)["geometric"] == [7.0, 8.0]
    assert run_mod.class_weights(cfg, ds, tmp_path)["geometric"] == got["geometric"]  # a fresh run: computed
    (tmp_path / "w.txt").write_text("1\n2\n3\n")
    from_file = run_mod.class_weights(replace(cfg, resume=True, class_weights=str(tmp_path / "w.txt")), ds, tmp_path)
    assert from_file == {"semantic": [1.0, 2.0, 3.0]}  # a file weighs the first label set only


@pytest.mark.parametrize(
    ("text", "name", "want"),
    [
        ("[1, 2.5, 0]", "w.json", [1.0, 2.5, 0.0]),
        ("# weights\n1\n\n2.5\n0\n", "w.txt", [1.0, 2.5, 0.0]),
        (json.dumps({"source": "median-freq", "label_sets": {"out": {"classes": list("abc"), "weights": [1, 2.5, 0]}}}),
         "class_weights.json", [1.0, 2.5, 0.0]),
    ],
    ids=["json-list", "lines", "run-file"],
)  # fmt: skip
def test_weight_files_are_read(tmp_path, text, name, want):
    (tmp_path / name).write_text(text)
    assert losses.read_class_weights(tmp_path / name, ["a", "b", "c"]) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "2 weight(s); expected 3, one per class (a, b, c)"),
        ("1\n2\n3\n4\n", "4 weight(s); expected 3"),
        ("1\ntwo\n3\n", "line 2 is 'two'; expected one number"),
        ("[1, -2, 3]", "weight 2 (b) is -2; expected a finite number >= 0"),
        ("1\nnan\n3\n", "weight 2 (b) is nan; expected a finite number >= 0"),
        ('[1, "x", 3]', "weight 2 (b) is 'x'"),
        ("[0, 0, 0]", "every weight is 0"),
        ("[1, 2,", "not valid JSON"),
        ('{"a": 1}', "a JSON object without label_sets.*.weights"),
    ],
)
def test_weight_file_mistakes_are_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "w.txt"
    path.write_text(text)
    with pytest.raises(FcnsegError) as caught:
        losses.read_class_weights(path, ["a", "b", "c"])
    assert str(caught.value).startswith(f"--class-weights {path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)
    missing = tmp_path / "none.txt"
    with pytest.raises(FcnsegError, match=f"--class-weights {missing}: file not found"):
        losses.read_class_weights(missing, ["a"])


# ---------------------------------------------------------------------------------------------------------- CLI

_CLI = ["train", "--data-option", "size=32", "--data-option", "num_images=4", "--width", "0.0625", "--fc-dim", "8",
        "--batch-size", "2", "--val-every", "2", "--val-images", "2", "--num-workers", "0",
        "--no-progress", "--deterministic"]  # fmt: skip


def _hand_median_frequency(masks: list[np.ndarray], classes: int) -> list[float]:
    pixels, holding = [0] * classes, [0] * classes
    for m in masks:
        labelled = int((m != VOID).sum())
        for c in range(classes):
            k = int((m == c).sum())
            pixels[c] += k
            holding[c] += labelled if k else 0
    freq = [p / h for p, h in zip(pixels, holding, strict=True) if h]
    median = float(np.median(freq))
    return [median * h / p if p else 0.0 for p, h in zip(pixels, holding, strict=True)]


def test_cli_focal_loss_with_median_frequency_weights_saved_and_reused_on_resume(tmp_path):
    out = tmp_path / "run"
    assert main([*_CLI, "--loss", "focal", "--class-weights", "median-freq", "--iters", "2", "--out", str(out)]) == 0
    ds = get_dataset("synthetic", split="train", size=32, num_images=4)
    want = _hand_median_frequency([ds.load_pair(i)[1] for i in range(len(ds))], len(ds.classes))
    doc = json.loads((out / "class_weights.json").read_text())
    assert doc["source"] == "median-freq" and doc["label_sets"]["out"]["classes"] == list(ds.classes)
    assert doc["label_sets"]["out"]["weights"] == pytest.approx(want, rel=1e-12)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["loss"], saved["loss_reduction"], saved["class_weights"]) == ("focal", "mean", "median-freq")
    assert saved["class_weight_values"] == {"out": doc["label_sets"]["out"]["weights"]}
    assert read_checkpoint(out / "last.pt")["extra"]["config"]["class_weight_values"] == saved["class_weight_values"]

    # Resumed, the run takes the saved weights (here changed by hand to tell them from freshly computed ones).
    doc["label_sets"]["out"]["weights"] = [float(k + 1) for k in range(len(ds.classes))]
    (out / "class_weights.json").write_text(json.dumps(doc))
    assert main([*_CLI, "--iters", "3", "--out", str(out), "--resume"]) == 0
    resumed = read_checkpoint(out / "last.pt")["extra"]["config"]
    assert resumed["class_weight_values"] == {"out": [float(k + 1) for k in range(len(ds.classes))]}
    assert resumed["loss"] == "focal"


def test_cli_former_loss_sum_still_works_and_old_runs_resume_alike(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_CLI, "--loss", "sum", "--iters", "1", "--out", str(out)]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["loss"], saved["loss_reduction"], saved["class_weight_values"]) == ("ce", "sum", None)
    assert not (out / "class_weights.json").exists()
    # A config.yaml written before loss kinds existed: loss held the reduction.
    new = layered_config({"resume": True, "out": str(out)}).resolved()
    old = {k: v for k, v in saved.items() if k not in ("loss_reduction", "focal_gamma", "class_weights",
                                                        "class_weight_values")}  # fmt: skip
    (out / "config.yaml").write_text(yaml.safe_dump({**old, "loss": "sum"}, sort_keys=False))
    assert layered_config({"resume": True, "out": str(out)}).resolved() == new
    assert main([*_CLI, "--iters", "2", "--out", str(out), "--resume"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["loss_reduction"] == "sum"
    # An option file's loss: mean, and contradicting spellings.
    (tmp_path / "c.yaml").write_text("loss: mean\n")
    cfg = layered_config({"loss": "dice"}, tmp_path / "c.yaml").resolved()
    assert (cfg.loss, cfg.loss_reduction) == ("dice", "mean")
    with pytest.raises(FcnsegError, match="--loss sum .* contradicts --loss-reduction 'mean'"):
        TrainConfig(loss="sum", loss_reduction="mean").resolved()


def test_cli_loss_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "w.txt").write_text("1\n2\n")
    for flags, message in [
        (["--loss", "hinge"], "--loss 'hinge': expected ce, focal, dice or lovasz"),
        (["--loss-reduction", "max"], "--loss-reduction 'max': expected sum or mean"),
        (["--focal-gamma", "-1"], "--focal-gamma must be >= 0"),
        (["--class-weights", str(tmp_path / "w.txt")], f"{tmp_path / 'w.txt'}: 2 weight(s); expected 7"),
    ]:  # fmt: skip
        assert main([*_CLI, "--iters", "1", "--out", str(tmp_path / "r"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before the run folder was made
    (tmp_path / "c.yaml").write_text("class_weight_values: {out: [1, 2]}\n")
    assert main([*_CLI, "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "is written by the run" in capsys.readouterr().err
