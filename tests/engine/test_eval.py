"""`fcnseg eval`: its figures equal an independent computation from the predicted masks."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.engine.evaluate import boundary_band
from fcnseg.imageio import read_mask_png
from fcnseg.preprocessing import CAFFE, IMAGENET
from tests.engine.test_train import _blocks_tree
from tests.helpers import TINY, randomise


@pytest.fixture(scope="module", params=["imagenet", "caffe"])
def evaluated(tmp_path_factory, request):
    # Once with the default input and once with the Caffe one (BGR, 0-255, mean): eval must use the recorded one.
    tmp = tmp_path_factory.mktemp("eval")
    _blocks_tree(tmp / "data", n=4, size=40)
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn8s", num_classes=4, **TINY)
    with torch.no_grad():  # random but non-trivial predictions
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5) if p.dim() > 1 else p.zero_()
    preprocessing = {"imagenet": IMAGENET, "caffe": CAFFE}[request.param]
    classes = ["background", "red", "green", "blue"]
    ckpt = fcnseg.save_checkpoint(model, tmp / "m.pt", classes=classes, preprocessing=preprocessing)
    out = tmp / "report"
    assert main(["eval", str(ckpt), "--dataset", "folder", "--root", str(tmp / "data"), "--split", "val",
                 "--out", str(out), "--num-workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    return tmp, fcnseg.load(ckpt), out


def _independent(tmp, model):
    """Confusion matrix and the four figures by plain numpy loops over (prediction, ground truth) pairs."""
    n = 4
    mat = np.zeros((n, n), np.int64)
    for stem in (tmp / "data" / "val.txt").read_text().split():
        pred = model.predict(Image.open(tmp / "data" / "images" / f"{stem}.png"))
        gt = read_mask_png(tmp / "data" / "masks" / f"{stem}.png")
        for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
            if g < n:
                mat[g, p] += 1
    tp, gt_px, pred_px, total = np.diag(mat), mat.sum(1), mat.sum(0), mat.sum()
    acc = [tp[i] / gt_px[i] for i in range(n) if gt_px[i] > 0]
    iu = [tp[i] / (gt_px[i] + pred_px[i] - tp[i]) for i in range(n) if gt_px[i] + pred_px[i] > 0]
    fw = sum(gt_px[i] / total * tp[i] / (gt_px[i] + pred_px[i] - tp[i]) for i in range(n) if gt_px[i] > 0)
    return mat, {"pixel_acc": tp.sum() / total, "mean_acc": np.mean(acc), "mean_iu": np.mean(iu), "fw_iu": fw}


def test_eval_figures_equal_an_independent_computation(evaluated):
    tmp, model, out = evaluated
    mat, expected = _independent(tmp, model)
    doc = json.loads((out / "metrics.json").read_text())
    for k, v in expected.items():
        assert doc[k] == pytest.approx(v, abs=1e-12), k
    assert 0 < doc["mean_iu"] < 1  # neither trivial case
    other = fcnseg.load(tmp / "m.pt")
    other.preprocessing = CAFFE if model.preprocessing != CAFFE else IMAGENET
    assert _independent(tmp, other)[1]["mean_iu"] != pytest.approx(doc["mean_iu"], abs=1e-12)  # the input matters
    assert list(doc["per_class"]) == ["background", "red", "green", "blue"]
    assert [doc["per_class"][c]["pixels"] for c in doc["per_class"]] == mat.sum(1).tolist()
    with open(out / "confusion.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == ["background", "red", "green", "blue"]
    assert np.array([[int(v) for v in r[1:]] for r in rows[1:]]).tolist() == mat.tolist()
    for png in ("confusion.png", "per_class.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200 and im.size[1] > 150


def test_flip_tta_is_the_mean_of_both_views():
    torch.manual_seed(1)
    model = fcnseg.get_model("fcn32s", num_classes=3, width=1 / 16, fc_dim=8).eval()
    with torch.no_grad():
        model.head.score_fr.weight.normal_()
        x = torch.randn(1, 3, 33, 47)
        expected = (model(x).softmax(1) + model(x.flip(-1)).flip(-1).softmax(1)) / 2
        torch.testing.assert_close(_tta(model, x, flip=True), expected)
        assert _tta(model, x, scales=(0.5, 1.0)).shape == (1, 3, 33, 47)


def test_boundary_band_by_hand():
    t = torch.zeros(7, 7, dtype=torch.long)
    t[:, 4:] = 1  # a vertical edge between columns 3 and 4
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[:, 3:5] = True  # the edge pixels themselves
    assert torch.equal(boundary_band(t, 0), expected)
    expected[:, 2:6] = True  # and everything within one pixel of them
    assert torch.equal(boundary_band(t, 1), expected)
    # Void is never in the band, but its border counts as an edge (VOC's void band outlines the objects).
    v = torch.zeros(7, 7, dtype=torch.long)
    v[3, 3] = 255
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[2:5, 2:5] = True
    expected[3, 3] = False
    assert torch.equal(boundary_band(v, 0), expected)
    assert torch.equal(boundary_band(torch.stack([t, v]), 0)[1], expected)  # batched


# ---------------------------------------------------------------------------- multi-scale TTA, by hand


def _random_fcn8s(num_classes=4):
    """A tiny FCN-8s with random weights at a He scale, score and skip-score layers included (they start at zero):
    its class scores vary over the image and depend on the scale it sees."""
    torch.manual_seed(3)
    model = fcnseg.get_model("fcn8s", num_classes=num_classes, **TINY, dropout=0.0)
    return randomise(model, trainable_only=True, bias_std=None).eval()


def _tta(model, x, **options):
    """The inference object's test-time augmentation: each head's mean probabilities, concatenated."""
    from fcnseg.inference import Predictor

    scores, probs = Predictor(model, **options).batch_scores(x)
    assert probs or options.get("scales", (1.0,)) == (1.0,) and not options.get("flip")
    return scores


def _tta_by_hand(model, x, scales, flip):
    """The mean of the class probabilities of every view: the image resized bilinearly (half-pixel centres, i.e.
    align_corners=False) to scale s, and its mirror image when ``flip``; each view's scores mirrored back, resized
    back to the input's size the same way, then turned into probabilities."""
    h, w = x.shape[-2:]
    probs = []
    for s in scales:
        size = (round(h * s), round(w * s))
        assert size[0] == h * s and size[1] == w * s  # whole sizes: no rounding convention to agree on
        xs = x if s == 1 else torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            scores = model(xs.flip(-1)).flip(-1) if mirrored else model(xs)
            if s != 1:
                scores = torch.nn.functional.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False)
            probs.append(scores.softmax(1))
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("flip", [False, True])
def test_multi_scale_tta_is_the_mean_of_the_per_scale_outputs(flip):
    model = _random_fcn8s()
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    scales = (0.75, 1.0, 1.25)
    with torch.no_grad():
        expected = _tta_by_hand(model, x, scales, flip)
        got = _tta(model, x, flip=flip, scales=scales)
        # The scales matter for this model: each one alone, and the plain prediction, are far from the mean.
        for one in [(s,) for s in scales]:
            assert (_tta_by_hand(model, x, one, flip) - expected).abs().max() > 0.05, one
    assert got.shape == (2, 4, 48, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 48, 64))  # a mean of probabilities, equally weighted


