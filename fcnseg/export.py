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
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import checkpoint_dict
from .errors import FcnsegError

ONNX_OPSET = 18
"""The ONNX opset fcnseg exports (torch.onnx's dynamo exporter, ONNX Runtime >= 1.14 runs it)."""
CHECK_SIZES: tuple[tuple[int, int], ...] = ((97, 131), (160, 224))
TRACE_SIZE = (64, 96)
TOLERANCE = 1e-4
"""Largest accepted |exported - eager| as a fraction of the eager logits' range."""


@dataclass
class ExportReport:
    path: Path
    format: str
    opset: int | None
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    """'HxW' -> max |exported - eager| / (logit range) at that size."""


def describe(model: nn.Module) -> dict[str, Any]:
    """What a deployment needs besides the graph: the JSON stored in exported files."""
    ckpt = checkpoint_dict(model) if getattr(model, "build_config", None) else {}
    keys = (
        "model",
        "config",
        "alignment",
        "num_classes",
        "classes",
        "head_classes",
        "palette",
        "preprocessing",
        "fcnseg_version",
    )
    return {k: ckpt[k] for k in keys if k in ckpt}


@contextlib.contextmanager
def _eval_cpu(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _inputs(sizes: Sequence[tuple[int, int]], channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, channels, h, w, generator=g) for h, w in sizes]


def _channels(model: nn.Module) -> int:
    return getattr(model, "in_channels", 3)


def _compare(name: str, run, model: nn.Module, sizes: Sequence[tuple[int, int]], tolerance: float) -> dict[str, float]:
    diffs = {}
    for x in _inputs(sizes, _channels(model)):
        with torch.inference_mode():
            expected = model(x).float()
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


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``, renamed to it if the block succeeds and removed otherwise."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise FcnsegError(f"--out {path}: cannot write ({e.strerror or e})") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise FcnsegError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'fcnseg[onnx]'") from None
    path = Path(path)
    with _eval_cpu(model), _staging(path) as tmp:
        program = _torch_export_onnx(model, opset)
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        meta = proto.metadata_props.add()
        meta.key, meta.value = "fcnseg", json.dumps(describe(model))
        onnx.save(proto, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        diffs = _compare(str(path), lambda x: session.run(None, {name: x.numpy()})[0], model, check_sizes, tolerance)
    return ExportReport(path, "onnx", opset, diffs)


def _torch_export_onnx(model: nn.Module, opset: int):
    import logging

    # Traced with a batch of 2: torch.export specialises sizes of 0 and 1 to constants.
    x = _inputs([TRACE_SIZE], _channels(model))[0].expand(2, -1, -1, -1).contiguous()
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
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115
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
    with _eval_cpu(model), _staging(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            traced = torch.jit.trace(model, _inputs([TRACE_SIZE], _channels(model))[0], check_trace=False)
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
