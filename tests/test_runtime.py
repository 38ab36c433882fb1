"""Execution paths: bf16 and ONNX int8 agree with fp32 on the demo model and demo images; predict, eval, bench."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.data import get_dataset
from fcnseg.errors import FcnsegError
from fcnseg.imageio import read_mask_png
from fcnseg.runtime import PATHS, agreement, make_runner
from fcnseg.runtime.openvino import openvino_available
from tests.helpers import HANG_TIMEOUT, TINY, randomise


def _demo_inputs(model, split, n):
    ds = get_dataset("synthetic", split=split)
    return [model.preprocessing(ds[i][0].as_subclass(torch.Tensor)).unsqueeze(0) for i in range(n)]


@pytest.fixture(scope="module")
def demo(quick_demo):
    out, _ = quick_demo
    model = fcnseg.load(out / "fcn8s" / "best.pt")
    return model, _demo_inputs(model, "train", 8), _demo_inputs(model, "val", 24)


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    """One folder for the demo model's ONNX files: the ONNX Runtime and OpenVINO paths build on one checked export,
    as bench's do (the export itself: tests/test_export.py)."""
    return tmp_path_factory.mktemp("demo-onnx")


# NNCF's int8 kept 98.9% of the quick demo model's labels on a Sapphire Rapids CPU; on the full demo model, trained
# longer, it keeps more than ONNX Runtime's int8 file does (README, Measured).
OPENVINO = [("openvino", 0.9999), ("openvino-bf16", 0.99), ("openvino-int8", 0.985)] if openvino_available() else []


@pytest.mark.parametrize("path, bar", [("bf16", 0.99), ("onnx-int8", 0.99), ("onnx", 0.9999), *OPENVINO])
def test_reduced_precision_agrees_with_fp32_on_the_demo(demo, demo_onnx, path, bar):
    model, calibration, images = demo
    fp32 = make_runner(model, "eager")
    run = make_runner(model, path, calibration=calibration, workdir=demo_onnx)  # int8: calibrated on training images
    share = agreement(run, fp32, images)  # judged on held-out validation images
    assert share >= bar, (path, share)
    assert run(images[0]).dtype == torch.float32 and run(images[0]).shape == fp32(images[0]).shape


def test_int8_sums_the_float_class_scores_in_float(tmp_path):
    # FCN-8s adds its upsampled class scores to the skip layers' scores twice, right where the argmax is decided:
    # int8 must read both sums' inputs as computed, not through an 8-bit QuantizeLinear / DequantizeLinear pair,
    # and so must the two matrix products of the last upsampling, while the backbone (VGG16's 12 convolutions past
    # the first, fc6, fc7) stays int8.
    import onnx

    from fcnseg.runtime.onnx import int8_file

    model = randomise(fcnseg.get_model("fcn8s", num_classes=3, **TINY), seed=0, trainable_only=True).eval()
    calibration = [torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(int8_file(model, tmp_path, calibration)))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    producer = {o: n.op_type for n in graph.node for o in n.output}
    readers = {i: [m.op_type for m in graph.node if i in m.input] for n in graph.node for i in n.output}
    sums = [n for n in graph.node if n.op_type == "Add" and types.get(n.output[0]) == onnx.TensorProto.FLOAT]
    assert len(sums) == 2  # not the shape arithmetic's integer sums
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]  # the last upsampling, as exported
    assert len(matmuls) == 2
    for n in [*sums, *matmuls]:
        assert "DequantizeLinear" not in [producer[i] for i in n.input], n.name
        assert "QuantizeLinear" not in readers[n.output[0]], n.name
    int8_convs = [n for n in graph.node if n.op_type == "Conv" and producer.get(n.input[1]) == "DequantizeLinear"]
    assert len(int8_convs) == 12 + 2, [n.input[1] for n in int8_convs]


