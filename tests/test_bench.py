"""``fcnseg bench``'s agreement with eager fp32: measured where fp32's argmax varies (a checkpoint, ``--images``, or
jittered weights for an untrained model), "-" and the reason where it does not, and the source named in the table
and the JSON."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.bench import ONE_CLASS, bench_model, format_results, jittered, one_class_heads, path_agreement
from fcnseg.cli import main
from fcnseg.inference import normalised
from fcnseg.runtime import agreement, make_runner
from tests.helpers import randomise

SIZE = (67, 91)
NOISE = "the bench input (N(0, 1) noise, seed 0)"


def _untrained() -> fcnseg.FCN:
    """A freshly built tiny FCN-8s: its class-score layers start at zero, as the release's do. Its other layers'
    initialisation is seeded: on some draws of a tiny net, no jitter seed makes the argmax vary."""
    torch.manual_seed(0)
    return fcnseg.get_model("fcn8s", num_classes=5, width=1 / 16, fc_dim=64)


def _bench_input() -> torch.Tensor:
    return torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(0))  # what bench_model draws


def _bench(model, paths, **options):
    with warnings.catch_warnings():
        # int8 on a tiny net warns of its agreement, and bf16 of being emulated on a CPU without bf16 instructions.
        warnings.simplefilter("ignore", UserWarning)
        return bench_model(model, size=SIZE, paths=paths, runs=1, warmup=0, progress=False, **options)


def _rows(doc) -> dict:
    return {r["path"]: r for r in doc["results"]}


def test_an_untrained_model_gets_a_dash_and_the_reason_not_100_percent():
    # bf16 stands for any path compared with eager: which one is compared does not enter the note (ONNX Runtime's
    # agreement is measured in tests/test_runtime.py), and bf16 is built without an export.
    model = _untrained()
    # What the agreement used to be: constant logits, so any path agrees everywhere, whatever it computes.
    assert one_class_heads(model, [_bench_input()]) == ["out"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bf16 emulated on a CPU without bf16 instructions
        assert path_agreement(model, make_runner(model, "bf16"), [_bench_input()]) == 1.0
    doc = _bench(model, ["eager", "bf16"], jitter=False)
    assert doc["agreement_source"] == {
        "kind": "model",
        "weights": "the model's own weights",
        "inputs": NOISE,
        "reason": ONE_CLASS,
        "text": f"the model's own weights; {NOISE}",
    }
    rows = _rows(doc)
    assert rows["bf16"]["agreement_with_fp32"] is None and rows["bf16"]["agreement_note"] == ONE_CLASS
    assert rows["eager"]["agreement_with_fp32"] is None and rows["eager"]["agreement_note"] == "the reference"
    table = format_results(doc)
    bf16_row = next(line for line in table.splitlines() if line.startswith("bf16 "))
    assert bf16_row.split()[-1] == "-" and "%" not in bf16_row.split()[-1]
    assert f"agreement measured on: the model's own weights; {NOISE}" in table
    assert "agree -: reference argmax is one class everywhere" in table


def test_an_untrained_model_is_timed_and_compared_on_jittered_weights():
    model = _untrained()
    doc = _bench(model, ["eager", "onnx-int8"])
    source = doc["agreement_source"]
    assert source["kind"] == "jittered" and source["reason"] is None and source["inputs"] == NOISE
    assert source["weights"] == (
        "jittered weights (seed 0: every Conv2d and Linear weight and bias + N(0, (0.1 x its std)^2); a constant "
        "weight + N(0, 0.01^2), a constant bias kept) of the model's own weights"
    )
    rows = _rows(doc)
    assert rows["eager"]["agreement_with_fp32"] is None
    # int8 computes something else, and on weights whose argmax varies that shows: not 100%.
    assert 0.5 < rows["onnx-int8"]["agreement_with_fp32"] < 1.0
    assert f"agreement measured on: {source['text']}\n" in format_results(doc) + "\n"
    assert one_class_heads(jittered(model, 0), [_bench_input()]) == []  # what was compared varies
    assert not model.score_heads.out.score_fr.weight.any()  # and the model itself is as it was


def test_on_jittered_weights_eager_agrees_exactly_and_int8_does_not():
    model = jittered(_untrained(), 0)
    check = [_bench_input(), torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))]
    eager = make_runner(model, "eager")  # channels_last: another memory layout than the reference's forward
    assert path_agreement(model, eager, check) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        int8 = make_runner(model, "onnx-int8", calibration=check)
    share = path_agreement(model, int8, check)
    assert 0.5 < share < 1.0
    # The Predictor-level figure is the low-level comparison of the two runners, pixel for pixel.
    assert share == agreement(int8, eager, check, model)


def test_jitter_follows_its_documented_rule():
    model = _untrained()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    a, b, c = ({n: p.detach() for n, p in jittered(model, seed).named_parameters()} for seed in (0, 0, 1))
    assert all(torch.equal(a[name], b[name]) for name in a)  # seeded: the same copy twice
    assert not torch.equal(a["backbone.fc7.weight"], c["backbone.fc7.weight"])  # another seed, other noise
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # a copy: the model unchanged
    for name in ("backbone.features.28.weight", "backbone.fc6.weight"):  # 0.1 x the tensor's own spread
        noise = float((a[name] - before[name]).std() / before[name].std())
        assert noise == pytest.approx(0.1, rel=0.1), name
    fr = "score_heads.out.score_fr"  # zero-initialised: a constant weight gets noise of std 0.01, the bias none
    assert float(a[f"{fr}.weight"].std()) == pytest.approx(0.01, rel=0.2)
    assert torch.equal(a[f"{fr}.bias"], torch.zeros(5))
    assert torch.equal(a["backbone.fc6.bias"], before["backbone.fc6.bias"])  # zero-initialised too
    for name in [n for n in a if "upsample" in n]:  # the fixed bilinear upsamplers are no Conv2d: kept
        assert torch.equal(a[name], before[name]), name


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):  # blocks of colour: an image with regions, not per-pixel noise
        image = np.repeat(np.repeat(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), 6, 0), 6, 1)
        Image.fromarray(image).save(folder / f"{i}.png")
    return folder


def _cli(args, tmp_path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["bench", *args, "--size", "67x91", "--runs", "1", "--warmup", "0", "--quiet",
                     "--json", str(tmp_path / "b.json")]) == 0  # fmt: skip
    return json.loads((tmp_path / "b.json").read_text())


def test_the_cli_names_a_trained_checkpoint_and_the_images(tmp_path, images, capsys):
    model = randomise(_untrained(), seed=3)
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "m.pt")
    doc = _cli(["--checkpoint", str(ckpt), "--paths", "eager", "onnx", "--images", str(images)], tmp_path)
    source = doc["agreement_source"]
    assert source["kind"] == "checkpoint" and source["reason"] is None
    assert source["text"] == f"checkpoint {ckpt}; --images {images} (2 images)"
    assert f"agreement measured on: checkpoint {ckpt}; --images {images} (2 images)" in capsys.readouterr().out
    assert _rows(doc)["onnx"]["agreement_with_fp32"] >= 0.999
    # The same model without its file's name: measured on the images.
    check = normalised(model, sorted(images.iterdir()))
    assert _bench(model, ["eager"], check=check, images=str(images))["agreement_source"]["kind"] == "images"


def test_the_cli_jitters_an_untrained_checkpoint_unless_told_not_to(tmp_path, images):
    ckpt = fcnseg.save_checkpoint(_untrained(), tmp_path / "m.pt")
    doc = _cli(["--checkpoint", str(ckpt), "--paths", "eager", "bf16"], tmp_path)
    source = doc["agreement_source"]
    assert source["kind"] == "jittered" and source["weights"].endswith(f"of checkpoint {ckpt}")
    assert 0.5 < _rows(doc)["bf16"]["agreement_with_fp32"] <= 1.0
    doc = _cli(["--checkpoint", str(ckpt), "--paths", "eager", "bf16", "--no-jitter"], tmp_path)
    assert doc["agreement_source"]["reason"] == ONE_CLASS and _rows(doc)["bf16"]["agreement_with_fp32"] is None
