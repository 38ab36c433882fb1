"""The OpenVINO paths against eager fp32 and an independent int8 evaluator, and the on-disk cache of compiled
models. fcnseg without OpenVINO: tests/test_choice.py."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

import fcnseg
from fcnseg.runtime import bf16_is_native, make_runner
from fcnseg.runtime.onnx import int8_stem
from fcnseg.runtime.openvino import openvino_available, openvino_cache_dir
from tests.helpers import TINY, export_folder, randomise

pytestmark = pytest.mark.skipif(not openvino_available(), reason='needs OpenVINO (pip install "fcnseg[openvino]")')

HEADS = {"one": ("fcn8s", {"num_classes": 4}), "two": ("fcn16s_twohead", {"num_classes": 4, "second_classes": 3})}
SIZE = (57, 75)  # odd, and not a multiple of the stride: the crops and the padding are exercised
FP32_TOLERANCE = 1e-4  # of eager's logit span: the bound the ONNX export itself is held to
BF16_TOLERANCE = 5e-2  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few percent of the span at the end
BF16_AT_LEAST = 1e-4  # ... and a path that claims bf16 must differ from fp32 by more than fp32 rounding does
INT8_TOLERANCE = 0.5  # of the span: the near-ties of a random tiny net move a lot under int8

_BUILT: dict = {}


def _model(heads: str, alignment: str):
    name, options = HEADS[heads]
    model = fcnseg.get_model(name, alignment=alignment, dropout=0.0, **TINY, **options)
    return randomise(model, seed=0, trainable_only=True).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, 3, 64, 96, generator=g) for _ in range(2)]
    return calibration, torch.randn(1, 3, *SIZE, generator=g)


@pytest.mark.parametrize("alignment", ["aligned", "caffe"])
@pytest.mark.parametrize("heads", ["one", "two"])
@pytest.mark.parametrize("path", ["openvino", "openvino-bf16", "openvino-int8"])
def test_each_openvino_path_equals_eager_within_its_class(path, heads, alignment, tmp_path_factory):
    if path == "openvino-bf16" and not bf16_is_native():
        pytest.skip("this CPU has no bf16 instructions: OpenVINO would emulate bf16")
    model = _model(heads, alignment)
    calibration, x = _inputs()
    # One export per model, shared with tests/test_inference.py, which builds the same four models.
    tmp_path = export_folder(model, tmp_path_factory.getbasetemp() / "exports")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int8 on random weights warns of its agreement, as it should
        run = make_runner(model, path, calibration=calibration, workdir=tmp_path)
    with torch.no_grad():
        expected = model(x)
    got = run(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (1, sum(model.heads.values()), *SIZE)
    span = float(expected.max() - expected.min())
    error = float((got - expected).abs().max()) / span
    if path == "openvino":  # f32 forced: on a bf16 CPU, OpenVINO's latency default alone would run bf16
        assert error <= FP32_TOLERANCE
    elif path == "openvino-bf16":
        assert BF16_AT_LEAST < error <= BF16_TOLERANCE
    else:  # a random tiny net's int8 error is large (its agreement on a trained model: tests/test_runtime.py)
        assert FP32_TOLERANCE < error <= INT8_TOLERANCE
        xml = tmp_path / f"{int8_stem(model, (), calibration)}.xml"
        _assert_int8_except_the_float_layers(model, tmp_path, xml)
        _assert_activations_rounded_only_for_int8_convolutions(model, tmp_path, xml)


def _assert_int8_except_the_float_layers(model, folder, xml) -> None:
    """In the quantised OpenVINO model, a convolution's weights come straight from a float constant exactly where
    the layer is one of the model's float layers, and through int8 dequantisation (a Multiply) everywhere else.
    Each OpenVINO convolution is traced back to the ONNX node it was named after, and that node to its weight."""
    import onnx
    import openvino as ov

    weight_of = {n.name: n.input[1] for n in onnx.load(str(folder / "model.onnx")).graph.node if len(n.input) > 1}
    floats = tuple(model.float_layers())
    seen = {True: 0, False: 0}
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() not in ("Convolution", "ConvolutionBackpropData"):
            continue
        weight = weight_of[op.get_friendly_name().split("/")[0]]
        source = op.input(1).get_source_output().get_node().get_type_name()
        kept = weight.startswith(floats)
        assert (source == "Constant") == kept, (weight, source)
        seen[kept] += 1
    assert seen[True] >= 2 and seen[False] >= 5, seen


def _assert_activations_rounded_only_for_int8_convolutions(model, folder, xml) -> None:
    """Every FakeQuantize on a computed tensor (not on weights) feeds int8 convolutions only, directly or through a
    max-pooling (which commutes with the rounding): the class scores of the float layers and their skip sums (FCN's
    Add) or the heads' concatenation are never rounded to 256 levels, where the argmax is decided."""
    import onnx
    import openvino as ov

    weight_of = {n.name: n.input[1] for n in onnx.load(str(folder / "model.onnx")).graph.node if len(n.input) > 1}
    floats = tuple(model.float_layers())

    def readers(op) -> list:
        return [i.get_node() for i in op.output(0).get_target_inputs()]

    def int8_convolution(op) -> bool:
        if op.get_type_name() == "MaxPool":
            return all(int8_convolution(r) for r in readers(op))
        weight = weight_of.get(op.get_friendly_name().split("/")[0], "")
        return op.get_type_name() == "Convolution" and not weight.startswith(floats)

    ops = ov.Core().read_model(str(xml)).get_ops()  # held: a node knows its readers weakly
    computed = [o for o in ops if o.get_type_name() == "FakeQuantize" and not _is_constant(o.input_value(0))]
    assert len(computed) >= 3
    for op in computed:
        names = [r.get_friendly_name() for r in readers(op)]
        assert names and all(int8_convolution(r) for r in readers(op)), (op.get_friendly_name(), names)


