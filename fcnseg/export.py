"""Export to ONNX, TorchScript and a Triton model repository, checked against eager PyTorch before the file is kept.

Both formats take any input height and width: the ONNX graph has dynamic ``height`` / ``width`` axes (torch.export
traces the padding to a multiple of 32, the crops and the upsampling symbolically) and the TorchScript trace
records the size arithmetic. Each exported file is run at two input sizes that differ from each other and from
the sizes used to trace; only if it matches eager PyTorch there is it renamed into place. The file carries the
checkpoint's description (model, classes, palette, preprocessing, alignment) as JSON metadata, so a deployment
knows how to normalise its input without fcnseg. A Triton model repository (:mod:`fcnseg.triton`) holds the same
ONNX graph, or its int8 quantisation, with the configuration Triton's ONNX Runtime backend reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import describe
from .errors import FcnsegError
from .io import staged_path
from .runtime.compare import eval_mode
from .runtime.onnx import CHECK_SIZES, ONNX_OPSET, TOLERANCE, TRACE_SIZE, inputs_of_sizes, span_diffs, write_onnx

_inputs = inputs_of_sizes


@dataclass
class ExportReport:
    path: Path
    format: str
    opset: int | None
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    """'HxW' -> max |exported - eager| / (logit range) at that size."""
    version: int | None = None
    """Triton: the version folder written (1 for a new model folder)."""
    int8_agreement: float | None = None
    """Triton with int8: the share of the calibration images' pixels whose label equals eager fp32's."""


def _compare(name: str, run, model: nn.Module, sizes: Sequence[tuple[int, int]], tolerance: float) -> dict[str, float]:
    """Max |exported - eager| / logit range at each size, eager as every consumer runs it (the inference object's
    eager path); an FcnsegError when over ``tolerance`` (the file is then not kept)."""
    from .inference import Predictor

    reference = Predictor(model, runtime="eager")
    return span_diffs(name, run, reference.runner(), _inputs(sizes, model.in_channels), tolerance)


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """:func:`~fcnseg.io.staged_path` of ``path``, its folder made first; failing to make either names ``--out``."""
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = stack.enter_context(staged_path(path))
        except OSError as e:
            raise FcnsegError(f"--out {path}: cannot write ({e.strerror or e})") from None
        yield tmp


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = ONNX_OPSET,
    check_sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Export ``model`` (N x 3 x H x W -> N x C x H x W) to ONNX with dynamic batch, height and width.

    The graph is checked with ONNX Runtime against eager PyTorch at ``check_sizes`` before ``path`` is written.
    Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).
    """
    try:
        import onnx  # noqa: F401  (the graph is written with it: the extra is checked here, once)
        import onnxruntime as ort
    except ImportError:
        raise FcnsegError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'fcnseg[onnx]'") from None
    path = Path(path)
    with eval_mode(model), _staging(path) as tmp:
        write_onnx(model, tmp, opset)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        diffs = _compare(str(path), lambda x: session.run(None, {name: x.numpy()})[0], model, check_sizes, tolerance)
    return ExportReport(path, "onnx", opset, diffs)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    check_sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Export ``model`` as a traced TorchScript module (any input size), checked against eager at two sizes.

    The description JSON is stored as the extra file ``fcnseg.json`` (``torch.jit.load(p, _extra_files=...)``).
    """
    path = Path(path)
    with eval_mode(model), _staging(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            traced = torch.jit.trace(model, _inputs([TRACE_SIZE], model.in_channels)[0], check_trace=False)
            torch.jit.save(traced, str(tmp), _extra_files={"fcnseg.json": json.dumps(describe(model))})
            loaded = torch.jit.load(str(tmp))
        diffs = _compare(str(path), lambda x: loaded(x).detach(), model, check_sizes, tolerance)
    return ExportReport(path, "torchscript", None, diffs)


def export_triton(
    model: nn.Module,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    int8: bool = False,
    calibration: Sequence[Any] = (),
    max_batch_size: int = 8,
    opset: int = ONNX_OPSET,
) -> ExportReport:
    """``repo/<name>/``: a Triton Inference Server model folder (:mod:`fcnseg.triton`) around the ONNX graph of
    :func:`export_onnx` (checked against eager), or with ``int8`` its static int8 quantisation as the ``onnx-int8``
    path makes it (:func:`fcnseg.runtime.onnx.quantize_onnx`), calibrated on ``calibration`` (images, or normalised
    1 x C x H x W tensors) and its agreement with eager on them measured. ``name`` defaults to the architecture's.
    The report's path is the model folder."""
    from .triton import default_name, write_repository

    name = name or default_name(None, model)
    inputs = _calibration_inputs(model, calibration) if int8 else []
    if int8 and not inputs:
        raise FcnsegError("--int8 needs calibration images: --calibration DIR, a few images like those served")
    report = ExportReport(Path(repo) / name, "triton", opset)

    def write_graph(path: Path) -> dict[str, str]:
        if not int8:
            report.max_rel_diff = export_onnx(model, path, opset=opset).max_rel_diff
            return {"precision": "fp32"}
        report.max_rel_diff, report.int8_agreement, bits = _int8_graph(model, path, inputs, opset)
        return {"precision": "int8", "int8_weights": bits,
                "int8_agreement": f"{report.int8_agreement:.4f} of eager fp32's labels on {len(inputs)} "
                                  "calibration images"}  # fmt: skip

    folder, report.version = write_repository(model, repo, name, write_graph, max_batch_size=max_batch_size,
                                              cpu_only=int8)  # fmt: skip
    report.path = folder
    return report


