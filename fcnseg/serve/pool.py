"""The bounded inference pool: a fixed number of worker threads and a bounded queue in front of them.

A request is *admitted* before its body is read and keeps its place until it is answered; at most ``workers``
admitted requests run the model at once and at most ``queue`` more wait. Beyond that :meth:`InferencePool.admit`
raises :class:`BusyError` at once (the service answers 503 with ``Retry-After``), so a burst of uploads never piles up
in memory. The CPU thread budget stays what ``predict`` uses: torch's threads are shared out among the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from ..errors import FcnsegError

__all__ = ["BusyError", "InferencePool", "share_threads"]

T = TypeVar("T")


class BusyError(Exception):
    """Every worker is busy and the queue is full; ``retry_after``: seconds until a place is likely free."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy (every worker and queue place taken); retry in {retry_after} s")
        self.retry_after = retry_after


def share_threads(workers: int, budget: int | None = None) -> int:
    """Give each of ``workers`` concurrent inferences an equal share of the thread ``budget`` (default: torch's
    current thread count, what ``predict`` runs with); returns the threads per worker (at least 1)."""
    budget = budget or torch.get_num_threads()
    per_worker = max(1, budget // workers)
    torch.set_num_threads(per_worker)  # ONNX Runtime sessions made after this take the same count
    return per_worker


class InferencePool:
    """``workers`` threads running the model, ``queue`` more admitted requests waiting; :meth:`admit` then
    :meth:`run`."""

    def __init__(self, workers: int = 1, queue: int = 8) -> None:
        if workers < 1:
            raise FcnsegError(f"--workers-threads must be at least 1, got {workers}")
        if queue < 0:
            raise FcnsegError(f"--queue must be 0 or more, got {queue}")
        self.workers, self.queue = workers, queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fcnseg-infer")
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0
        self._seconds = 1.0  # running mean of one job's duration, for Retry-After

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one place (running or queued) for the block; :class:`BusyError` when none is free."""
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise BusyError(self._retry_after())
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    def _retry_after(self) -> int:
        # The queue ahead drains at `workers` jobs per mean job duration.
        return max(1, math.ceil(self._seconds * (self._admitted - self.workers + 1) / self.workers))

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread, awaited (call it inside :meth:`admit`)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self._timed, fn, *args, **kwargs))

    def _timed(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        start = time.perf_counter()
        with self._lock:
            self._running += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._running -= 1
                self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)

    def stats(self) -> dict[str, int]:
        """Workers and queue size, and how many requests are admitted and running now."""
        with self._lock:
            return {"workers": self.workers, "queue": self.queue, "admitted": self._admitted, "running": self._running}

    def shutdown(self) -> None:
        """Let the running and queued jobs finish, then stop the threads."""
        self._executor.shutdown(wait=True)
