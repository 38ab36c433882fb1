"""`--runtime auto` picks its path from the CPU's features (the probe mocked through FCNSEG_CPU_FEATURES), says
which and why in one line; int8 uses 7-bit weights without VNNI and warns when it disagrees with fp32."""

import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.imageio import read_mask_png
from fcnseg.runtime import check_int8, choose_path, cpu_features, make_runner, resolve_path
from fcnseg.runtime.onnx import int8_stem
from tests.helpers import TINY, randomise

AVX2 = {"sse4_2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl"}


@pytest.mark.parametrize(
    "features, reduced, path, reason",
    [
        (set(), False, "eager", "no AVX2 and FMA"),
        ({"sse4_2", "avx", "avx2"}, False, "eager", "no AVX2 and FMA"),  # AVX2 without FMA
        (AVX2, False, "winograd", "AVX2 and FMA: Winograd and GEMM kernels"),
        (AVX512, False, "winograd", "AVX2 and FMA"),
        (AVX512 | {"avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}, False, "winograd", "AVX2 and FMA"),
        (AVX2, True, "onnx-int8", "int8 with 7-bit weights: no VNNI"),
        (AVX2 | {"avx_vnni"}, True, "onnx-int8", "VNNI's u8s8 kernels (avx_vnni)"),
        (AVX512 | {"avx512_vnni"}, True, "onnx-int8", "VNNI's u8s8 kernels (avx512_vnni)"),
        (AVX512 | {"avx512_vnni", "avx512_bf16"}, True, "bf16", "computes bf16 natively (avx512_bf16)"),
        (AVX512 | {"amx_bf16", "amx_int8", "amx_tile"}, True, "bf16", "natively (amx_bf16)"),
        ({"sse4_2"}, True, "eager", "no AVX2 and FMA"),
    ],
)
def test_auto_chooses_as_documented_for_each_combination_of_features(features, reduced, path, reason):
    chosen, why = choose_path(frozenset(features), reduced=reduced)
    assert chosen == path and reason in why


def test_the_probe_reads_the_cpu_and_the_override(monkeypatch):
    monkeypatch.delenv("FCNSEG_CPU_FEATURES")
    flags = cpu_features()
    with open("/proc/cpuinfo") as f:
        line = next(x for x in f if x.startswith(("flags", "Features")))
    assert flags == frozenset(line.split(":", 1)[1].split())
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", "AVX2, fma avx512_vnni")
    assert cpu_features() == {"avx2", "fma", "avx512_vnni"}
    assert resolve_path("auto")[0] == "winograd"
    assert resolve_path("auto-reduced") == (
        "onnx-int8",
        "runtime auto-reduced: onnx-int8 (reduced precision asked for; int8 with VNNI's u8s8 kernels (avx512_vnni))",
    )
    assert resolve_path("onnx") == ("onnx", None)


def _tiny_model():
    torch.manual_seed(0)
    return randomise(fcnseg.get_model("fcn8s", num_classes=4, **TINY), seed=3)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = _tiny_model()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    image = np.repeat(np.repeat(rng.integers(0, 256, (20, 25, 3), dtype=np.uint8), 5, 0), 5, 1)  # 100 x 125
    Image.fromarray(image).save(tmp_path / "a.png")
    return model, ckpt, tmp_path


def test_predict_defaults_to_auto_and_says_its_measured_choice(tiny_checkpoint, monkeypatch, capsys):
    model, ckpt, tmp = tiny_checkpoint
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", " ".join(AVX2))
    monkeypatch.setenv("FCNSEG_AUTO_PATHS", "eager,winograd")
    assert main(["predict", str(ckpt), str(tmp / "a.png"), "--out", str(tmp / "auto")]) == 0
    err = capsys.readouterr().err
    chosen = "winograd" if "runtime auto: winograd (" in err else "eager"
    other = "eager" if chosen == "winograd" else "winograd"
    assert re.fullmatch(rf"runtime auto: {chosen} \([0-9]+ ms; measured on 1x100x125: {other} [0-9]+ ms\)\n", err), err
    assert "runtime agrees" not in err  # an fp32-class path is not checked image by image
    assert main(["predict", str(ckpt), str(tmp / "a.png"), "--out", str(tmp / "again")]) == 0
    assert (
        f"runtime auto: {chosen} (" in (err := capsys.readouterr().err)
        and "measured on 1x100x125 earlier, cached" in err
    )
    assert main(["predict", str(ckpt), str(tmp / "a.png"), "--out", str(tmp / "eager"), "--runtime", "eager"]) == 0
    assert "runtime" not in capsys.readouterr().err
    auto, eager = read_mask_png(tmp / "auto" / "a.png"), read_mask_png(tmp / "eager" / "a.png")
    assert np.array_equal(eager, model.predict(np.asarray(Image.open(tmp / "a.png"))))
    assert (auto == eager).mean() >= 0.999
    assert main(["predict", str(ckpt), str(tmp / "a.png"), "--out", str(tmp / "old"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""  # --quiet: no line
    monkeypatch.setenv("FCNSEG_AUTO_PATHS", "eager")
    assert main(["predict", str(ckpt), str(tmp / "a.png"), "--out", str(tmp / "old")]) == 0
    assert (
        capsys.readouterr().err
        == "runtime auto: eager (the only candidate FCNSEG_AUTO_PATHS=eager leaves; nothing measured)\n"
    )


def _int8_weights(path):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The fp32 ONNX file of tiny_checkpoint's model (the same weights each time), exported and checked once: the
    int8 files below differ by the CPU's features, the file they are quantised from does not."""
    from fcnseg.runtime.onnx import exported_fp32

    return exported_fp32(_tiny_model(), tmp_path_factory.mktemp("tiny-onnx"))


@pytest.mark.parametrize("features, low, high", [("avx2 fma", -64, 64), ("avx2 fma avx512_vnni", -127, 127)])
def test_int8_uses_7_bit_weights_where_the_cpu_has_no_vnni(tiny_checkpoint, tiny_export, monkeypatch, features, low,
                                                           high):  # fmt: skip
    model, _, tmp = tiny_checkpoint
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", features)
    calibration = [torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    workdir = tmp / features.replace(" ", "_")
    workdir.mkdir()
    shutil.copy(tiny_export, workdir)  # the int8 file is made here, for these features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the agreement warning is tested below
        make_runner(model, "onnx-int8", calibration=calibration, workdir=workdir)
    weights = np.concatenate([w.ravel() for w in _int8_weights(workdir / f"{int8_stem(model, (), calibration)}.onnx")])
    # Symmetric per-channel weights (ONNX Runtime's reduced range is -64..64: 255 x 64 x 2 still fits 16 bits);
    # each output channel's largest weight maps to the end of the range.
    assert weights.min() >= low and weights.max() <= high
    assert max(-int(weights.min()), int(weights.max())) == max(-low, high)


def _logits_with_flips(share_flipped: float, pixels: int = 1000) -> tuple:
    """Two runners over one input: ``b`` changes the argmax of the first ``share_flipped`` of the pixels."""
    a = torch.zeros(1, 3, 1, pixels)
    a[:, 0] = 1.0
    b = a.clone()
    b[:, 1, 0, : int(share_flipped * pixels)] = 2.0
    return (lambda x: b), (lambda x: a)


@pytest.mark.parametrize("flipped, warns", [(0.02, True), (0.011, True), (0.009, False), (0.0, False)])
def test_int8_warns_when_it_agrees_with_fp32_on_less_than_99_percent(flipped, warns):
    int8, fp32 = _logits_with_flips(flipped)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        share = check_int8(int8, fp32, [torch.zeros(1)], None)
    assert share == pytest.approx(1 - flipped)
    messages = [str(w.message) for w in caught]
    assert bool(messages) == warns
    if warns:
        assert messages == [
            f"onnx-int8 agrees with fp32 on only {100 * (1 - flipped):.2f}% of the calibration images' pixels "
            "(below 99%): its masks will differ visibly; use an fp32 path (winograd, onnx) or calibrate on more "
            "images like yours"
        ]


def test_eval_and_serve_flags_default_to_auto():
    from fcnseg.cli import build_parser

    parser = build_parser()
    for command in (
        ["eval", "c.pt", "--dataset", "synthetic", "--out", "o"],
        ["serve", "c.pt"],
        ["predict", "c.pt", "x.png", "--out", "o"],
    ):
        assert parser.parse_args(command).runtime == "auto", command


def test_int8_sensitivity_puts_the_layer_that_quantises_worst_first(tiny_checkpoint, capsys):
    from fcnseg.bench import int8_sensitivity
    from fcnseg.runtime import float_layers

    model, ckpt, tmp = tiny_checkpoint
    hostile = "backbone.features.12"  # conv3_2: one huge weight per output channel sets its int8 scale, so the
    with torch.no_grad():  # channel's other weights round to zero
        model.get_submodule(hostile).weight[:, 0, 1, 1] = 300.0
    calibration = [torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cost = int8_sensitivity(model, calibration, workdir=tmp / "s")
    quantised = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    quantised = [n for n in quantised if not (n + ".").startswith(tuple(float_layers(model)))]
    assert sorted(cost) == sorted(quantised) and "backbone.fc6" in cost and "backbone.features.0" not in cost
    assert list(cost.values()) == sorted(cost.values()) and all(0 <= v <= 1 for v in cost.values())
    assert next(iter(cost)) == hostile, cost
    assert cost[hostile] < min(v for k, v in cost.items() if k != hostile)
