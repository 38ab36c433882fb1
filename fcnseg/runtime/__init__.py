"""Execution paths for inference: eager fp32 (channels_last), Winograd fp32 (per-layer kernels), bf16, ONNX
Runtime fp32 / int8, OpenVINO fp32 / bf16 / int8, torch.compile, and ``auto`` / ``auto-reduced``, which measure the
installed ones and take the fastest.

A *runner* maps a normalised N x 3 x H x W float tensor to N x C x H x W float32 logits, whatever runs inside.
``make_runner(model, "onnx-int8", calibration=[...])`` builds one; ``predict``, ``eval``, ``serve``, ``bench`` and the
Python API take the path by name. Reduced-precision paths are judged by :func:`agreement`, the fraction of pixels
whose argmax equals fp32's.

The modules: :mod:`.cpu` (the CPU probe: instruction-set flags, model name, the keys compiled and measured code
is valid for), :mod:`.paths` (the paths by name, the feature rule :func:`choose_path`, :func:`make_runner`),
:mod:`.choice` (``auto`` by measurement, and its cache), :mod:`.onnx` (ONNX Runtime sessions, int8 quantisation and
its check), :mod:`.openvino` (OpenVINO's CPU plugin, NNCF's int8), :mod:`.kernels` (the measured per-layer
convolution kernels of ``winograd`` and of training on the CPU), :mod:`.winograd` (Winograd's transforms as
matrix products), :mod:`.compare` (runners compared pixel by pixel)
and :mod:`.timing` (the timing loop).
"""

from __future__ import annotations

from .compare import Runner, agreement, eval_mode
from .cpu import NATIVE_BF16, VNNI, bf16_is_native, cpu_features, cpu_key, cpu_model_name, isa_key
from .onnx import INT8_WARN_BELOW, check_int8, exported_fp32, float_layers, ort_session, quantize_onnx
from .paths import (
    AUTO,
    FP32_CLASS,
    PATHS,
    check_path,
    choose_path,
    make_runner,
    resolve_path,
    use_inductor_cache_of_this_isa,
)

__all__ = [
    "AUTO",
    "FP32_CLASS",
    "INT8_WARN_BELOW",
    "NATIVE_BF16",
    "PATHS",
    "VNNI",
    "Runner",
    "agreement",
    "bf16_is_native",
    "check_int8",
    "check_path",
    "choose_path",
    "cpu_features",
    "cpu_key",
    "cpu_model_name",
    "eval_mode",
    "exported_fp32",
    "float_layers",
    "isa_key",
    "make_runner",
    "ort_session",
    "quantize_onnx",
    "resolve_path",
    "use_inductor_cache_of_this_isa",
]
