"""Wall-clock timing of a callable: the one timing loop of the package (kernel measurement, bench, GEMM rate)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable


def time_ms(fn: Callable[[], object], runs: int, warmup: int = 0, *, progress: str | None = None) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn``, after ``warmup`` untimed ones. ``progress``: the label of
    a progress bar on stderr (none by default)."""
    for _ in range(warmup):
        fn()
    steps = range(runs)
    if progress is not None:
        from tqdm import tqdm

        steps = tqdm(steps, desc=progress, file=sys.stderr, leave=False)
    times = []
    for _ in steps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 0) -> float:
    """The median of :func:`time_ms`."""
    return statistics.median(time_ms(fn, runs, warmup))
