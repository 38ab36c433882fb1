"""``fcnseg bench``: latency, throughput, GFLOP and peak memory of a model on each execution path.

Every path runs the same input after its own warm-up; the figures are the median, min and max of N timed runs.
GFLOP per image comes from torch's FlopCounterMode on the eager model (a multiply-add counts 2); memory is the
peak resident set size above the level before the path was built, sampled every 5 ms.

Agreement with eager fp32 (the share of pixels whose argmax is the same) only means something where fp32's argmax
varies: an untrained model (the release starts its class-score layers at zero) gives constant logits, and every
path would agree on 100% of the pixels. So it is measured on, in order: the weights given (a checkpoint) on the
check inputs (``--images``, else the bench input), where their fp32 argmax is not one class everywhere; else on
jittered weights (:func:`jittered`), which bench then times and compares; else not at all ("-", and the reason).
The output says which.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FcnsegError
from .inference import Predictor, agreement
from .io import scratch_folder
from .models.complexity import count_gflop
from .runtime import PATHS, Runner, make_runner
from .runtime.timing import median_ms, time_ms

JITTER_SEEDS = (0, 1, 2)  # tried in turn until the jittered model's argmax varies (a tiny net's may not at once)
JITTER_SCALE = 0.1  # of each weight or bias tensor's standard deviation
JITTER_FLOOR = 1e-2  # the noise's standard deviation for a constant weight (the zero-initialised score layers)
ONE_CLASS = "reference argmax is one class everywhere"


def expand_paths(paths: Sequence[str]) -> list[str]:
    """``paths`` checked, with ``all`` standing for every path of :data:`~fcnseg.runtime.PATHS` whose engine is
    installed (eager first, the reference of the speed-ups); a path named twice is timed once."""
    from .runtime.openvino import OPENVINO_PATHS, openvino_available

    installed = [p for p in PATHS if openvino_available() or p not in OPENVINO_PATHS]
    out: list[str] = []
    for p in paths:
        if p != "all" and p not in PATHS:
            raise FcnsegError(f"--paths {p!r}: expected one of {', '.join(PATHS)}, or all")
        if p not in installed and p != "all":
            raise FcnsegError(f'--paths {p}: OpenVINO is not installed (pip install "fcnseg[openvino]")')
        for name in installed if p == "all" else [p]:
            if name not in out:
                out.append(name)
    return out


def gemm_gflops(n: int = 2048, runs: int = 5) -> float:
    """This machine's fp32 matrix-product rate now (GFLOP/s, median of ``runs`` n x n products): the ceiling a
    path's convolutions are compared with."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / (median_ms(lambda: a @ b, runs, warmup=1) / 1000) / 1e9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples the process's resident set size in a background thread; ``peak`` is the largest seen, ``growth`` how
    far it rose above the size at entry (never negative: the peak starts at that very reading, so memory freed
    during the block cannot make it so)."""

    def __init__(self, every: float = 0.005) -> None:
        self.every, self._stop = every, threading.Event()
        self.start = self.peak = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.every)

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def jitter_rule(seed: int) -> str:
    """:func:`jittered`'s rule in one line, for the report."""
    return (
        f"seed {seed}: every Conv2d and Linear weight and bias + N(0, ({JITTER_SCALE} x its std)^2); "
        f"a constant weight + N(0, {JITTER_FLOOR:g}^2), a constant bias kept"
    )


