"""The bounded inference pool: a fixed number of worker threads and a bounded queue in front of them.

A request is *admitted* once its body has been read in full (a slow upload costs a connection, never a place) and
holds a :class:`Place` until it is answered *and* the last job it started has stopped; at most ``workers`` jobs run
the model at once and at most ``queue`` more admitted requests wait. Beyond that :meth:`InferencePool.admit` raises
:class:`BusyError` at once (the service answers 503 with ``Retry-After``), so a burst of uploads never piles up in
memory.

A worker thread cannot be killed, so a request's deadline (``--timeout``) and its client leaving are enforced where
the job can stop: a job whose place is cancelled before it starts is skipped, and a running one stops at its next
check (:meth:`Place.check`: between reading and inference, between tiles, before encoding the answer). The request
is answered 503 at its deadline, but its place is given back only when the job has really stopped, so the pool
never runs more than ``workers`` jobs. The CPU thread budget stays what ``predict`` uses: torch's threads are shared
out among the workers.
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

__all__ = [
    "BusyError",
    "ClientGoneError",
    "DeadlineError",
    "InferencePool",
    "JobCancelledError",
    "Place",
    "share_threads",
]

T = TypeVar("T")


class BusyError(Exception):
    """Every worker is busy and the queue is full; ``retry_after``: seconds until a place is likely free."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy (every worker and queue place taken); retry in {retry_after} s")
        self.retry_after = retry_after


class DeadlineError(Exception):
    """The request ran past the server's ``--timeout``; its job stops at its next check."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the request took longer than this server's limit of {seconds:g} s (--timeout) and was stopped; "
            "send a smaller image, or retry when the server is less busy"
        )  # fmt: skip


class ClientGoneError(Exception):
    """The client closed its connection while its request waited or ran: nobody is left to answer."""


class JobCancelledError(Exception):
    """Raised inside a job by :meth:`Place.check` once its request has timed out or its client has left."""


def share_threads(workers: int, budget: int | None = None) -> int:
    """Give each of ``workers`` concurrent inferences an equal share of the thread ``budget`` (default: torch's
    current thread count, what ``predict`` runs with); returns the threads per worker (at least 1)."""
    budget = budget or torch.get_num_threads()
    per_worker = max(1, budget // workers)
    torch.set_num_threads(per_worker)  # ONNX Runtime sessions made after this take the same count
    return per_worker


class Place:
    """One admitted request's place: held by the request until it is answered and by each of its jobs until the
    job stops; the pool counts it free when the last holder lets go."""

    def __init__(self, pool: InferencePool, timeout: float | None, gone: asyncio.Event | None) -> None:
        self._pool = pool
        self._holders = 1
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.gone = gone
        self.cancelled = threading.Event()

    def check(self) -> None:
        """Raise :class:`JobCancelledError` once the request has been given up (deadline passed or client gone)."""
        if self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline):
            self.cancelled.set()
            raise JobCancelledError

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def _hold(self) -> None:
        with self._pool._lock:
            self._holders += 1

    def _release(self) -> None:
        with self._pool._lock:
            self._holders -= 1
            if self._holders == 0:
                self._pool._admitted -= 1


def _forget(future: asyncio.Future) -> None:
    # A job whose request was given up ends in JobCancelledError (or a result nobody reads): retrieve it, so that
    # asyncio does not log it as an exception never retrieved.
    if not future.cancelled():
        future.exception()


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
        self._skipped = 0
        self._seconds = 1.0  # running mean of one job's duration, for Retry-After

    def busy(self) -> BusyError | None:
        """The refusal a request would get now (every place taken), or None; it takes no place."""
        with self._lock:
            return BusyError(self._retry_after()) if self._admitted >= self.workers + self.queue else None

    @contextlib.contextmanager
    def admit(self, timeout: float | None = None, gone: asyncio.Event | None = None) -> Iterator[Place]:
        """Hold one place (running or queued) for the block and for the jobs started in it; :class:`BusyError` when
        none is free. ``timeout``: seconds from now until the request is given up; ``gone``: set when the client
        leaves."""
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise BusyError(self._retry_after())
            self._admitted += 1
        place = Place(self, timeout, gone)
        try:
            yield place
        finally:
            place._release()

    def _retry_after(self) -> int:
        # The queue ahead drains at `workers` jobs per mean job duration.
        return max(1, math.ceil(self._seconds * (self._admitted - self.workers + 1) / self.workers))

    async def run(self, place: Place, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` on a worker thread, awaited until it ends, the request's deadline passes
        (:class:`DeadlineError`) or its client leaves (:class:`ClientGoneError`); in the last two cases the job is
        told to stop (``fn`` calls ``place.check()`` where it can stop) and keeps the place until it has."""
        loop = asyncio.get_running_loop()
        place._hold()
        job = loop.run_in_executor(self._executor, functools.partial(self._job, place, fn, *args))
        gone = asyncio.ensure_future(place.gone.wait()) if place.gone is not None else None
        done: set[asyncio.Future] = set()
        try:
            done, _ = await asyncio.wait([f for f in (job, gone) if f is not None], timeout=place.remaining(),
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:  # also when this request is cancelled (the server stopping): the job is told to stop too
            if gone is not None:
                gone.cancel()
            if job not in done:
                place.cancelled.set()
                job.add_done_callback(_forget)
        if job in done:
            with contextlib.suppress(JobCancelledError):  # the job saw the deadline a moment before this did
                return job.result()
        if place.gone is not None and place.gone.is_set():
            raise ClientGoneError
        raise DeadlineError(place.timeout or 0.0)

    def _job(self, place: Place, fn: Callable[..., T], *args: Any) -> T:
        try:
            try:
                place.check()  # given up while it waited in the queue: nothing to do
            except JobCancelledError:
                with self._lock:
                    self._skipped += 1
                raise
            return self._timed(fn, *args)
        finally:
            place._release()

    def _timed(self, fn: Callable[..., T], *args: Any) -> T:
        start = time.perf_counter()
        with self._lock:
            self._running += 1
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1
                self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - start)

    def stats(self) -> dict[str, int]:
        """Workers and queue size, how many requests hold a place and how many jobs run now, and how many jobs were
        skipped because their request had been given up (deadline or client gone) before they started."""
        with self._lock:
            return {"workers": self.workers, "queue": self.queue, "admitted": self._admitted,
                    "running": self._running, "skipped": self._skipped}  # fmt: skip

    def shutdown(self) -> None:
        """Let the running and queued jobs finish, then stop the threads."""
        self._executor.shutdown(wait=True)
