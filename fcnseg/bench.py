"""``fcnseg bench``: latency, throughput, GFLOP and peak memory of a model on each execution path.

Every path runs the same input after its own warm-up; the figures are the median, min and max of N timed runs.
GFLOP per image comes from torch's FlopCounterMode on the eager model (a multiply-add counts 2); memory is the
peak resident set size above the level before the path was built, sampled every 5 ms.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FcnsegError
from .models.complexity import count_gflop
from .runtime import PATHS, agreement, make_runner


def expand_paths(paths: Sequence[str]) -> list[str]:
    """``paths`` checked, with ``all`` standing for every path of :data:`~fcnseg.runtime.PATHS` (eager first, the
    reference of the speed-ups); a path named twice is timed once."""
    out: list[str] = []
    for p in paths:
        if p != "all" and p not in PATHS:
            raise FcnsegError(f"--paths {p!r}: expected one of {', '.join(PATHS)}, or all")
        for name in PATHS if p == "all" else [p]:
            if name not in out:
                out.append(name)
    return out


def gemm_gflops(n: int = 2048, runs: int = 5) -> float:
    """This machine's fp32 matrix-product rate now (GFLOP/s, median of ``runs`` n x n products): the ceiling a
    path's convolutions are compared with."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


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


def time_runs(run, x: torch.Tensor, runs: int, warmup: int, progress: bool, label: str) -> list[float]:
    from tqdm import tqdm

    for _ in range(warmup):
        run(x)
    times = []
    for _ in tqdm(range(runs), desc=label, disable=not progress, file=sys.stderr, leave=False):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000)
    return times


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
    reference: Callable[[torch.Tensor], torch.Tensor],
) -> PathResult:
    """One execution path: built (its time and memory counted), timed on ``x``, compared with ``reference`` (eager
    fp32) on ``check``."""
    gc.collect()  # the previous path's garbage goes now, not while this one's memory is measured
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        run = make_runner(model, path, calibration=calibration)
        build = time.perf_counter() - t0
        times = time_runs(run, x, runs, warmup, progress, path)
    median = statistics.median(times)
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
        agreement_with_fp32=None if path == "eager" else agreement(run, reference, check, model),
    )


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
) -> dict[str, Any]:
    """Time ``model`` on each of ``paths`` (``all``: every one); ``check`` inputs (default: the bench input)
    measure agreement. Speed-ups are against eager fp32 when it is among the paths."""
    paths = expand_paths(paths)
    if runs < 1 or warmup < 0 or batch < 1 or min(size) < 1:
        raise FcnsegError("--runs and --batch must be >= 1, --warmup >= 0 and --size positive")
    x = torch.randn(batch, getattr(model, "in_channels", 3), *size, generator=torch.Generator().manual_seed(0))
    gflop = count_gflop(model, x[:1])
    reference = make_runner(model, "eager")
    check = list(check) if check else [x[:1]]
    calibration = list(calibration) if calibration else check
    timing = {"runs": runs, "warmup": warmup, "progress": progress, "gflop": gflop, "reference": reference}
    results = [_bench_path(model, p, x, calibration, check, **timing) for p in paths]
    eager = next((r.median_ms for r in results if r.path == "eager"), None)
    return {
        "model": getattr(model, "build_config", {}).get("name"),
        "alignment": getattr(model, "alignment", None),
        "size": list(size),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": runs,
        "warmup": warmup,
        "gemm_gflop_per_s": gemm_gflops(),
        "results": [{**asdict(r), "speedup_vs_eager": eager / r.median_ms if eager else None} for r in results],
    }


def format_results(doc: dict[str, Any]) -> str:
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
        "built and timed"
    )
    return "\n".join(lines)


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    from .io import atomic_write

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            json.dump(doc, f, indent=2)
    except OSError as e:
        raise FcnsegError(f"--json {path}: cannot write ({e.strerror or e})") from None
