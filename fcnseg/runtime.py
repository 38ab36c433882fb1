"""Execution paths for inference: eager fp32 (channels_last), Winograd fp32 (per-layer kernels), bf16, ONNX
Runtime fp32 / int8, torch.compile, and ``auto``, which picks one from the CPU's features.

A *runner* maps a normalised N x 3 x H x W float tensor to N x C x H x W float32 logits, whatever runs inside.
``make_runner(model, "onnx-int8", calibration=[...])`` builds one; ``predict``, ``eval``, ``serve``, ``bench`` and the
Python API take the path by name. Reduced-precision paths are judged by :func:`agreement`, the fraction of pixels
whose argmax equals fp32's.
"""

from __future__ import annotations

import contextlib
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

PATHS: tuple[str, ...] = ("eager", "winograd", "bf16", "onnx", "onnx-int8", "compile")
AUTO: tuple[str, ...] = ("auto", "auto-reduced")  # chosen from the CPU's features (:func:`choose_path`)
FP32_CLASS: tuple[str, ...] = ("eager", "winograd", "onnx", "compile")  # agree with eager fp32 on >= 99.99%
INT8_WARN_BELOW = 0.99  # int8 agreement with fp32 on the calibration images that draws a warning
Runner = Callable[[torch.Tensor], torch.Tensor]


def check_path(path: str, flag: str = "--runtime", *, auto: bool = True) -> str:
    """``path`` if it names an execution path (or, with ``auto``, one of :data:`AUTO`); else an FcnsegError naming
    ``flag``, the option the user typed."""
    allowed = PATHS + AUTO if auto else PATHS
    if path not in allowed:
        raise FcnsegError(f"{flag} {path!r}: expected one of {', '.join(allowed)}")
    return path


def cpu_features() -> frozenset[str]:
    """The CPU's instruction-set flags as Linux names them (``avx2``, ``fma``, ``avx512f``, ``avx512_vnni``,
    ``amx_bf16`` ...). ``FCNSEG_CPU_FEATURES`` (comma- or space-separated) overrides the probe: to ask what
    ``auto`` would pick elsewhere, and in tests. Without /proc/cpuinfo, what torch reports stands in."""
    override = os.environ.get("FCNSEG_CPU_FEATURES")
    if override is not None:
        return frozenset(override.replace(",", " ").lower().split())
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    capability = torch.backends.cpu.get_cpu_capability()
    flags = {"AVX2": {"avx2", "fma"}, "AVX512": {"avx2", "fma", "avx512f"}}.get(capability, set())
    return frozenset(flags | ({"avx512_bf16"} if bf16_is_native() else set()))


VNNI = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
NATIVE_BF16 = frozenset({"amx_bf16", "avx512_bf16"})


def choose_path(features: frozenset[str], *, reduced: bool = False, nnpack: bool = True) -> tuple[str, str]:
    """The path ``auto`` takes on a CPU with ``features``, and why, in a few words.

    fp32 class (``auto``): ``winograd`` where AVX2 and FMA are there for NNPACK (it measures each layer against
    oneDNN and keeps the faster), else ``eager``. ``auto-reduced`` may also trade a little agreement for speed:
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
    if {"avx2", "fma"} <= features and nnpack:
        return "winograd", "AVX2 and FMA: NNPACK Winograd and GEMM kernels, each layer measured against oneDNN"
    if not {"avx2", "fma"} <= features:
        return "eager", "no AVX2 and FMA for NNPACK's kernels: oneDNN's fp32 convolutions"
    return "eager", "this torch build has no NNPACK: oneDNN's fp32 convolutions"


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
    from .kernels import nnpack_ready

    chosen, why = choose_path(cpu_features(), reduced=path == "auto-reduced", nnpack=nnpack_ready())
    return chosen, f"runtime {path}: {chosen} ({why})"


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
    *,
    reduce_range: bool = False,
) -> Path:
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations, min-max ranges) calibrated on
    ``calibration`` (normalised 1 x C x H x W inputs, a few images of the user's own data). Nodes whose weight
    name starts with one of ``keep_float`` stay in float. ``reduce_range``: 7-bit weights (-64..64), for CPUs
    without VNNI, whose u8 x s8 pair sums (vpmaddubsw) saturate 16 bits with full-range weights."""
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
            reduce_range=reduce_range,
        )
    return Path(out)


