"""The execution paths by name, ``auto``'s choice among them, and :func:`make_runner`, which builds one: eager
fp32, Winograd fp32 (:mod:`.kernels`), bf16 and torch.compile here, the ONNX Runtime paths in :mod:`.onnx`."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import FcnsegError
from ..io import cache_root
from .compare import Runner
from .cpu import NATIVE_BF16, VNNI, bf16_is_native, cpu_features, isa_key
from .kernels import kernels_pay, with_measured_kernels
from .onnx import onnx_runner
from .openvino import OPENVINO_PATHS, openvino_runner

PATHS: tuple[str, ...] = ("eager", "winograd", "bf16", "onnx", "onnx-int8", *OPENVINO_PATHS, "compile")
AUTO: tuple[str, ...] = ("auto", "auto-reduced")  # measured (:mod:`.choice`); without an input, :func:`choose_path`
FP32_CLASS: tuple[str, ...] = ("eager", "winograd", "onnx", "openvino", "compile")  # >= 99.99% of eager's labels


def check_path(path: str, flag: str = "--runtime", *, auto: bool = True) -> str:
    """``path`` if it names an execution path (or, with ``auto``, one of :data:`AUTO`); else an FcnsegError naming
    ``flag``, the option the user typed."""
    allowed = PATHS + AUTO if auto else PATHS
    if path not in allowed:
        raise FcnsegError(f"{flag} {path!r}: expected one of {', '.join(allowed)}")
    return path


def choose_path(features: frozenset[str], *, reduced: bool = False) -> tuple[str, str]:
    """The path ``auto`` takes on a CPU with ``features``, and why, in a few words.

    fp32 class (``auto``): ``winograd`` where AVX2 and FMA are there (it measures each layer's kernels against
    oneDNN and keeps the fastest), else ``eager``. ``auto-reduced`` may also trade a little agreement for speed:
    ``bf16`` on AMX or AVX-512 BF16, else ``onnx-int8`` (VNNI's u8s8 kernels, or 7-bit weights without VNNI,
    whose u8s8 sums would saturate), else the fp32 choice.
    """
    if reduced and features & NATIVE_BF16:
        return (
            "bf16",
            f"reduced precision asked for and the CPU computes bf16 natively ({_named(features & NATIVE_BF16)})",
        )
    if reduced and "avx2" in features:
        how = f"VNNI's u8s8 kernels ({_named(features & VNNI)})" if features & VNNI else "7-bit weights: no VNNI"
        return "onnx-int8", f"reduced precision asked for; int8 with {how}"
    if kernels_pay(features):
        return "winograd", "AVX2 and FMA: Winograd and GEMM kernels, each layer measured against oneDNN"
    return "eager", "no AVX2 and FMA for the Winograd and GEMM kernels: oneDNN's fp32 convolutions"


def _named(flags: Iterable[str]) -> str:
    return ", ".join(sorted(flags))


def resolve_path(path: str, model: nn.Module | None = None) -> tuple[str, str | None]:
    """``(path, None)`` for a named path; for ``auto`` / ``auto-reduced``, the path :func:`choose_path` picks for
    this CPU (eager for a model on a GPU) and the reason, one line to show the user."""
    check_path(path)
    if path not in AUTO:
        return path, None
    if model is not None and _device(model).type != "cpu":
        return "eager", f"runtime {path}: eager (the model is on {_device(model)})"
    chosen, why = choose_path(cpu_features(), reduced=path == "auto-reduced")
    return chosen, f"runtime {path}: {chosen} ({why})"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _eager(model: nn.Module, dtype: torch.dtype, channels_last: bool | None) -> Runner:
    """``model`` run under inference mode; ``channels_last`` None leaves its memory layout and the input's as they
    are, else both are converted to channels_last (True) or contiguous (False)."""
    fmt = None if channels_last is None else torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval() if fmt is None else model.eval().to(memory_format=fmt)
    device = _device(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(device, dtype)
            return model(x if fmt is None else x.contiguous(memory_format=fmt)).float()

    return run


def make_runner(
    model: nn.Module,
    path: str = "eager",
    *,
    channels_last: bool | None = True,
    calibration: Sequence[torch.Tensor] | None = None,
    workdir: str | os.PathLike | None = None,
    keep_float: Sequence[str] = (),
) -> Runner:
    """A runner for ``model`` on execution path ``path`` (see :data:`PATHS`, :data:`AUTO`).

    ``eager``: fp32 PyTorch, channels_last by default (oneDNN's fastest convolution layout on CPU). ``winograd``:
    fp32 on a copy whose convolutions run the fastest of oneDNN, fcnseg's and NNPACK's Winograd and im2col + GEMM,
    measured per layer and cached (:mod:`fcnseg.runtime.kernels`). ``bf16``: a bfloat16 copy of the model (the
    original stays fp32). ``onnx`` / ``onnx-int8``: exported (and checked) into ``workdir`` (by default the model's
    folder in the engine cache, :mod:`fcnseg.runtime.engines`, where a later process finds them), int8
    statically quantised on ``calibration`` inputs (7-bit weights on a CPU without VNNI) and checked against fp32
    on them (a warning below :data:`~fcnseg.runtime.onnx.INT8_WARN_BELOW`). ``compile``: torch.compile
    with dynamic shapes (the first call of each new size compiles). ``openvino`` / ``openvino-bf16`` /
    ``openvino-int8``: OpenVINO's CPU plugin on the same ONNX files, precision forced
    (:mod:`fcnseg.runtime.openvino`). int8 keeps :func:`~fcnseg.runtime.onnx.float_layers` and ``keep_float`` in
    float. ``auto`` / ``auto-reduced``: the path :func:`resolve_path` picks from the CPU's features (with an input
    to measure on, :func:`fcnseg.runtime.choice.choose` measures instead). The eager paths put ``model`` in eval
    mode (and channels_last) for good; ``channels_last=None`` leaves its memory layout as it is. The others leave
    the model as it is. The exported files in a given ``workdir`` are reused as they are, whatever model made them
    (those made from calibration images are named by a hash of them): give each model a folder of its own.
    """
    path, _ = resolve_path(path, model)
    if path == "eager":
        return _eager(model, torch.float32, channels_last)
    if path == "winograd":
        return _eager(with_measured_kernels(model.eval()), torch.float32, channels_last=False)
    if path == "bf16":
        if _device(model).type == "cpu" and not bf16_is_native():
            warnings.warn(
                f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no bf16 instructions: the bf16 path is "
                "emulated and slower than fp32; use winograd or onnx for speed",
                stacklevel=2,
            )
        return _eager(copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16, channels_last)
    if path == "compile":
        use_inductor_cache_of_this_isa()
        compiled = torch.compile(model.eval(), dynamic=True)
        return _eager(compiled, torch.float32, channels_last=False)
    if path in OPENVINO_PATHS:
        return openvino_runner(model, path, calibration, workdir, keep_float)
    return onnx_runner(model, path, calibration, workdir, keep_float)


def use_inductor_cache_of_this_isa() -> Path | None:
    """Point torch.compile's on-disk cache at a folder of this CPU and instruction set (:func:`.cpu.isa_key`),
    under fcnseg's cache folder, unless the user chose another (``TORCHINDUCTOR_CACHE_DIR``). torch's default, one
    folder in /tmp per user, is shared by every run: graphs compiled under AVX-512 were reloaded by a run held to
    AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) and computed NaN and wrong masks, or freed memory
    twice. Returns the folder now in use, None where it is the user's."""
    import getpass
    import hashlib

    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # torch moved it: its default as torch 2.x spells it

        def default_cache_dir() -> str:
            return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")

    ours = cache_root() / "inductor"
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the variable at first use, and a process started from here inherits ours.
    if current and Path(current) != Path(default_cache_dir()) and Path(current).parent != ours:
        return None
    folder = ours / hashlib.sha256(isa_key().encode()).hexdigest()[:16]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder
