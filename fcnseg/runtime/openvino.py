"""OpenVINO's CPU plugin as execution paths: ``openvino`` (fp32), ``openvino-bf16`` and ``openvino-int8``.

Each reads the ONNX file the ``onnx`` path exports and checks (:func:`~fcnseg.runtime.onnx.exported_fp32`), so the
graph OpenVINO compiles is one already compared with the model's forward. The precision is always set explicitly
(``INFERENCE_PRECISION_HINT``): with only ``PERFORMANCE_HINT: LATENCY``, the plugin runs bf16 on any CPU with
AVX512_BF16 or AMX, so a path called fp32 would silently not be. ``openvino-int8`` is quantised by NNCF, OpenVINO's
own post-training quantiser, on the same calibration images and with the same layers kept in float as ``onnx-int8``
(and the sums of their class scores too), and checked against fp32 as it is; its float parts run in bf16 where the
CPU computes bf16 natively, else in f32. On the trained demo model NNCF's file kept more of fp32's labels than ONNX
Runtime's QDQ file run by OpenVINO, at the same speed.

Compiled models are kept in OpenVINO's own on-disk cache (``CACHE_DIR``, under fcnseg's cache folder), so a second
process with the same graph, weights and settings loads the compiled blob instead of compiling again; the oldest
blobs go once the folder passes :data:`CACHE_BUDGET` bytes. OpenVINO is an optional extra:
``pip install "fcnseg[openvino]"``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import FcnsegError
from ..io import cache_root, sync_file
from .compare import Runner, built_on_first_call
from .cpu import NATIVE_BF16, bf16_is_native, cpu_features
from .engines import build_folder, reused

OPENVINO_PATHS: tuple[str, ...] = ("openvino", "openvino-bf16", "openvino-int8")
PRECISION = {"openvino": "f32", "openvino-bf16": "bf16"}
"""``INFERENCE_PRECISION_HINT`` of the float paths."""
CACHE_BUDGET = 4 << 30
"""Bytes of compiled blobs kept (the full-size FCN-8s compiles to about 500 MB in f32); the oldest go beyond it."""


def int8_float_precision() -> str:
    """The precision of ``openvino-int8``'s layers left in float: bf16 on a CPU that computes it natively (on the
    trained demo model it cost 0.04% of fp32's labels; the full-size FCN-8s ran 48.5 instead of 51.2 ms at
    375 x 500 on a Sapphire Rapids CPU), else f32."""
    return "bf16" if cpu_features() & NATIVE_BF16 and bf16_is_native() else "f32"


def openvino_available() -> bool:
    """Whether the ``openvino`` package is installed (without importing it: the import takes a second)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def openvino_version() -> str | None:
    """OpenVINO's version, None where it is not installed."""
    if not openvino_available():
        return None
    import openvino

    return openvino.get_version()


def openvino_cache_dir() -> Path:
    """Where compiled models are kept: ``openvino`` in fcnseg's cache folder. OpenVINO names each blob by a hash of
    the model, the device and the compile settings, so one folder serves every model and precision."""
    return cache_root() / "openvino"


def _writable_cache() -> Path | None:
    """:func:`openvino_cache_dir`, made if need be; None where it cannot be written (compiling then goes on without
    the cache: OpenVINO itself fails the compilation when it cannot make its folder)."""
    folder = openvino_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def compile_config(precision: str) -> dict[str, object]:
    """The CPU plugin's settings for one path: latency-first (one stream: every thread on one image), PyTorch's
    thread budget, the precision forced, and the on-disk cache of compiled models where it can be written."""
    config: dict[str, object] = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": precision,
    }
    folder = _writable_cache()
    if folder is not None:
        config["CACHE_DIR"] = str(folder)
    return config


def prune_cache(folder: Path, budget: int = CACHE_BUDGET) -> list[Path]:
    """Delete the blobs in ``folder`` least recently written or read (OpenVINO reads a blob on every cache hit)
    beyond the newest ones that fit in ``budget`` bytes; the newest is always kept. Returns those deleted."""
    blobs = []
    for blob in folder.glob("*.blob"):
        with contextlib.suppress(OSError):  # another process may have pruned it meanwhile
            st = blob.stat()
            blobs.append((max(st.st_mtime, st.st_atime), st.st_size, blob))
    blobs.sort(key=lambda b: b[0], reverse=True)
    total, deleted = 0, []
    for i, (_, size, blob) in enumerate(blobs):
        total += size
        if i and total > budget:
            with contextlib.suppress(OSError):
                blob.unlink()
                deleted.append(blob)
    return deleted


def openvino_session(source: str | os.PathLike, precision: str = "f32") -> Runner:
    """A runner over the ONNX (or OpenVINO IR) file ``source``, compiled for the CPU at ``precision``: one image
    runs on every thread; a batch is split across the plugin's throughput streams (:func:`_across_streams`)."""
    if not openvino_available():
        raise FcnsegError('the openvino paths need OpenVINO: pip install "fcnseg[openvino]"')
    import openvino as ov

    core = ov.Core()
    # Compiled from the model object, not the file: OpenVINO then keys the cache by a hash of the graph and its
    # weights; keyed by the file's path, it never matched, every process exporting into a new temporary folder.
    config, ov_model = compile_config(precision), core.read_model(str(source))
    single = core.compile_model(ov_model, "CPU", config)
    # For batches, the same model compiled for throughput: the plugin splits the threads into streams that each run
    # requests of their own (it chose 2 streams of 1 thread on 2 cores). Compiling is cheap (weights are laid out at
    # a stream's first run); with one thread there is nothing to split.
    streams = (
        core.compile_model(ov_model, "CPU", {**config, "PERFORMANCE_HINT": "THROUGHPUT"})
        if torch.get_num_threads() > 1
        else None
    )
    width = int(streams.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if streams is not None else 1
    if "CACHE_DIR" in config:
        prune_cache(Path(config["CACHE_DIR"]))
    local = threading.local()  # an infer request runs one inference at a time: each calling thread has its own

    def run(x: torch.Tensor) -> torch.Tensor:
        data = np.ascontiguousarray(x.detach().float().cpu().numpy())
        if len(data) > 1 and width > 1:
            if not hasattr(local, "requests"):
                local.requests = [streams.create_infer_request() for _ in range(width)]
            return torch.from_numpy(_across_streams(local.requests, data))
        if not hasattr(local, "request"):
            local.request = single.create_infer_request()
        out = local.request.infer({0: data})[0]
        return torch.from_numpy(np.array(out, dtype=np.float32))  # a copy: the request reuses its buffers

    return run


def _across_streams(requests: list, data: np.ndarray) -> np.ndarray:
    """``data``'s outputs, its images split into one run of images for each request, all running at once. With
    ``THROUGHPUT``, each stream runs on threads of its own, so a layer's work is not split and joined across every
    thread as one latency request's is. On a 2-core Sapphire Rapids CPU, the full-size FCN-8s in int8 at 375 x 500
    took 44-47 instead of 50 ms an image in batches of 8, and 387-394 instead of 411-422 held to AVX2."""
    parts = np.array_split(data, min(len(requests), len(data)))
    started: list = []
    try:
        for request, part in zip(requests, parts, strict=False):
            request.start_async({0: part})
            started.append(request)
    finally:  # every request started is waited for, failed or not: one left running refuses every later call
        failures = [e for e in map(_waited, started) if e is not None]
    if failures:
        raise failures[0]
    return np.concatenate([r.get_output_tensor(0).data for r in started], dtype=np.float32)  # a copy


def _waited(request) -> Exception | None:
    """Wait for ``request`` to end; the error it ended with, if any."""
    try:
        request.wait()
    except RuntimeError as e:
        return e
    return None


def openvino_runner(
    model: nn.Module,
    path: str,
    calibration: Sequence[torch.Tensor] | None,
    workdir: str | os.PathLike | None,
    keep_float: Sequence[str] = (),
) -> Runner:
    """The ``openvino``, ``openvino-bf16`` or ``openvino-int8`` runner of ``model``; its ONNX files are written
    into ``workdir`` (by default the model's folder in the engine cache), int8 calibrated on ``calibration`` and
    checked against fp32 as ``onnx-int8`` is (:func:`nncf_int8`)."""
    from .onnx import agreement_file, check_int8, exported_fp32

    if not openvino_available():
        raise FcnsegError(f'runtime {path} needs OpenVINO: pip install "fcnseg[openvino]"')
    if path == "openvino-bf16" and not (cpu_features() & NATIVE_BF16 and bf16_is_native()):
        warnings.warn(
            "this CPU has no bf16 instructions: OpenVINO emulates bf16 and is slower than fp32; use openvino",
            stacklevel=3,
        )
    with build_folder(model, workdir, "fcnseg-onnx-") as folder:  # a compiled model no longer reads its files
        fp32 = exported_fp32(model, folder)
        if path != "openvino-int8":
            return _float_session(fp32, PRECISION[path])
        calibration = list(calibration or [])
        if not calibration:
            raise FcnsegError(f"{path} needs calibration images (--calibration DIR or the images being predicted)")
        xml = nncf_int8(model, folder, calibration, keep_float)
        floats = int8_float_precision()  # bf16 or f32, as oneDNN's instruction set allows: it moves the agreement
        run = openvino_session(xml, floats)
        fp32_run = built_on_first_call(lambda: openvino_session(fp32, "f32"))
        check_int8(run, fp32_run, calibration, model, name=path, saved=agreement_file(xml, floats))
        return run


def _float_session(fp32: Path, precision: str) -> Runner:
    """:func:`openvino_session` at ``precision``; bf16 that OpenVINO cannot compile runs in f32, with a warning.
    The CPU plugin chooses its bf16 kernels from the CPU's instructions, while its oneDNN obeys
    ``ONEDNN_MAX_CPU_ISA``: held below the CPU's bf16 instruction set (``ONEDNN_MAX_CPU_ISA=AVX2`` on an AMX CPU),
    it has no bf16 pooling and refuses the model ("Supported primitive descriptors list is empty")."""
    try:
        return openvino_session(fp32, precision)
    except RuntimeError as e:
        if precision == "f32" or bf16_is_native():
            raise
        first = next((line for line in str(e).splitlines() if "Supported primitive" in line), "")
        warnings.warn(f"OpenVINO cannot compile bf16 here ({first.strip() or 'no bf16 kernels'}); openvino-bf16 "
                      "runs in f32", stacklevel=4)  # fmt: skip
        return openvino_session(fp32, "f32")


def _kept_nodes(model: nn.Module, source: Path, ov_model, keep_float: Sequence[str]) -> list[str]:
    """OpenVINO's names of the operations whose weights start with the model's float layers or ``keep_float``
    (OpenVINO names each after the ONNX node, a convolution's bias addition split off as ``NAME/WithoutBiases``),
    and of the operations that only combine their outputs (:func:`_float_merges`)."""
    import onnx

    from .onnx import extra_float_layers, float_layers

    prefixes = (*float_layers(model), *extra_float_layers(model, keep_float))
    graph = onnx.load(str(source), load_external_data=False).graph
    nodes = {n.name for n in graph.node if len(n.input) > 1 and n.input[1].startswith(prefixes)}
    kept = [op.get_friendly_name() for op in ov_model.get_ops() if op.get_friendly_name().split("/")[0] in nodes]
    return kept + _float_merges(ov_model, set(kept))


def _float_merges(ov_model, kept: set[str]) -> list[str]:
    """The operations of ``ov_model`` that join two or more tensors each computed by an operation in ``kept`` (FCN's
    skip sums of class scores, the concatenated heads), or upsample one by matrix products. NNCF's CPU hardware
    configuration lists Add, like Convolution, as an operation whose inputs it quantises (8 bits, one scale per
    tensor), and its ``IgnoredScope`` excludes operations, not tensors: with only the score layers ignored, the
    sums of their outputs were still rounded to 256 levels exactly where the argmax is decided. On the trained
    demo model that rounding alone cost 0.18% of fp32's labels (99.46% agreement instead of 99.64%), and leaving
    the sums in float cost no measurable speed."""

    from_image = _from_image(ov_model)

    def data_inputs(op) -> list:  # the computed float tensors an operation reads (not its weights, not shapes)
        return [v for v in op.input_values() if v.get_element_type().is_real() and not _is_constant(v)]

    def from_kept(value) -> bool:  # traced back through one-input operations (crops, reshapes) to a kept one
        op = value.get_node()
        while op.get_friendly_name() not in kept:
            inputs = data_inputs(op)
            if len(inputs) != 1:
                return False
            op = inputs[0].get_node()
        return True

    merges = []
    for op in ov_model.get_ordered_ops():
        computed = data_inputs(op)
        inputs = [v for v in computed if v.get_node().get_friendly_name() in from_image]
        joins = len(inputs) > 1
        # A matrix product with an operand made from the image's size, not a weight: the last upsampling as
        # exported (:func:`~fcnseg.models.upsampling.matrix_upsampling`), part of the float layer it replaces.
        interpolates = op.get_type_name() == "MatMul" and len(inputs) == 1 and len(computed) == 2
        if op.get_friendly_name() not in kept and (joins or interpolates) and all(map(from_kept, inputs)):
            merges.append(op.get_friendly_name())
            kept.add(op.get_friendly_name())
    return merges


def _from_image(ov_model) -> set[str]:
    """The names of the operations whose outputs depend on the image's values, not only on its size."""
    names: set[str] = set()
    for op in ov_model.get_ordered_ops():
        inputs = op.input_values() if op.get_type_name() != "ShapeOf" else []
        if op.get_type_name() == "Parameter" or any(v.get_node().get_friendly_name() in names for v in inputs):
            names.add(op.get_friendly_name())
    return names


def _is_constant(value) -> bool:
    return value.get_node().get_type_name() == "Constant"


def nncf_int8(
    model: nn.Module, folder: Path, calibration: Sequence[torch.Tensor], keep_float: Sequence[str] = ()
) -> Path:
    """``folder/model.int8[...].xml``: the model's float graph (:func:`~fcnseg.runtime.onnx.int8_source`)
    quantised by NNCF, OpenVINO's own post-training quantisation (per-channel int8 weights, activation ranges from
    ``calibration``, bias correction, :func:`nncf_parameters`), the model's :func:`~fcnseg.runtime.onnx.float_layers`
    and ``keep_float`` left in float, and the sums of their outputs too; made unless it is there."""
    try:
        import nncf
    except ImportError:
        raise FcnsegError('openvino-int8 needs NNCF, OpenVINO\'s quantiser: pip install "fcnseg[openvino]"') from None
    import openvino as ov

    from .onnx import int8_source, int8_stem

    xml = folder / f"{int8_stem(model, keep_float, calibration)}.xml"
    if reused(xml):
        return xml
    source = int8_source(model, folder, calibration)
    ov_model = ov.Core().read_model(str(source))
    ignored = nncf.IgnoredScope(names=_kept_nodes(model, source, ov_model, keep_float), validate=False)
    data = nncf.Dataset([x.detach().float().cpu().numpy() for x in calibration])
    with _quiet_nncf():
        quantised = nncf.quantize(ov_model, data, subset_size=len(calibration), ignored_scope=ignored,
                                  advanced_parameters=nncf_parameters())  # fmt: skip
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # the .bin first: a complete .xml means a complete pair
        ov.save_model(quantised, str(Path(tmp) / xml.name))
        for part in (xml.with_suffix(".bin"), xml):
            sync_file(Path(tmp) / part.name)  # on the disk before its name is (fcnseg.io.sync_file)
            os.replace(Path(tmp) / part.name, part)
    return xml


def nncf_parameters():
    """NNCF's advanced settings: its overflow fix (7-bit weights in the first quantised layer) only where the CPU
    lacks VNNI. Without VNNI, u8 x s8 products are summed in pairs into 16 bits (vpmaddubsw), which full-range
    weights can saturate; VNNI sums into 32 bits (vpdpbusd). NNCF applies the fix whatever the CPU, and with conv1_2
    the first quantised layer, on the trained demo model it cost 0.3% of fp32's labels on a CPU with VNNI."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from .onnx import int8_reduce_range

    return AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.FIRST_LAYER if int8_reduce_range() else OverflowFix.DISABLE
    )


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF reports its progress through logging and progress bars; fcnseg reports the result itself."""
    import logging

    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield
    finally:
        logger.setLevel(level)