def int8_sensitivity(
    model: nn.Module, calibration: Sequence[torch.Tensor], workdir: str | os.PathLike | None = None
) -> dict[str, float]:
    """For each layer that int8 quantises by default, the agreement with fp32 (on ``calibration``) when that layer
    alone is quantised, lowest first: the first layers cost the most, and are the ones to keep in float
    (``quantize_onnx(..., keep_float=float_layers(model) + [...])``). One quantisation per layer: minutes at
    full size, so calibrate on a few images."""
    import onnx

    folder = Path(workdir or tempfile.mkdtemp(prefix="fcnseg-sensitivity-"))
    fp32 = exported_fp32(model, folder)
    reference = _ort_session(fp32)
    kept = tuple(float_layers(model))
    weights = [n.input[1] for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv" and len(n.input) > 1]
    layers = sorted({w.rsplit(".", 1)[0] + "." for w in weights if not w.startswith(kept)})
    reduce_range = not cpu_features() & VNNI
    cost = {}
    for layer in layers:
        others = [name for name in layers if name != layer]
        out = folder / "one-layer.int8.onnx"
        quantize_onnx(fp32, out, calibration, keep_float=[*kept, *others], reduce_range=reduce_range)
        cost[layer.rstrip(".")] = agreement(_ort_session(out), reference, calibration, model)
    return dict(sorted(cost.items(), key=lambda kv: kv[1]))


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
    """A runner for ``model`` on execution path ``path`` (see :data:`PATHS`, :data:`AUTO`).

    ``eager``: fp32 PyTorch, channels_last by default (oneDNN's fastest convolution layout on CPU). ``winograd``:
    fp32 on a copy whose convolutions run the fastest of oneDNN, NNPACK's Winograd and im2col + GEMM, measured per
    layer and cached (:mod:`fcnseg.kernels`). ``bf16``: a bfloat16 copy of the model (the original stays fp32).
    ``onnx`` / ``onnx-int8``: exported (and checked) into ``workdir`` (a temporary folder by default), int8
    statically quantised on ``calibration`` inputs (7-bit weights on a CPU without VNNI) and checked against fp32
    on them (a warning below :data:`INT8_WARN_BELOW`). ``compile``: torch.compile with dynamic shapes (the first
    call of each new size compiles). ``auto`` / ``auto-reduced``: the path :func:`resolve_path` picks.
    The eager paths put ``model`` in eval mode (and channels_last) for good; the others leave it as it is.
    """
    path, _ = resolve_path(path, model)
    if path == "eager":
        return _eager(model, torch.float32, channels_last)
    if path == "winograd":
        from .kernels import with_measured_kernels

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
    return _onnx_runner(model, path, calibration, workdir)


def use_inductor_cache_of_this_isa() -> Path | None:
    """Point torch.compile's on-disk cache at a folder of this CPU and instruction set (:func:`kernels.isa_key`),
    under fcnseg's cache folder, unless the user chose another (``TORCHINDUCTOR_CACHE_DIR``). torch's default, one
    folder in /tmp per user, is shared by every run: graphs compiled under AVX-512 were reloaded by a run held to
    AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) and computed NaN and wrong masks, or freed memory
    twice. Returns the folder now in use, None where it is the user's."""
    import getpass
    import hashlib

    from .kernels import cache_root, isa_key

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


def exported_fp32(model: nn.Module, folder: Path) -> Path:
    """``folder/model.onnx``, exported (and checked) unless it is there already."""
    from .export import export_onnx

    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        # ONNX Runtime runs on the CPU in fp32: export a CPU fp32 copy when the model lives elsewhere.
        p = next(model.parameters())
        on_cpu = p.device.type == "cpu" and p.dtype == torch.float32
        export_onnx(model if on_cpu else copy.deepcopy(model).float().cpu(), fp32)
    return fp32


def _onnx_runner(model: nn.Module, path: str, calibration, workdir) -> Runner:
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fcnseg-onnx-"))
    fp32 = exported_fp32(model, folder)
    if path == "onnx":
        return _ort_session(fp32)
    calibration = list(calibration or [])
    int8 = folder / "model.int8.onnx"
    reduce_range = not cpu_features() & VNNI
    quantize_onnx(fp32, int8, calibration, keep_float=float_layers(model), reduce_range=reduce_range)
    run = _ort_session(int8)
    check_int8(run, _ort_session(fp32), calibration, model)
    return run


def check_int8(run: Runner, fp32: Runner, calibration: Sequence[torch.Tensor], model: nn.Module | None) -> float:
    """int8's agreement with fp32 on the calibration images; a warning when it is below :data:`INT8_WARN_BELOW`,
    where int8 visibly changes the masks."""
    share = agreement(run, fp32, calibration, model)
    if share < INT8_WARN_BELOW:
        warnings.warn(
            f"onnx-int8 agrees with fp32 on only {100 * share:.2f}% of the calibration images' pixels (below "
            f"{100 * INT8_WARN_BELOW:.0f}%): its masks will differ visibly; use an fp32 path (winograd, onnx) or "
            "calibrate on more images like yours",
            stacklevel=3,
        )
    return share


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