def _is_constant(value) -> bool:
    return value.get_node().get_type_name() == "Constant"


@pytest.mark.parametrize("path", ["openvino", "openvino-int8"])
def test_a_batch_is_split_across_the_throughput_streams_image_for_image(path, tmp_path_factory, monkeypatch):
    """With two threads, a batch runs across OpenVINO's throughput streams, a run of images on each: an odd batch
    leaves no image out and keeps their order, each image's output that of the image run alone (on the latency
    form, every thread on one image) to fp32 rounding. A batch that fails leaves the streams' requests usable."""
    from fcnseg.runtime import openvino

    split = []
    across = openvino._across_streams
    monkeypatch.setattr(openvino, "_across_streams", lambda r, d: split.append((len(r), len(d))) or across(r, d))
    model = _model("one", "aligned")
    calibration, _ = _inputs()
    batch = torch.randn(5, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite's workers run on one thread each
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # int8 on random weights warns of its agreement, as it should
            run = make_runner(model, path, calibration=calibration,
                              workdir=export_folder(model, tmp_path_factory.getbasetemp() / "exports"))  # fmt: skip
        got, alone = run(batch), torch.cat([run(x[None]) for x in batch])
        with pytest.raises(RuntimeError):  # two channels: each stream's request fails ...
            run(batch[:, :2])
        again = run(batch)  # ... and is free again, not left "busy" for every later call
    finally:
        torch.set_num_threads(threads)
    assert split == [(2, 5), (2, 5), (2, 5)]  # two streams; the images run alone took the latency form
    assert torch.equal(again, got)
    assert got.shape == alone.shape == (5, 4, *SIZE)
    assert float((got - alone).abs().max()) <= FP32_TOLERANCE * float(alone.max() - alone.min())
    assert float((alone[0] - alone[1]).abs().max()) > 0.1 * float(alone.max() - alone.min())  # order would show


def test_a_second_process_loads_the_compiled_model_from_the_cache(tmp_path, monkeypatch):
    """OpenVINO's CACHE_DIR under fcnseg's cache. Each build exports into a new temporary folder, as every process
    does: the first compile writes a blob; a second process building the same model writes none and gives the
    same output; other weights get a blob of their own (the cache is keyed by the graph and weights, not by the
    file's path)."""
    import os
    import subprocess

    monkeypatch.setenv("FCNSEG_CACHE_DIR", str(tmp_path / "cache"))
    model = _model("one", "aligned")
    torch.save(model, tmp_path / "model.pt")
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    first = make_runner(model, "openvino")(x)
    blobs = sorted(openvino_cache_dir().glob("*.blob"))  # one per compiled form (with threads to split: two)
    assert len(blobs) in (1, 2) and openvino_cache_dir() == tmp_path / "cache" / "openvino"
    code = (
        "import sys, torch; from fcnseg.runtime import make_runner; "
        "model = torch.load(sys.argv[1], weights_only=False); "
        f"x = torch.randn(1, 3, {SIZE[0]}, {SIZE[1]}, generator=torch.Generator().manual_seed(0)); "
        "torch.save(make_runner(model, 'openvino')(x), sys.argv[2])"
    )
    env = {**os.environ, "FCNSEG_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.pt"), str(tmp_path / "o.pt")],
                   check=True, env=env, timeout=300)  # fmt: skip
    assert sorted(openvino_cache_dir().glob("*.blob")) == blobs  # loaded, not compiled and written again
    assert torch.equal(torch.load(tmp_path / "o.pt"), first)
    other = randomise(_model("one", "aligned"), seed=5, trainable_only=True).eval()
    with torch.no_grad():
        expected = other(x)
    got = make_runner(other, "openvino")(x)  # same graph, other weights: not the first model's blob
    assert float((got - expected).abs().max()) <= FP32_TOLERANCE * float(expected.max() - expected.min())
    assert len(list(openvino_cache_dir().glob("*.blob"))) == 2 * len(blobs)


