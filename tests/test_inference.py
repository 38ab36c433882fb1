"""The inference object against an independent computation, over every combination it must support.

The oracle below never touches fcnseg's inference code: it calls the model's own forward on the whole image or on
windows it lays out itself (origins on the stride grid, the last window ending at the edge) and blends them with
the documented weights (a linear ramp (i + 0.5) / overlap across each inner edge, full weight elsewhere), then
mirrors, resizes and averages the probabilities by hand.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fcnseg
from fcnseg.errors import FcnsegError
from fcnseg.inference import Predictor
from fcnseg.runtime import bf16_is_native, make_runner
from tests.helpers import TINY, export_folder, randomise

HEADS = {"one": ("fcn8s", {"num_classes": 4}), "two": ("fcn16s_twohead", {"num_classes": 4, "second_classes": 3})}
SIZE = (100, 100)  # not a multiple of the stride: the last windows run to the edge, longer than the tile
TILE, OVERLAP = 64, 32
TTA = {"flip": True, "scales": (0.75, 1.0)}
FP32_TOLERANCE = 1e-4  # of the logit span (probabilities with test-time augmentation): export's own bound
# Reduced precision is judged by argmax agreement with the fp32 oracle of the same case. How far int8 or bf16 moves
# a random tiny model's argmax is the path's own business (its calibration check measures it); what this test
# owns is that tiling, test-time augmentation and the heads do not make it worse. So each case must agree at least
# as well as the same path on the plain whole image, less a margin for the views' own rounding, and never below an
# absolute floor. A misplaced window, an unmirrored view or a mixed-up head agrees on about one pixel in as many as
# there are classes (25-33%), below both.
REDUCED_MARGIN = 0.05
REDUCED_FLOOR = 0.5
RUNTIMES = ["eager", "winograd", "onnx", "onnx-int8"] + (["bf16"] if bf16_is_native() else [])


# ------------------------------------------------------------------------------------------------ the models

COLOURS = np.array([[128, 128, 128], [220, 30, 30], [30, 200, 40], [40, 60, 220]], np.uint8)


def _blocks(seed: int, size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """An image of 16 x 16 blocks of four colours (noisy), and its class indices."""
    rng = np.random.default_rng(seed)
    h, w = size
    cells = rng.integers(0, 4, ((h + 15) // 16, (w + 15) // 16))
    labels = np.kron(cells, np.ones((16, 16), np.int64))[:h, :w]
    image = COLOURS[labels].astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), labels


_MODELS: dict[tuple[str, str], torch.nn.Module] = {}
_RUNNERS: dict[tuple[str, str, str], object] = {}
_ORACLES: dict[tuple, tuple[torch.Tensor, bool]] = {}


def _model(heads: str, alignment: str):
    """A tiny-width model with He-scaled random weights in every layer (the score layers included), the same
    weights in both alignments: scores that vary over the image, so that every comparison can fail."""
    if (heads, alignment) not in _MODELS:
        name, options = HEADS[heads]
        model = fcnseg.get_model(name, alignment=alignment, dropout=0.0, **TINY, **options)
        _MODELS[heads, alignment] = randomise(model, seed=0, trainable_only=True).eval()
    return _MODELS[heads, alignment]


def _runner(heads: str, alignment: str, runtime: str, tmp_path_factory):
    """Each execution path built once per model (an ONNX export and an int8 calibration take seconds); onnx and
    onnx-int8 share one export."""
    key = (heads, alignment, runtime)
    if key not in _RUNNERS:
        model = _model(heads, alignment)
        calibration = [model.preprocessing(_blocks(seed)[0])[None] for seed in (20, 21)]
        folder = export_folder(model, tmp_path_factory.getbasetemp() / "exports")  # tests/test_openvino.py's too
        # eager: the Predictor's own path (the model's forward); the others built here once.
        _RUNNERS[key] = (
            runtime if runtime == "eager" else make_runner(model, runtime, calibration=calibration, workdir=folder)
        )
    return _RUNNERS[key]


# ------------------------------------------------------------------------------------------------ the oracle


def _windows(n: int, tile: int, overlap: int, stride: int) -> list[tuple[int, int]]:
    """(start, length) along one axis, written out: origins on the stride grid, a step as large as the overlap
    allows, the last window from the last grid point at or before n - tile to the edge."""
    step = (tile - overlap) // stride * stride
    last = max(0, (n - tile) // stride * stride)
    out, start = [], 0
    while start < last:
        out.append((start, tile))
        start += step
    return [*out, (last, n - last)]


def _ramp(length: int, inner_start: bool, inner_end: bool, overlap: int) -> np.ndarray:
    weight = np.ones(length)
    for i in range(length):
        if inner_start and overlap:
            weight[i] = min(weight[i], (i + 0.5) / overlap)
        if inner_end and overlap:
            weight[i] = min(weight[i], (length - 1 - i + 0.5) / overlap)
    return weight


def _forward(model, x: torch.Tensor, tile: int | None) -> torch.Tensor:
    """The model's own forward on the whole ``x``, or on each window, blended by the ramps."""
    with torch.no_grad():
        if not tile:
            return model(x)
        h, w = x.shape[-2:]
        total = torch.zeros(x.shape[0], sum(model.heads.values()), h, w, dtype=torch.float64)
        weights = torch.zeros(h, w, dtype=torch.float64)
        for (y0, wh), (x0, ww) in itertools.product(
            _windows(h, tile, OVERLAP, model.stride), _windows(w, tile, OVERLAP, model.stride)
        ):
            ramp = np.outer(_ramp(wh, y0 > 0, y0 + wh < h, OVERLAP), _ramp(ww, x0 > 0, x0 + ww < w, OVERLAP))
            ramp = torch.from_numpy(ramp)
            total[..., y0 : y0 + wh, x0 : x0 + ww] += model(x[..., y0 : y0 + wh, x0 : x0 + ww]).double() * ramp
            weights[y0 : y0 + wh, x0 : x0 + ww] += ramp
        return (total / weights).float()