def test_int8_keeps_a_residual_sum_of_int8_layers_int8():
    # A hand-built graph: a float first layer, two int8 layers summed residually, and two float score layers whose
    # sum (one cropped first) is a skip sum. Only the skip sum joins the float layers; the residual one traces back
    # to the float first layer only through int8 layers, and the shape arithmetic's sum is left alone.
    from onnx import TensorProto, helper, numpy_helper

    from fcnseg.runtime.onnx import _float_nodes

    def conv(name, x, w):
        return helper.make_node("Conv", [x, w], [name], name=name)

    weights = [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), f"{c}.w") for c in "abcst"]
    nodes = [conv("a", "x", "a.w"), conv("b", "a", "b.w"), helper.make_node("Relu", ["b"], ["r"], name="relu"),
             conv("c", "r", "c.w"), helper.make_node("Add", ["r", "c"], ["res"], name="residual"),
             conv("s", "res", "s.w"), conv("t", "r", "t.w"),
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Add", ["shape", "shape"], ["ends"], name="shape_sum"),
             helper.make_node("Slice", ["s", "ends", "ends"], ["crop"], name="crop"),
             helper.make_node("Add", ["crop", "t"], ["sum"], name="skip"),
             # The sum upsampled by matrices made from the input's size (kept), and two layers with weights of
             # their own (int8): one reading the kept sum, one the int8 layers' output.
             helper.make_node("Cast", ["shape"], ["matrix"], name="matrix", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["sum", "matrix"], ["up1"], name="up1"),
             helper.make_node("MatMul", ["matrix", "up1"], ["y"], name="up2"),
             helper.make_node("MatMul", ["sum", "m.w"], ["z1"], name="weighted1"),
             helper.make_node("MatMul", ["r", "m.w"], ["z2"], name="weighted2")]  # fmt: skip
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "y"))
    graph = helper.make_graph(
        nodes, "g", [x], [y], [*weights, numpy_helper.from_array(np.ones((2, 2), np.float32), "m.w")]
    )
    assert _float_nodes(graph, ["a.", "s.", "t."]) == ["a", "s", "t", "skip", "up1", "up2"]


def test_channels_last_eager_equals_the_plain_forward(demo):
    model, _, images = demo
    with torch.no_grad():
        expected = model.eval()(images[0])
    assert torch.allclose(make_runner(model, "eager")(images[0]), expected, atol=1e-4)


def test_runtime_errors_are_one_line(demo, demo_onnx, tmp_path):
    model, _, _ = demo
    with pytest.raises(
        FcnsegError,
        match="--runtime 'fp8': expected one of eager, winograd, bf16, onnx, onnx-int8, "
        "openvino, openvino-bf16, openvino-int8, compile, auto, auto-reduced",
    ):
        make_runner(model, "fp8")
    if (demo_onnx / "model.onnx").is_file():  # the fp32 export alone: int8 is made here, and refused uncalibrated
        shutil.copy(demo_onnx / "model.onnx", tmp_path)
    with pytest.raises(FcnsegError, match="onnx-int8 needs calibration images"):
        make_runner(model, "onnx-int8", calibration=[], workdir=tmp_path)
    assert PATHS == ("eager", "winograd", "bf16", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8",
                     "compile")  # fmt: skip


def test_predict_cli_runtime_and_tiling_on_a_4000_x_3000_image(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomise(fcnseg.get_model("fcn8s", num_classes=5, **TINY))
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    big = np.repeat(np.repeat(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), 10, 0), 10, 1)
    Image.fromarray(big).save(tmp_path / "big.png")  # 4000 x 3000, smooth enough to give a mixed mask
    args = ["predict", str(ckpt), str(tmp_path / "big.png"), "--out", str(tmp_path / "o"), "--tile", "512"]
    assert main([*args, "--overlap", "64", "--quiet"]) == 0
    mask = read_mask_png(tmp_path / "o" / "big.png")
    assert mask.shape == (3000, 4000) and mask.max() < 5 and len(np.unique(mask)) > 1
    # A tile that holds the whole image gives the untiled labels exactly (seams: tests/test_tiling.py).
    crop = big[:300, :416]
    assert np.array_equal(model.predict(crop, tile=512, overlap=64), model.predict(crop))
    # bf16 through the CLI reports its agreement with fp32 on the first image.
    Image.fromarray(big[:200, :300]).save(tmp_path / "small.png")
    args = ["predict", str(ckpt), str(tmp_path / "small.png"), "--out", str(tmp_path / "b"), "--runtime", "bf16"]
    assert main(args) == 0
    assert "runtime agrees with eager fp32 on" in capsys.readouterr().err
    assert main([*args[:-1], "warp9"]) == 2