def _calibration_inputs(model: nn.Module, images: Sequence[Any]) -> list[torch.Tensor]:
    """Normalised 1 x C x H x W inputs: tensors as given, images through the model's preprocessing."""
    from .inference import model_input

    return [x if x.dim() == 4 else x.unsqueeze(0) for x in
            (i if isinstance(i, torch.Tensor) else model_input(model, i) for i in images)]  # fmt: skip


def _int8_graph(
    model: nn.Module, path: Path, calibration: Sequence[torch.Tensor], opset: int
) -> tuple[dict[str, float], float, str]:
    """``path``: the fp32 export (checked against eager) quantised as the ``onnx-int8`` path quantises it (the
    model's float layers kept in float, 7-bit weights on a CPU without VNNI); its agreement with eager on the
    calibration inputs (:func:`~fcnseg.runtime.onnx.check_int8`, a warning below 99%) and the weights' width."""
    from .inference import Predictor
    from .runtime.onnx import check_int8, int8_file, int8_reduce_range, ort_session

    reduce = int8_reduce_range()
    with tempfile.TemporaryDirectory(prefix=".fp32.", dir=path.parent) as tmp:
        # The checked export as model.onnx, which int8_file quantises as the onnx-int8 path does.
        fp32 = export_onnx(model, Path(tmp) / "model.onnx", opset=opset)
        os.replace(int8_file(model, Path(tmp), calibration), path)
    eager = Predictor(model, runtime="eager").runner()
    share = check_int8(ort_session(path), eager, calibration, model, name="--int8")
    bits = "7-bit (made on a CPU without VNNI)" if reduce else "8-bit (made on a CPU with VNNI)"
    return fp32.max_rel_diff, share, bits


def export(model: nn.Module, path: str | os.PathLike, format: str, **kwargs: Any) -> ExportReport:
    """``model`` exported as ``format`` (onnx, torchscript or triton) at ``path`` (triton: the repository folder)."""
    if format == "triton":
        return export_triton(model, path, **kwargs)
    if format == "onnx":
        return export_onnx(model, path, **kwargs)
    if format == "torchscript":
        kwargs.pop("opset", None)
        return export_torchscript(model, path, **kwargs)
    raise FcnsegError(f"--format {format!r}: expected onnx or torchscript (a file) or triton (a model repository)")