def jittered(model: nn.Module, seed: int = JITTER_SEEDS[0]) -> nn.Module:
    """A deep copy of ``model`` whose outputs vary: each Conv2d and Linear weight and bias, in module order, gets
    Gaussian noise from a ``torch.Generator`` seeded ``seed``, of standard deviation :data:`JITTER_SCALE` times the
    tensor's own; a constant weight (the zero-initialised score layers) gets :data:`JITTER_FLOOR`, and a constant
    bias is kept. The transposed-convolution upsamplers keep their bilinear kernels; ``model`` is left as it is."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                _jitter(module.weight, generator, floor=JITTER_FLOOR)
                if module.bias is not None:
                    # Not where constant: an untrained net's zero biases would give every pixel the same offsets, and
                    # where features are small (fc7's, behind 0.01-scaled fc6 and fc7) they decide the argmax alone.
                    _jitter(module.bias, generator, floor=0.0)
    return out


def _jitter(p: torch.Tensor, generator: torch.Generator, *, floor: float) -> None:
    std = float(p.float().std()) if p.numel() > 1 else 0.0
    sigma = JITTER_SCALE * std if std > 0 else floor
    noise = torch.randn(p.shape, generator=generator)  # drawn even where unused: each layer's noise stays the same
    p.add_(noise.to(p) * sigma)


@dataclass(frozen=True)
class AgreementSource:
    """What agreement with eager fp32 is measured on: ``kind`` is ``checkpoint``, ``images`` (a model's own weights
    on ``--images``), ``model`` (its own weights on the bench input) or ``jittered`` (:func:`jittered`).
    ``reason``: why it is not measured at all ("-" in the table), None where it is."""

    kind: str
    weights: str
    inputs: str
    reason: str | None = None

    @property
    def text(self) -> str:
        return f"{self.weights}; {self.inputs}"


def one_class_heads(model: nn.Module, inputs: Sequence[torch.Tensor]) -> list[str]:
    """The heads whose eager fp32 argmax is one class at every pixel of every input of ``inputs``."""
    reference = Predictor(model, runtime="eager")
    seen: dict[str, set[int]] = {}
    for x in inputs:
        for head, mask in reference.batch_masks(x).items():
            seen.setdefault(head, set()).update(mask.unique().tolist())
    return [head for head, classes in seen.items() if len(classes) < 2]


def agreement_subject(
    model: nn.Module, check: Sequence[torch.Tensor], source: AgreementSource, *, jitter: bool = True
) -> tuple[nn.Module, AgreementSource]:
    """The model to bench and what its agreement is measured on: ``model`` itself where its fp32 argmax varies on
    ``check``; else, with ``jitter``, a :func:`jittered` copy (the first of :data:`JITTER_SEEDS` whose argmax
    varies); the reason (:data:`ONE_CLASS`) where none does. An untrained model is told apart this way: its
    constant logits give one class everywhere."""
    constant = one_class_heads(model, check)
    if constant and jitter:
        original = model
        for seed in JITTER_SEEDS:
            model = jittered(original, seed)
            constant = one_class_heads(model, check)
            if not constant:
                break
        weights = f"jittered weights ({jitter_rule(seed)}) of {source.weights}"
        source = AgreementSource("jittered", weights, source.inputs)
    if constant:
        heads = f" (head {', '.join(constant)})" if len(model.heads) > 1 else ""
        source = AgreementSource(source.kind, source.weights, source.inputs, reason=ONE_CLASS + heads)
    return model, source


def _given_source(checkpoint: str | None, images: str | None, check: Sequence[torch.Tensor] | None) -> AgreementSource:
    if images:
        inputs = f"--images {images} ({len(check or [])} images)"
    else:
        inputs = f"{len(check)} check inputs" if check else "the bench input (N(0, 1) noise, seed 0)"
    weights = f"checkpoint {checkpoint}" if checkpoint else "the model's own weights"
    return AgreementSource("checkpoint" if checkpoint else "images" if images else "model", weights, inputs)


@dataclass
class PathResult:
    path: str
    median_ms: float
    min_ms: float
    max_ms: float
    images_per_s: float
    gflop_per_image: float
    gflop_per_s: float
    peak_mem_mb: float
    build_s: float
    agreement_with_fp32: float | None
    agreement_note: str | None  # why agreement_with_fp32 is None: the reference itself, or ONE_CLASS


def _bench_path(
    model: nn.Module,
    path: str,
    x: torch.Tensor,
    calibration: Sequence[torch.Tensor],
    check: Sequence[torch.Tensor],
    *,
    runs: int,
    warmup: int,
    progress: bool,
    gflop: float,
    source: AgreementSource,
    workdir: Path,
) -> PathResult:
    """One execution path: built (its time and memory counted), timed on ``x``, compared with eager fp32 on
    ``check`` (unless ``source`` says why not). The ONNX and OpenVINO paths share ``workdir``: the model is exported
    once, by the first of them (whose build time includes it)."""
    gc.collect()  # the previous path's garbage goes now, not while this one's memory is measured
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        run = make_runner(model, path, calibration=calibration, workdir=workdir)
        build = time.perf_counter() - t0
        times = time_ms(lambda: run(x), runs, warmup, progress=path if progress else None)
    median = statistics.median(times)
    note = "the reference" if path == "eager" else source.reason
    share = None if note else path_agreement(model, run, check)
    batch = x.shape[0]
    return PathResult(
        path=path,
        median_ms=median,
        min_ms=min(times),
        max_ms=max(times),
        images_per_s=batch / (median / 1000),
        gflop_per_image=gflop,
        gflop_per_s=gflop * batch / (median / 1000),
        peak_mem_mb=mem.growth / 2**20,
        build_s=build,
        agreement_with_fp32=share,
        agreement_note=note,
    )


def path_agreement(model: nn.Module, run: Runner | str, check: Sequence[torch.Tensor]) -> float:
    """The share of pixels of every head, over ``check``, where ``run`` (a built runner or a path name) gives the
    label eager fp32 gives (:func:`fcnseg.inference.agreement`)."""
    return agreement(Predictor(model, runtime=run), Predictor(model, runtime="eager"), check)


def bench_model(
    model: nn.Module,
    *,
    size: tuple[int, int] = (375, 500),
    batch: int = 1,
    paths: Sequence[str] = ("eager",),
    runs: int = 10,
    warmup: int = 2,
    calibration: Sequence[torch.Tensor] | None = None,
    check: Sequence[torch.Tensor] | None = None,
    progress: bool = True,
    checkpoint: str | None = None,
    images: str | None = None,
    jitter: bool = True,
    sensitivity: bool = False,
) -> dict[str, Any]:
    """Time ``model`` on each of ``paths`` (``all``: every one); ``check`` inputs (default: the bench input, the
    images of ``--images`` folder ``images`` where given) measure agreement with eager fp32, on ``model`` or, where
    its argmax is one class everywhere (untrained), on :func:`jittered` weights, which are then timed too (not
    with ``jitter=False``). ``checkpoint``: where ``model`` came from, for the report. ``sensitivity``: also
    :func:`int8_sensitivity`. Speed-ups are against eager fp32 when it is among the paths."""
    paths = expand_paths(paths)
    if runs < 1 or warmup < 0 or batch < 1 or min(size) < 1:
        raise FcnsegError("--runs and --batch must be >= 1, --warmup >= 0 and --size positive")
    x = torch.randn(batch, model.in_channels, *size, generator=torch.Generator().manual_seed(0))
    given = _given_source(checkpoint, images, check)
    check = list(check) if check else [x[:1]]
    model, source = agreement_subject(model, check, given, jitter=jitter)
    calibration = list(calibration) if calibration else check
    timing = {"runs": runs, "warmup": warmup, "progress": progress, "gflop": count_gflop(model, x[:1])}
    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as workdir:
        results = [_bench_path(model, p, x, calibration, check, **timing, source=source, workdir=Path(workdir))
                   for p in paths]  # fmt: skip
    doc = _document(model, results, source, size=list(size), batch=batch, runs=runs, warmup=warmup)
    if sensitivity:
        from .runtime.choice import save_sensitivity

        doc["int8_sensitivity"] = int8_sensitivity(model, check)
        save_sensitivity(model, doc["int8_sensitivity"])  # auto-reduced keeps the costliest in float where needed
    return doc


def _document(model: nn.Module, results: list[PathResult], source: AgreementSource, **settings: Any) -> dict[str, Any]:
    eager = next((r.median_ms for r in results if r.path == "eager"), None)
    return {
        "model": (model.build_config or {}).get("name"),
        "alignment": model.alignment,
        "size": settings["size"],
        "batch": settings["batch"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": settings["runs"],
        "warmup": settings["warmup"],
        "gemm_gflop_per_s": gemm_gflops(),
        "agreement_source": {**asdict(source), "text": source.text},
        "results": [{**asdict(r), "speedup_vs_eager": eager / r.median_ms if eager else None} for r in results],
    }


def int8_sensitivity(
    model: nn.Module, calibration: Sequence[torch.Tensor], workdir: str | os.PathLike | None = None
) -> dict[str, float]:
    """For each layer that int8 quantises by default, the agreement with fp32 (on ``calibration``) when that layer
    alone is quantised, lowest first: the first layers cost the most, and are the ones to keep in float
    (``quantize_onnx(..., keep_float=float_layers(model) + [...])``). One quantisation per layer: minutes at
    full size, so calibrate on a few images."""
    import onnx

    from .runtime.onnx import exported_fp32, float_layers, int8_reduce_range, int8_source, ort_session, quantize_onnx

    with scratch_folder(workdir, "fcnseg-sensitivity-") as folder:
        reference = Predictor(model, runtime=ort_session(exported_fp32(model, folder)))
        source = int8_source(model, folder, calibration)  # the graph int8 quantises, its channels rescaled
        kept = tuple(float_layers(model))
        weights = [n.input[1] for n in onnx.load(str(source)).graph.node if n.op_type == "Conv" and len(n.input) > 1]
        layers = sorted({w.rsplit(".", 1)[0] + "." for w in weights if not w.startswith(kept)})
        cost = {}
        for layer in layers:
            others = [name for name in layers if name != layer]
            out = folder / "one-layer.int8.onnx"
            quantize_onnx(source, out, calibration, keep_float=[*kept, *others], reduce_range=int8_reduce_range())
            cost[layer.rstrip(".")] = agreement(Predictor(model, runtime=ort_session(out)), reference, calibration)
        return dict(sorted(cost.items(), key=lambda kv: kv[1]))


def format_results(doc: dict[str, Any]) -> str:
    """The text report of :func:`bench_model`'s ``doc``: the table, what agreement was measured on, and the int8
    sensitivity where it was asked for."""
    h, w = doc["size"]
    gemm = doc["gemm_gflop_per_s"]
    lines = [
        f"{doc['model']} ({doc['alignment']}), {h}x{w}, batch {doc['batch']}, {doc['threads']} threads, "
        f"median of {doc['runs']} after {doc['warmup']} warm-up; fp32 GEMM here: {gemm:.0f} GFLOP/s",
        f"{'path':<10} {'median ms':>10} {'min':>8} {'max':>8} {'vs eager':>8} {'img/s':>7} {'GFLOP':>7} "
        f"{'GFLOP/s':>8} {'of GEMM':>7} {'peak MB':>8} {'agree':>7}",
    ]
    for r in doc["results"]:
        agree = "-" if r["agreement_with_fp32"] is None else f"{100 * r['agreement_with_fp32']:.2f}%"
        speedup = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        lines.append(
            f"{r['path']:<10} {r['median_ms']:>10.1f} {r['min_ms']:>8.1f} {r['max_ms']:>8.1f} {speedup:>8} "
            f"{r['images_per_s']:>7.2f} {r['gflop_per_image']:>7.1f} {r['gflop_per_s']:>8.1f} "
            f"{100 * r['gflop_per_s'] / gemm:>6.0f}% {r['peak_mem_mb']:>8.0f} {agree:>7}"
        )
    lines.append(
        "vs eager: speed-up over eager fp32; of GEMM: GFLOP/s as a share of the GEMM rate (Winograd does fewer "
        "multiplications than it counts, so it can pass 100%); peak MB: resident memory added while the path was "
        "built and timed; agree: pixels whose argmax is eager fp32's"
    )
    return "\n".join(lines + _agreement_lines(doc))


def _agreement_lines(doc: dict[str, Any]) -> list[str]:
    source = doc["agreement_source"]
    lines = [f"agreement measured on: {source['text']}"]
    if source["reason"]:
        lines.append(f"agree -: {source['reason']}: every path would agree on 100% of the pixels, whatever it computes")
    if "int8_sensitivity" in doc:
        lines.append("int8 sensitivity: agreement with fp32 when only this layer is int8 (lowest first)")
        lines += [f"  {layer:<40} {100 * share:.2f}%" for layer, share in doc["int8_sensitivity"].items()]
    return lines


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    from .io import atomic_write

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump(doc, f, indent=2)
    except OSError as e:
        raise FcnsegError(f"--json {path}: cannot write ({e.strerror or e})") from None