def test_eval_scales_reach_the_confusion_matrix(tmp_path):
    # `fcnseg eval --scales 0.75 1 1.25`: confusion.csv is that of the argmax of the hand-computed multi-scale mean,
    # which differs from the single-scale one.
    from fcnseg.data import get_dataset
    from fcnseg.data.transforms import eval_transforms

    _blocks_tree(tmp_path / "data", n=2, size=32)
    classes = ["background", "red", "green", "blue"]
    ckpt = fcnseg.save_checkpoint(_random_fcn8s(), tmp_path / "m.pt", classes=classes)
    out = tmp_path / "report"
    assert main(["eval", str(ckpt), "--dataset", "folder", "--root", str(tmp_path / "data"), "--split", "val",
                 "--out", str(out), "--num-workers", "0", "--device", "cpu",
                 "--scales", "0.75", "1", "1.25"]) == 0  # fmt: skip
    with open(out / "confusion.csv") as f:
        got = np.array([[int(v) for v in r[1:]] for r in list(csv.reader(f))[1:]])

    model = fcnseg.load(ckpt).eval()
    transforms = eval_transforms(model.preprocessing)
    ds = get_dataset("folder", root=str(tmp_path / "data"), split="val", transforms=transforms)
    mats = {}
    for scales in ((0.75, 1.0, 1.25), (1.0,)):
        mat = np.zeros((4, 4), np.int64)
        for i in range(len(ds)):
            image, mask = ds[i]
            with torch.no_grad():
                probs = _tta_by_hand(model, image.as_subclass(torch.Tensor)[None], scales, flip=False)
            np.add.at(mat, (np.asarray(mask).ravel(), probs.argmax(1)[0].numpy().ravel()), 1)
        mats[scales] = mat
    assert got.tolist() == mats[(0.75, 1.0, 1.25)].tolist()
    assert np.abs(mats[(0.75, 1.0, 1.25)] - mats[(1.0,)]).sum() > 20  # the scales change the predictions