def _oracle(model, x: torch.Tensor, tile: int | None, tta: bool) -> tuple[torch.Tensor, bool]:
    """Logits (no augmentation), or the mean over views of each head's probabilities; and which of the two."""
    if not tta:
        return _forward(model, x, tile), False
    h, w = x.shape[-2:]
    probs = []
    for s in TTA["scales"]:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        for mirrored in (False, True):
            out = _forward(model, xs.flip(-1), tile).flip(-1) if mirrored else _forward(model, xs, tile)
            if s != 1:
                out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            probs.append(torch.cat([p.softmax(1) for p in out.split(list(model.heads.values()), 1)], 1))
    return torch.stack(probs).mean(0), True


# ------------------------------------------------------------------------------------------------ the test


def _oracle_of(model, x, heads, alignment, tile=None, tta=False):
    """The oracle of a case, computed once (every runtime compares with it)."""
    key = (heads, alignment, tile, tta)
    if key not in _ORACLES:
        _ORACLES[key] = _oracle(model, x, tile, tta)
    return _ORACLES[key]


def _agreements(predictor: Predictor, x: torch.Tensor, oracle: tuple[torch.Tensor, bool]) -> dict[str, float]:
    """Per head, the share of pixels where the predictor's label is the oracle's."""
    expected, _ = oracle
    theirs = expected.split(list(predictor.heads.values()), 1)
    return {
        head: float((mask == part.argmax(1)).double().mean())
        for (head, mask), part in zip(predictor.batch_masks(x).items(), theirs, strict=True)
    }


@pytest.mark.parametrize("alignment", ["aligned", "caffe"])
@pytest.mark.parametrize("heads", ["one", "two"])
@pytest.mark.parametrize("tta", [False, True], ids=["no-tta", "flip+scales"])
@pytest.mark.parametrize("tile", [None, TILE], ids=["whole", "tiled"])
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.filterwarnings("ignore:onnx-int8 agrees")  # random weights: int8's own check warns, as it should
def test_every_combination_matches_the_hand_computation(runtime, tile, tta, heads, alignment, tmp_path_factory):
    model = _model(heads, alignment)
    image, _ = _blocks(99, SIZE)
    options = {"tile": tile, "overlap": OVERLAP, **(TTA if tta else {})}
    predictor = Predictor(model, runtime=_runner(heads, alignment, runtime, tmp_path_factory), **options)
    x = predictor.inputs([image])[0][None]
    expected, probs = _oracle_of(model, x, heads, alignment, tile, tta)
    got = torch.cat(list(predictor.batch_proba(x).values() if probs else predictor.batch_logits(x).values()), 1)
    assert got.shape == (1, sum(model.heads.values()), *SIZE)
    sizes = list(model.heads.values())
    if runtime in ("eager", "winograd", "onnx"):
        span = float(expected.max() - expected.min())
        assert span > (0.5 if probs else 2.0)  # a trained model: scores that vary, so the comparison can fail
        assert float((got - expected).abs().max()) <= FP32_TOLERANCE * span
    else:
        plain = _agreements(Predictor(model, runtime=predictor.runner()), x, _oracle_of(model, x, heads, alignment))
        for head, agree in _agreements(predictor, x, (expected, probs)).items():
            assert agree >= max(REDUCED_FLOOR, plain[head] - REDUCED_MARGIN), (runtime, head, agree, plain[head])
    # The per-image answers agree with the batch ones: every head's mask, at the image's size.
    masks = predictor.masks([image])[0]
    assert list(masks) == list(model.heads)
    for (head, mask), part in zip(masks.items(), got.split(sizes, 1), strict=True):
        assert mask.shape == SIZE and mask.dtype == np.uint8
        assert np.array_equal(mask, part[0].argmax(0).numpy()), head


# ------------------------------------------------------------------------------------ model.predict and misuse


def _random(name: str = "fcn8s", **options):
    from tests.helpers import randomise

    return randomise(fcnseg.get_model(name, **TINY, **options), seed=0).eval()


