"""Export to ONNX and TorchScript, checked against eager PyTorch before the file is kept.

Both formats take any input height and width: the ONNX graph has dynamic ``height`` / ``width`` axes (torch.export
traces the padding to a multiple of 32, the crops and the upsampling symbolically) and the TorchScript trace
records the size arithmetic. Each exported file is run at two input sizes that differ from each other and from
the sizes used to trace; only if it matches eager PyTorch there is it renamed into place. The file carries the
checkpoint's description (model, classes, palette, preprocessing, alignment) as JSON metadata, so a deployment
knows how to normalise its input without fcnseg.
"""

from __future__ import annotations

import contextlib
import json
import os
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


def export(model: nn.Module, path: str | os.PathLike, format: str, **kwargs: Any) -> ExportReport:
    if format == "onnx":
        return export_onnx(model, path, **kwargs)
    if format == "torchscript":
        kwargs.pop("opset", None)
        return export_torchscript(model, path, **kwargs)
    raise FcnsegError(f"--format {format!r}: expected onnx or torchscript")