def test_tta_on_a_two_headed_model_averages_each_heads_own_probabilities():
    # Each head's probabilities are its own softmax: one softmax across both heads' concatenated scores would weigh
    # the views differently (each view's shared normaliser), and its per-head argmax can differ from this one.
    from fcnseg.engine.evaluate import evaluate_heads
    from fcnseg.models.fcn import split_heads

    torch.manual_seed(5)
    model = randomise(fcnseg.get_model("fcn16s_twohead", num_classes=4, second_classes=3, **TINY, dropout=0.0),
                      trainable_only=True, bias_std=None).eval()  # fmt: skip
    x = torch.randn(1, 3, 40, 56, generator=torch.Generator().manual_seed(6))
    scales = (0.75, 1.0, 1.25)
    with torch.no_grad():
        both = [_tta_by_hand(lambda v, k=k: split_heads(model, model(v))[k], x, scales, True) for k in model.heads]
        got = _tta(model, x, flip=True, scales=scales)
        shared = _tta_by_hand(model, x, scales, True)  # one softmax over both heads' scores
    torch.testing.assert_close(got, torch.cat(both, 1), rtol=1e-5, atol=1e-6)
    assert (shared - got).abs().max() > 1e-3  # the shared softmax is a different (wrong) figure here
    # Through the evaluation: the confusion matrices are those of each head's argmax of the hand-computed mean.
    masks = torch.stack([both[0].argmax(1), both[1].argmax(1)], 1)
    heads = {"semantic": ["a", "b", "c", "d"], "geometric": ["x", "y", "z"]}
    cms = evaluate_heads(model, [(x, masks)], heads, flip=True, scales=scales)
    assert [cm.mat.trace().item() for cm in cms.values()] == [40 * 56, 40 * 56]
    assert [cm.mat.sum().item() for cm in cms.values()] == [40 * 56, 40 * 56]


def test_eval_shows_its_progress_and_quiet_hides_it(tmp_path, capsys):
    _blocks_tree(tmp_path / "data", n=3, size=32)
    ckpt = fcnseg.save_checkpoint(fcnseg.get_model("fcn32s", num_classes=4, **TINY), tmp_path / "m.pt")
    argv = ["eval", str(ckpt), "--dataset", "folder", "--root", str(tmp_path / "data"), "--split", "val",
            "--num-workers", "0", "--device", "cpu", "--report-images", "0"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "eval: 100%" in err and "3/3" in err, err  # every image of the split counted, as it is evaluated
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "eval" not in capsys.readouterr().err
