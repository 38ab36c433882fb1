"""Execution paths for inference: eager fp32 (channels_last), bf16, ONNX Runtime fp32 / int8, torch.compile.

A *runner* maps a normalised N x 3 x H x W float tensor to N x C x H x W float32 logits, whatever runs inside.
``make_runner(model, "onnx-int8", calibration=[...])`` builds one; ``predict``, ``eval``, ``bench`` and the Python
API take the path by name. Reduced-precision paths are judged by :func:`agreement`, the fraction of pixels whose
argmax equals fp32's.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FcnsegError

PATHS: tuple[str, ...] = ("eager", "bf16", "onnx", "onnx-int8", "compile")
Runner = Callable[[torch.Tensor], torch.Tensor]


def check_path(path: str, flag: str = "--runtime") -> str:
    """``path`` if it names an execution path; else an FcnsegError naming ``flag``, the option the user typed."""
    if path not in PATHS:
        raise FcnsegError(f"{flag} {path!r}: expected one of {', '.join(PATHS)}")
    return path


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _eager(model: nn.Module, dtype: torch.dtype, channels_last: bool) -> Runner:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(memory_format=fmt)
    device = _device(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.to(device, dtype).contiguous(memory_format=fmt)).float()

    return run


def _ort_session(path: str | os.PathLike):
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
    """Parameter prefixes left in float by int8 quantisation: the convolutions before the first pooling (full
    resolution, fed the 8-bit-quantised image itself), the class-score layers and the upsamplers, where the
    argmax is decided. The bulk of the work (conv2 to fc7) runs in int8. Every head of every FCN (every stream of
    a late-fusion net) is covered: each :class:`~fcnseg.models.fcn.ScoreHead`'s layers and each backbone's first
    block, wherever they sit."""
    from .models.fcn import FCN, ScoreHead

    keep: list[str] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ScoreHead):
            keep += [f"{prefix}score_", f"{prefix}upsample_"]
        features = getattr(module.backbone, "features", None) if isinstance(module, FCN) else None
        for i, m in enumerate(features or []):
            if isinstance(m, nn.MaxPool2d):
                break
            if isinstance(m, nn.Conv2d):
                keep.append(f"{prefix}backbone.features.{i}.")
    return keep


def quantize_onnx(
    fp32: str | os.PathLike,
    out: str | os.PathLike,
    calibration: Sequence[torch.Tensor],
    keep_float: Sequence[str] = (),
) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations, min-max ranges) calibrated on
    ``calibration`` (normalised 1 x C x H x W inputs, a few images of the user's own data). Nodes whose weight
    name starts with one of ``keep_float`` stay in float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise FcnsegError("onnx-int8 needs calibration images (--calibration DIR or the images being predicted)")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        exclude = [n.name for n in graph.node if len(n.input) > 1 and n.input[1].startswith(tuple(keep_float))]
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
        )
    return Path(out)


def bf16_is_native() -> bool:
    """Whether this CPU computes bf16 convolutions natively (AVX-512 BF16 or AMX), as oneDNN reports it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def make_runner(
    model: nn.Module,
    path: str = "eager",
    *,
    channels_last: bool = True,
    calibration: Sequence[torch.Tensor] | None = None,
    workdir: str | os.PathLike | None = None,
) -> Runner:
    """A runner for ``model`` on execution path ``path`` (see :data:`PATHS`).

    ``eager``: fp32 PyTorch, channels_last by default (oneDNN's fastest convolution layout on CPU). ``bf16``: a
    bfloat16 copy of the model (the original stays fp32). ``onnx`` / ``onnx-int8``: exported (and checked) into
    ``workdir`` (a temporary folder by default), int8 statically quantised on ``calibration`` inputs.
    ``compile``: torch.compile with dynamic shapes (the first call of each new size compiles).
    The eager paths put ``model`` in eval mode (and channels_last) for good; the others leave it as it is.
    """
    check_path(path)
    if path == "eager":
        return _eager(model, torch.float32, channels_last)
    if path == "bf16":
        if _device(model).type == "cpu" and not bf16_is_native():
            warnings.warn(
                f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 instructions: the bf16 path is "
                "emulated and slower than fp32; use onnx or onnx-int8 for speed",
                stacklevel=2,
            )
        return _eager(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16, channels_last)
    if path == "compile":
        compiled = torch.compile(model.eval(), dynamic=True)
        return _eager(compiled, torch.float32, channels_last=False)
    from .export import export_onnx

    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fcnseg-onnx-"))
    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        # ONNX Runtime runs on the CPU in fp32: export a CPU fp32 copy when the model lives elsewhere.
        p = next(model.parameters())
        on_cpu = p.device.type == "cpu" and p.dtype == torch.float32
        export_onnx(model if on_cpu else copy.deepcopy(model).float().cpu(), fp32)
    if path == "onnx":
        return _ort_session(fp32)
    int8 = folder / "model.int8.onnx"
    quantize_onnx(fp32, int8, list(calibration or []), keep_float=float_layers(model))
    return _ort_session(int8)


def agreement(run: Runner, reference: Runner, inputs: Iterable[torch.Tensor], model: nn.Module | None = None) -> float:
    """Fraction of pixels, over ``inputs``, where ``run``'s argmax equals ``reference``'s. With ``model``, a
    two-headed model's heads are compared one by one (their scores are concatenated in one output) and the
    pixels of every head counted."""
    from .models.multi import split_heads

    same = total = 0
    for x in inputs:
        outs, refs = run(x), reference(x)
        heads = split_heads(model, outs).values() if model else [outs]
        for out, ref in zip(heads, split_heads(model, refs).values() if model else [refs], strict=True):
            a, b = out.argmax(1), ref.argmax(1)
            same += int((a == b).sum())
            total += a.numel()
    return same / max(total, 1)


def normalised(model: nn.Module, images: Iterable[Any]) -> list[torch.Tensor]:
    """Images (paths, PIL images or arrays) as the model's normalised 1 x C x H x W inputs (arrays of C channels for
    a fusion net; an error naming what was expected otherwise)."""
    from .predict import model_input

    return [model_input(model, im).unsqueeze(0) for im in images]