def test_eval_cli_with_onnx_gives_the_eager_figures(quick_demo, tmp_path):
    out, _ = quick_demo
    ckpt = out / "fcn8s" / "best.pt"
    # 24 validation images, as many as the demo scores its models on.
    common = ["eval", str(ckpt), "--dataset", "synthetic", "--split", "val", "--data-option", "num_images=24",
              "--num-workers", "0", "--device", "cpu"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "e")]) == 0
    assert main([*common, "--runtime", "onnx", "--out", str(tmp_path / "o")]) == 0
    eager = json.loads((tmp_path / "e" / "metrics.json").read_text())
    onnx = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert onnx["mean_iu"] == pytest.approx(eager["mean_iu"], abs=1e-3) and eager["mean_iu"] > 0.3


def test_bench_cli_writes_json(tmp_path, capsys):
    ckpt = fcnseg.save_checkpoint(fcnseg.get_model("fcn32s", num_classes=3, width=1 / 16, fc_dim=8), tmp_path / "m.pt")
    args = ["bench", "--checkpoint", str(ckpt), "--size", "65x97", "--paths", "eager", "bf16", "--runs", "3"]
    assert main([*args, "--warmup", "1", "--json", str(tmp_path / "b.json"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["size"] == [65, 97] and [r["path"] for r in doc["results"]] == ["eager", "bf16"]
    for r in doc["results"]:
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["gflop_per_image"] > 0
        assert r["gflop_per_s"] == pytest.approx(r["gflop_per_image"] / (r["median_ms"] / 1000))
    assert doc["results"][0]["agreement_with_fp32"] is None
    assert 0.9 <= doc["results"][1]["agreement_with_fp32"] <= 1
    # A freshly built model's logits are constant: agreement is measured on jittered weights (tests/test_bench.py).
    assert doc["agreement_source"]["kind"] == "jittered"
    out = capsys.readouterr().out
    assert "median ms" in out and "agreement measured on: jittered weights (seed " in out
    assert main(["bench", "--size", "abc", "--quiet"]) == 2


def test_bench_all_times_every_path_against_eager(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomise(fcnseg.get_model("fcn8s", num_classes=4, **TINY), seed=2)
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "m.pt")
    args = ["bench", "--checkpoint", str(ckpt), "--size", "67x91", "--paths", "all", "eager", "--runs", "2"]
    # int8 on random weights may warn of its agreement, and bf16 of being emulated on a CPU without bf16
    # instructions; whether they do depends on the CPU, so neither is asked for (tests/test_auto_runtime.py tests
    # each warning at set agreements).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main([*args, "--warmup", "1", "--json", str(tmp_path / "b.json"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "b.json").read_text())
    rows = {r["path"]: r for r in doc["results"]}
    assert list(rows) == list(PATHS)  # "all" in the registry's order, eager named twice timed once
    assert doc["gemm_gflop_per_s"] > 0
    for r in rows.values():
        assert r["speedup_vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / r["median_ms"])
        assert r["peak_mem_mb"] >= 0
    assert rows["eager"]["speedup_vs_eager"] == 1.0 and rows["eager"]["agreement_with_fp32"] is None
    assert doc["agreement_source"]["kind"] == "checkpoint"  # random weights: fp32's argmax varies as it is
    for fp32_class in ("winograd", "onnx", "compile") + (("openvino",) if openvino_available() else ()):
        assert rows[fp32_class]["agreement_with_fp32"] >= 0.999, fp32_class
    table = capsys.readouterr().out
    assert "vs eager" in table and "of GEMM" in table and "fp32 GEMM here:" in table
    assert all(f"\n{p} " in table for p in PATHS)


def test_flop_count_matches_the_closed_form():
    from fcnseg.bench import count_gflop

    conv = torch.nn.Conv2d(3, 8, 5, padding=2)
    # 2 FLOP per multiply-add, 3 x 5 x 5 multiply-adds per output value, 8 x 40 x 30 outputs per image.
    assert count_gflop(conv, torch.randn(2, 3, 40, 30)) == pytest.approx(2 * 3 * 25 * 8 * 40 * 30 / 1e9)


def test_onnx_path_leaves_a_non_fp32_model_as_it_was():
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn32s", num_classes=3, width=1 / 16, fc_dim=8).double().eval()
    run = make_runner(model, "onnx")  # exports an fp32 CPU copy
    assert next(model.parameters()).dtype == torch.float64
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        assert torch.allclose(run(x), model(x.double()).float(), atol=1e-4)


def test_peak_memory_is_counted_from_the_block_s_own_start():
    # In a fresh process: in this one, memory freed by earlier tests stays resident and is reused, so a new array
    # need not raise the resident size at all.
    script = """
import numpy as np, time
from fcnseg.bench import PeakRSS
freed = np.ones(64 * 2**20, np.uint8)  # 64 MB resident before the block, released inside it
with PeakRSS(every=0.001) as mem:
    del freed
print(mem.growth)
with PeakRSS(every=0.001) as mem:
    held = np.ones(128 * 2**20, np.uint8)  # touched: 128 MB resident
    time.sleep(0.05)
    del held
print(mem.growth)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    released, grown = (int(line) for line in done.stdout.split())
    assert 0 <= released < 32 * 2**20  # the release is no negative growth, and nothing grew
    assert grown >= 120 * 2**20


def test_compiled_graphs_are_cached_apart_per_instruction_set(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fcnseg.runtime import use_inductor_cache_of_this_isa

    monkeypatch.setenv("FCNSEG_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes there at first use
    native = use_inductor_cache_of_this_isa()
    assert native is not None and native.parent == tmp_path / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(native)
    # Held to another instruction set (a process started from this one inherits its folder): another folder.
    with monkeypatch.context() as held_to:
        held_to.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
        held_to.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        held = use_inductor_cache_of_this_isa()
        assert held is not None and held.parent == native.parent and held != native
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(held)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(held))  # a native process started from a held one
    assert use_inductor_cache_of_this_isa() == native
    # A folder the user chose is left as it is.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_inductor_cache_of_this_isa() is None and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_paths_built_without_a_workdir_leave_no_files(tmp_path, monkeypatch):
    # Each build exports the model (hundreds of megabytes for a full FCN); once the session is made nothing reads
    # the export again, so with the engine cache off (as in this suite) a temporary folder of its own must be gone
    # when the runner is returned.
    import tempfile

    from fcnseg.runtime.choice import measure

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("FCNSEG_ENGINE_CACHE", "0")
    model = randomise(fcnseg.get_model("fcn8s", num_classes=3, **TINY), seed=1).eval()
    x = torch.randn(1, 3, 40, 56)
    runners = [make_runner(model, "onnx")]  # openvino's paths build through the same kind of folder
    monkeypatch.setenv("FCNSEG_AUTO_PATHS", "eager,onnx")
    _, chosen = measure(model, "auto", x)
    # torch keeps a cache folder of its own there (torchinductor_USER) the first time a process exports
    assert [p for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")] == []
    with torch.no_grad():
        expected = model(x)
    for run in [*runners, chosen]:  # the sessions still run with their files gone
        assert torch.allclose(run(x), expected, atol=1e-4 * float(expected.max() - expected.min()))
