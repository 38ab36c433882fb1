"""The ONNX Runtime paths: sessions over exported models, static int8 quantisation calibrated on the user's images,
and int8's check against fp32."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import FcnsegError
from ..io import atomic_write, staged_path
from .compare import Runner, agreement, built_on_first_call, eval_mode
from .cpu import VNNI, cpu_features
from .engines import build_folder, calibration_tag, reused

INT8_WARN_BELOW = 0.99  # int8 agreement with fp32 on the calibration images that draws a warning
INT8_RECIPE = "first conv float, 7-bit pairs rescaled"
"""How int8 is made here (the layers left in float, the rescaling): part of the key of ``auto``'s cached choices
(:func:`~fcnseg.runtime.choice.engine_versions`), so that a choice judged on int8 made another way is measured
again."""


def ort_session(path: str | os.PathLike) -> Runner:
    """A runner over the ONNX model at ``path``: ONNX Runtime on the CPU, with PyTorch's thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as PyTorch
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)

    return run


class _Calibration:
    """ONNX Runtime's calibration reader protocol over normalised 1 x C x H x W inputs."""

    def __init__(self, name: str, inputs: Sequence[torch.Tensor]) -> None:
        self._items = iter([{name: x.float().cpu().numpy()} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def float_layers(model: nn.Module) -> list[str]:
    """Parameter prefixes int8 quantisation leaves in float: the model's own list
    (:meth:`~fcnseg.models.base.SegmentationModel.float_layers`: the first convolution and the class-score layers and
    upsamplers, where the argmax is decided)."""
    return model.float_layers()


def quantize_onnx(
    fp32: str | os.PathLike,
    out: str | os.PathLike,
    calibration: Sequence[torch.Tensor],
    keep_float: Sequence[str] = (),
    *,
    reduce_range: bool = False,
) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations, min-max ranges) calibrated on
    ``calibration`` (normalised 1 x C x H x W inputs, a few images of the user's own data). Nodes whose weight
    name starts with one of ``keep_float`` stay in float, and so do the sums of their outputs
    (:func:`_float_nodes`). ``reduce_range``: 7-bit weights (-64..64), for CPUs without VNNI, whose u8 x s8 pair
    sums (vpmaddubsw) saturate 16 bits with full-range weights."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise FcnsegError("onnx-int8 needs calibration images (--calibration DIR or the images being predicted)")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        exclude = _float_nodes(onnx.load(str(prepared)).graph, keep_float)
        quantize_static(
            str(prepared),
            str(out),
            _Calibration("image", calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
            reduce_range=reduce_range,
        )
    return Path(out)


def _float_nodes(graph, keep_float: Sequence[str]) -> list[str]:
    """The nodes of ``graph`` int8 quantisation leaves in float: those whose weight name starts with one of
    ``keep_float``, those that only join their outputs (FCN's skip sums of class scores, the concatenated heads)
    and the matrix products that upsample them.
    ONNX Runtime's ``quantize_static`` excludes nodes, not tensors (``nodes_to_exclude`` in its quantisation
    documentation), and in QDQ format it rounds both inputs of an Add or a Concat to 8 bits (one scale per tensor);
    with only the score layers excluded, the sums of their outputs were still rounded exactly where the argmax is
    decided. On the trained demo model that rounding cost 0.2% of fp32's labels (99.33% agreement instead of
    99.53%), and leaving the sums in float cost no measurable speed. A sum fed by int8 layers (a residual block's)
    stays int8."""
    # Computed activations: what the image flows into, not weights (older files list them as inputs too), not
    # shape arithmetic.
    data = {t.name for t in graph.input} - {t.name for t in graph.initializer}
    producer = {}
    for n in graph.node:  # the ONNX IR specification lists a graph's nodes in topological order
        producer.update(dict.fromkeys(n.output, n))
        if n.op_type not in ("Shape", "Size") and any(i in data for i in n.input):
            data.update(n.output)

    def data_inputs(node) -> list[str]:
        return [i for i in node.input if i in data]

    kept = {n.name for n in graph.node if len(n.input) > 1 and n.input[1].startswith(tuple(keep_float))}

    def from_kept(tensor: str) -> bool:  # traced back through one-input operations (crops, reshapes) to a kept node
        node = producer.get(tensor)
        while node is not None and node.name not in kept:
            inputs = data_inputs(node)
            if len(inputs) != 1 or node.op_type in _WEIGHTED:  # the output of an int8 layer
                return False
            node = producer.get(inputs[0])
        return node is not None

    weights = {t.name for t in graph.initializer}
    for n in graph.node:
        inputs = data_inputs(n)
        joins = len(inputs) > 1
        # A matrix product with an operand made from the input's size, not a weight: the last upsampling as
        # exported (:func:`~fcnseg.models.upsampling.matrix_upsampling`), part of the float layer it replaces.
        interpolates = n.op_type == "MatMul" and len(inputs) == 1 and not weights.intersection(n.input)
        if n.name not in kept and (joins or interpolates) and all(map(from_kept, inputs)):
            kept.add(n.name)  # a sum of kept sums is kept too
    return [n.name for n in graph.node if n.name in kept]


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # layers int8 computes with their own quantised weights


def int8_reduce_range() -> bool:
    """Whether int8 takes 7-bit weights here: on a CPU without VNNI (see :func:`quantize_onnx`)."""
    return not cpu_features() & VNNI


ONNX_OPSET = 18
"""The ONNX opset fcnseg exports (torch.onnx's dynamo exporter, ONNX Runtime >= 1.14 runs it)."""
CHECK_SIZES: tuple[tuple[int, int], ...] = ((97, 131), (160, 224))
TRACE_SIZE = (64, 96)
TOLERANCE = 1e-4
"""Largest accepted |exported - eager| as a fraction of the eager logits' range."""


def inputs_of_sizes(sizes: Sequence[tuple[int, int]], channels: int = 3) -> list[torch.Tensor]:
    """Seeded random 1 x ``channels`` x H x W inputs, one per size: what exported graphs are checked on."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, channels, h, w, generator=g) for h, w in sizes]


def span_diffs(name: str, run, reference: Runner, inputs: Sequence[torch.Tensor], tolerance: float) -> dict[str, float]:
    """``{'HxW': max |run - reference| / reference's logit range}`` over ``inputs``; an FcnsegError naming ``name``
    when a shape differs or a difference is over ``tolerance`` (the file is then not kept)."""
    diffs = {}
    for x in inputs:
        expected = reference(x).float()
        got = torch.as_tensor(np.asarray(run(x)), dtype=torch.float32)
        size = f"{x.shape[2]}x{x.shape[3]}"
        if got.shape != expected.shape:
            raise FcnsegError(f"{name}: output {tuple(got.shape)} at {size}, eager gives {tuple(expected.shape)}")
        span = max((expected.max() - expected.min()).item(), 1e-6)
        diffs[size] = (got - expected).abs().max().item() / span
        if not diffs[size] <= tolerance:
            raise FcnsegError(
                f"{name}: exported model differs from eager at {size} by {diffs[size]:.2e} of the logit range "
                f"(tolerance {tolerance:.0e}); the file was not kept"
            )
    return diffs


def write_onnx(model: nn.Module, path: str | os.PathLike, opset: int = ONNX_OPSET) -> None:
    """``model`` (in eval mode, on the CPU) as an ONNX graph at ``path``: dynamic batch, height and width, and the
    model's description (:func:`~fcnseg.checkpoint.describe`) as the metadata entry ``fcnseg``."""
    import onnx

    from ..checkpoint import describe

    _torch_export(model, opset).save(str(path))
    proto = onnx.load(str(path))
    meta = proto.metadata_props.add()
    meta.key, meta.value = "fcnseg", json.dumps(describe(model))
    onnx.save(proto, str(path))


def _torch_export(model: nn.Module, opset: int):
    # Traced with a batch of 2: torch.export specialises sizes of 0 and 1 to constants.
    x = inputs_of_sizes([TRACE_SIZE], model.in_channels)[0].expand(2, -1, -1, -1).contiguous()
    dims = {
        0: torch.export.Dim("batch", min=1, max=4096),
        2: torch.export.Dim("height", min=1, max=16384),
        3: torch.export.Dim("width", min=1, max=16384),
    }
    # The exporter reports its progress through print and logging; fcnseg reports the result itself.
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(open(os.devnull, "w")),  # noqa: SIM115
            model.export_form(),  # the fixed last upsampling as two matrix products
        ):
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes={"x": dims},
            )
    except FcnsegError:
        raise
    except Exception as e:
        raise FcnsegError(f"ONNX export failed: {str(e).splitlines()[0][:300]}") from None
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)


def exported_fp32(model: nn.Module, folder: Path) -> Path:
    """``folder/model.onnx``, exported and checked against the model's forward unless it is there already."""
    fp32 = folder / "model.onnx"
    if reused(fp32):
        return fp32
    # ONNX Runtime runs on the CPU in fp32: export a CPU fp32 copy when the model lives elsewhere.
    p = next(model.parameters())
    cpu = model if p.device.type == "cpu" and p.dtype == torch.float32 else copy.deepcopy(model).float().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    with eval_mode(cpu), staged_path(fp32) as tmp:
        write_onnx(cpu, tmp)

        def eager(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return cpu(x)

        span_diffs(str(fp32), ort_session(tmp), eager, inputs_of_sizes(CHECK_SIZES, cpu.in_channels), TOLERANCE)
    return fp32


def int8_source(model: nn.Module, folder: Path, calibration: Sequence[torch.Tensor]) -> Path:
    """The float graph the int8 paths quantise. On a CPU without VNNI (7-bit weights in the first quantised layer
    or all of them, :func:`int8_reduce_range`): ``folder/model.rescaled.cal-*.onnx``, the fp32 export with the output
    channels of each of the model's :meth:`~fcnseg.models.base.SegmentationModel.rescaled_pairs` given one range
    on ``calibration`` (:mod:`fcnseg.runtime.rescale`), made unless it is there. Elsewhere, or where the model has
    no such pair or no calibration images are given, the fp32 export itself: with 8-bit weights, rescaling kept
    no more of fp32's labels on the trained demo model (99.70% against 99.78%, ONNX Runtime and OpenVINO, 4 and 8
    calibration images), while with 7-bit ones it kept more (99.56% against 99.41%)."""
    from .rescale import channel_maxima, rescale_factors, rescaled_onnx

    fp32 = exported_fp32(model, folder)
    pairs = model.rescaled_pairs()
    if not pairs or not calibration or not int8_reduce_range():  # the quantiser refuses to calibrate on nothing
        return fp32
    out = folder / f"model.rescaled.{calibration_tag(calibration)}.onnx"
    if reused(out):
        return out
    with eval_mode(model):
        maxima = channel_maxima(model, calibration, [a for a, _ in pairs])
    factors = {(a, b): rescale_factors(maxima[a]).numpy() for a, b in pairs}
    with staged_path(out) as tmp:
        rescaled_onnx(fp32, tmp, factors)
    return out


def extra_float_layers(model: nn.Module, keep_float: Sequence[str]) -> list[str]:
    """The parameter prefixes of ``keep_float`` beyond the model's :func:`float_layers`, each ending in a dot
    ("features.1" is not "features.12")."""
    return sorted({p if p.endswith(".") else p + "." for p in keep_float} - set(float_layers(model)))


def int8_stem(model: nn.Module, keep_float: Sequence[str], calibration: Sequence[torch.Tensor]) -> str:
    """The name, without suffix, of the int8 file of this calibration and these layers kept in float: one file per
    calibration set and per set kept in float."""
    extra = extra_float_layers(model, keep_float)
    floats = "" if not extra else f".float-{hashlib.sha256(','.join(extra).encode()).hexdigest()[:10]}"
    return f"model.int8{floats}.{calibration_tag(calibration)}"


def int8_file(
    model: nn.Module, folder: Path, calibration: Sequence[torch.Tensor], keep_float: Sequence[str] = ()
) -> Path:
    """``folder/model.int8[...].onnx`` (:func:`int8_stem`): the model's float graph (:func:`int8_source`)
    statically quantised on ``calibration``, the model's :func:`float_layers` and ``keep_float`` left in float;
    made unless it is there already (the int8 paths of ONNX Runtime and OpenVINO measured side by side share it)."""
    extra = extra_float_layers(model, keep_float)
    int8 = folder / f"{int8_stem(model, keep_float, calibration)}.onnx"
    if not reused(int8):
        source = int8_source(model, folder, calibration)
        with staged_path(int8) as tmp:
            quantize_onnx(source, tmp, calibration, keep_float=[*float_layers(model), *extra],
                          reduce_range=int8_reduce_range())  # fmt: skip
    return int8


def onnx_runner(
    model: nn.Module,
    path: str,
    calibration: Sequence[torch.Tensor] | None,
    workdir: str | os.PathLike | None,
    keep_float: Sequence[str] = (),
) -> Runner:
    """The ``onnx`` or ``onnx-int8`` runner of ``model``, exported into ``workdir`` (by default the model's folder
    in the engine cache, :func:`~fcnseg.runtime.engines.build_folder`); int8 calibrated on ``calibration`` and
    checked against fp32 on it (:func:`check_int8`)."""
    with build_folder(model, workdir, "fcnseg-onnx-") as folder:  # ONNX Runtime holds the graph once it is made
        fp32 = exported_fp32(model, folder)
        if path == "onnx":
            return ort_session(fp32)
        calibration = list(calibration or [])
        int8 = int8_file(model, folder, calibration, keep_float)
        run = ort_session(int8)
        check_int8(run, built_on_first_call(lambda: ort_session(fp32)), calibration, model, saved=agreement_file(int8))
        return run


def agreement_file(int8: Path, runs_as: str = "") -> Path:
    """Where int8's measured agreement with fp32 is kept beside ``int8``, for later builds of the same file run the
    same way (``runs_as``: the precision of its float layers, where that varies)."""
    return int8.with_name(f"{int8.name}{'.' + runs_as if runs_as else ''}.agreement.json")


def _saved_share(saved: Path | None) -> float | None:
    if saved is None:
        return None
    try:
        share = float(json.loads(saved.read_text())["agreement"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return share if 0 <= share <= 1 else None


def check_int8(
    run: Runner,
    fp32: Runner,
    calibration: Sequence[torch.Tensor],
    model: nn.Module | None,
    name: str = "onnx-int8",
    *,
    saved: Path | None = None,
) -> float:
    """int8's agreement with fp32 on the calibration images; a warning naming the path ``name`` when it is below
    :data:`INT8_WARN_BELOW`, where int8 visibly changes the masks. With ``saved`` (a file beside the int8 model, made
    from the same calibration images), the share it holds, else the share measured and written there."""
    share = _saved_share(saved)
    if share is None:
        share = agreement(run, fp32, calibration, model)
        if saved is not None:
            with contextlib.suppress(OSError), atomic_write(saved, "w") as f:  # unwritable: measured again next time
                json.dump({"agreement": share}, f)
    if share < INT8_WARN_BELOW:
        warnings.warn(
            f"{name} agrees with fp32 on only {100 * share:.2f}% of the calibration images' pixels (below "
            f"{100 * INT8_WARN_BELOW:.0f}%): its masks will differ visibly; use an fp32 path (winograd, onnx) or "
            "calibrate on more images like yours",
            stacklevel=3,
        )
    return share