def test_the_cache_keeps_the_newest_blobs_within_its_budget(tmp_path):
    """Blobs by last use (the later of written and read), newest first, until the budget: the rest go."""
    import os

    from fcnseg.runtime.openvino import prune_cache

    sizes = {"a": 400, "b": 300, "c": 200, "d": 100}  # a is the newest, d the oldest
    for age, (name, size) in enumerate(sizes.items()):
        blob = tmp_path / f"{name}.blob"
        blob.write_bytes(b"x" * size)
        os.utime(blob, (1_000_000 - 10 * age, 1_000_000 - 10 * age))
    (tmp_path / "d.blob").touch()  # d read just now (a cache hit): the newest
    os.utime(tmp_path / "b.blob", (2_000_000, 900_000))  # b read later still, written earlier: newest of all
    # By last use: d (100 bytes), b (300), a (400), c (200).
    assert [p.name for p in prune_cache(tmp_path, budget=800)] == ["c.blob"]  # 100 + 300 + 400 fit, + 200 not
    assert [p.name for p in prune_cache(tmp_path, budget=50)] == ["b.blob", "a.blob"]  # the newest stays, whatever
    assert [p.name for p in tmp_path.glob("*.blob")] == ["d.blob"]


def test_a_bf16_request_on_a_cpu_without_bf16_warns(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FCNSEG_CPU_FEATURES", "avx2 fma")
    model = _model("one", "aligned")
    with pytest.warns(UserWarning, match="this CPU has no bf16 instructions: OpenVINO emulates bf16"):
        make_runner(model, "openvino-bf16", workdir=export_folder(model, tmp_path_factory.getbasetemp() / "exports"))


def test_compiling_prunes_the_cache_to_its_budget(tmp_path, monkeypatch):
    """A compile that leaves the folder over its budget deletes the least recently used blobs: here a sparse file
    of the whole budget (no disk taken), older than the blob just written."""
    import os

    from fcnseg.runtime.openvino import CACHE_BUDGET

    monkeypatch.setenv("FCNSEG_CACHE_DIR", str(tmp_path / "cache"))
    old = openvino_cache_dir() / "old.blob"
    old.parent.mkdir(parents=True)
    with open(old, "wb") as f:
        f.truncate(CACHE_BUDGET)
    os.utime(old, (1_000_000, 1_000_000))
    _, x = _inputs()
    make_runner(_model("one", "aligned"), "openvino")(x)
    assert not old.exists() and len(list(openvino_cache_dir().glob("*.blob"))) in (1, 2)  # what was compiled


def test_a_cache_folder_that_cannot_be_written_is_left_out(tmp_path, monkeypatch):
    """OpenVINO fails a compilation whose cache folder it cannot write: fcnseg leaves it out instead (a folder
    that cannot be made, or one without write permission)."""
    from fcnseg.runtime import openvino

    monkeypatch.setenv("FCNSEG_CACHE_DIR", str(tmp_path / "cache"))
    assert openvino.compile_config("f32")["CACHE_DIR"] == str(tmp_path / "cache" / "openvino")
    monkeypatch.setattr(openvino.os, "access", lambda *a, **k: False)  # read-only, as for a user other than root
    assert "CACHE_DIR" not in openvino.compile_config("f32")
    monkeypatch.undo()
    monkeypatch.setenv("FCNSEG_CACHE_DIR", "/dev/null/fcnseg")
    assert "CACHE_DIR" not in openvino.compile_config("f32")


def test_int8_keeps_the_matrix_upsampling_of_float_scores_in_float(tmp_path):
    # A hand-built graph read by OpenVINO: a float layer's output multiplied by a matrix made from the input's size
    # (the exported last upsampling: kept in float) and by a weight of its own (a layer NNCF may quantise).
    from onnx import TensorProto, helper, numpy_helper, save

    from fcnseg.runtime.openvino import _float_merges

    weights = [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "a.w"),
               numpy_helper.from_array(np.ones((4, 4), np.float32), "m.w")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "a.w"], ["a"], name="a"),
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Cast", ["shape"], ["matrix"], name="matrix", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["a", "matrix"], ["up"], name="up"),
             helper.make_node("MatMul", ["a", "m.w"], ["weighted"], name="weighted"),
             helper.make_node("Relu", ["up"], ["y"], name="y"),
             helper.make_node("Relu", ["weighted"], ["z"], name="z")]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, "h", 4])  # dynamic: the shape is computed
    y, z = (helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z"))
    save(helper.make_model(helper.make_graph(nodes, "g", [x], [y, z], weights)), str(tmp_path / "g.onnx"))
    import openvino as ov

    assert _float_merges(ov.Core().read_model(str(tmp_path / "g.onnx")), {"a"}) == ["up"]