def test_model_predict_builds_the_auto_path_once_and_again_after_the_weights_change(monkeypatch, capsys):
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", "avx2 fma")
    monkeypatch.setenv("FCNSEG_AUTO_PATHS", "winograd")  # auto's only candidate: taken without a measurement
    model = _random(num_classes=3)
    image = _blocks(1, (40, 50))[0]
    first = model.predict(image)
    _, built, path, _ = model._runners["auto"]
    assert path == "winograd"
    assert np.array_equal(model.predict(image), first) and model._runners["auto"][1] is built  # kept
    assert capsys.readouterr().err == ""  # says nothing unless asked
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)  # an in-place change, as an optimiser step or load_state_dict makes
    changed = model.predict(image)
    assert model._runners["auto"][1] is not built
    assert not np.array_equal(changed, first)  # not the stale copy's answer...
    assert np.array_equal(changed, model.predict(image, runtime="eager"))  # ...but the changed model's
    model.predict(image, verbose=True)
    assert "runtime auto: winograd" in capsys.readouterr().err


def test_model_predict_keeps_the_callers_mode_and_matches_the_forward_by_hand():
    model = _random(num_classes=3, dropout=0.5).train()
    image = _blocks(2, (40, 50))[0]
    masks = model.predict(image)
    assert model.training  # the caller's mode, restored
    with torch.no_grad():
        expected = model.eval()(model.preprocessing(image)[None])[0]
    assert np.array_equal(masks, expected.argmax(0).numpy())
    proba = model.predict_proba(image)
    np.testing.assert_allclose(proba, expected.softmax(0).numpy(), atol=1e-6)


def test_confidence_and_entropy_are_those_of_the_probabilities_by_hand():
    model = _random("fcn16s_twohead", num_classes=4, second_classes=3)
    image = _blocks(3, (40, 50))[0]
    out = Predictor(model).outputs([image], proba=True, confidence=True, entropy=True)[0]
    with torch.no_grad():
        logits = model(model.preprocessing(image)[None])[0].double()
    for head, part in zip(model.heads, logits.split([4, 3]), strict=True):
        p = part.softmax(0).numpy()
        np.testing.assert_allclose(out.proba[head], p, atol=1e-6)
        np.testing.assert_allclose(out.confidence[head], p.max(0), atol=1e-6)
        np.testing.assert_allclose(out.entropy[head], -(p * np.log(p)).sum(0), atol=1e-5)
        assert np.array_equal(out.masks[head], p.argmax(0))


def test_two_headed_misuse_is_one_line():
    from fcnseg.predict import predict_mask, predict_proba

    model = _random("fcn16s_twohead", num_classes=4, second_classes=3)
    image = _blocks(4, (40, 50))[0]
    with pytest.raises(FcnsegError, match=r"^this model has 2 heads \(semantic, geometric\): name one") as e:
        predict_mask(model, image)
    assert "\n" not in str(e.value)
    with pytest.raises(FcnsegError, match=r"^head 'depth': this model's heads are semantic, geometric$"):
        predict_mask(model, image, head="depth", tile=32)
    with pytest.raises(FcnsegError, match="head 'depth'"):
        model.predict(image, head="depth")
    # Named, a head's mask is that head's argmax (tiled or not), never one over both heads' channels.
    with torch.no_grad():
        geometric = model(model.preprocessing(image)[None])[0, 4:].argmax(0).numpy()
    assert np.array_equal(predict_mask(model, image, head="geometric"), geometric)
    assert np.array_equal(model.predict(image)["geometric"], geometric)
    tiled = predict_mask(model, image, head="geometric", tile=32, overlap=0)
    assert np.array_equal(tiled, model.predict(image, tile=32, overlap=0)["geometric"])
    assert set(np.unique(tiled)) <= {0, 1, 2}
    # The functional and the method forms give the same dict.
    both = predict_proba(model, image)
    assert list(both) == ["semantic", "geometric"]
    np.testing.assert_array_equal(both["geometric"], model.predict_proba(image, head="geometric"))


def test_training_goes_on_after_a_prediction():
    # Prediction runs under inference mode; what the model caches there (the upsamplers' per-channel kernels) must
    # still be usable by a training step that follows, as in validation during training.
    model = _random(num_classes=3).train()
    Predictor(model).masks([_blocks(5, (40, 50))[0]])
    x = torch.randn(2, 3, 40, 50, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("dim", [0, 1, -3])
def test_class_labels_are_numpys_argmax_with_ties_and_nan(dim):
    """Labels are taken as ``max(dim).indices`` (fast on the CPU); they must be numpy's argmax: the first of tied
    maxima, and a NaN wins over any number."""
    from fcnseg.runtime.compare import class_labels

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (4, 5, 6, 7), generator=gen).float()  # three values: ties everywhere
    scores[1, 3, 2, 2] = scores[2, 0, 4, 5] = float("nan")
    scores[0, 2, 1, 1] = 5.0  # a clear winner after which a NaN comes
    scores[0, 3, 1, 1] = float("nan")
    expected = np.argmax(scores.numpy(), axis=dim)
    assert np.array_equal(class_labels(scores, dim).numpy(), expected)
    wide = scores.contiguous(memory_format=torch.channels_last)
    assert np.array_equal(class_labels(wide, dim).numpy(), expected)
