"""Connections under uvicorn: a cap on how many are open, a deadline for each request's headers, and a listening
socket that survives running out of file descriptors without flooding the log.

uvicorn's HTTP/1.1 protocol (h11) starts no timer until a first answer has been sent, so a client that connects
and sends nothing, or half a request line, holds its connection for ever; and its ``limit_concurrency`` refuses
*requests* beyond the limit, never connections. :func:`guarded_protocol` makes a subclass that refuses a connection
beyond ``max_connections`` at once (a one-line JSON 503, then close) and closes one whose request headers have not
all arrived ``idle_timeout`` seconds after it opened or after its previous answer (408 when part of them came).
Request bodies are timed by :class:`~fcnseg.serve.middleware.BodyReader`.

When the process runs out of file descriptors anyway, asyncio's accept loop (Python 3.11) logs one traceback per
failed ``accept()`` and retries as many times as the listen backlog allows, each retry scheduling more: hundreds
of thousands of tracebacks a minute. :class:`Listener` lets one failure through per pause, and
:func:`new_event_loop`'s exception handler writes it as one line, at most every 10 seconds.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import FcnsegError

__all__ = ["Listener", "connection_limits", "guarded_protocol", "new_event_loop"]

LOG = logging.getLogger("fcnseg.serve")
FDS_PER_CONNECTION = 2  # its socket, and the temporary file of an upload over 1 MB
FDS_PER_PLACE = 8  # an admitted request's multipart files and the files of its segmentation
FD_MARGIN = 32  # logging, imports, the model's files, ...
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Throttled:
    """Log a warning at most every ``every`` seconds, counting the ones held back."""

    def __init__(self, every: float = 10.0) -> None:
        self.every, self.last, self.held = every, float("-inf"), 0

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.held += 1
            return
        more = f" ({self.held} more like it in the last {now - self.last:.0f} s)" if self.held else ""
        LOG.warning("%s%s", message, more)
        self.last, self.held = now, 0


def _raw_answer(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer ``{"error": message}`` that closes the connection, written without h11 (no request
    has been parsed on the connection)."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")  # fmt: skip
    return head.encode("ascii") + body


class _GuardedH11Protocol(H11Protocol):
    idle_timeout: float = 10.0
    max_connections: int = 256
    refusals = _Throttled()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False
        if len(self.connections) > self.max_connections:
            self.refusals(f"refusing connections: {self.max_connections} are open (--max-connections)")
            transport.write(_raw_answer(503, "Service Unavailable", f"the server has {self.max_connections} "
                                        "connections open, its limit; retry in a moment"))  # fmt: skip
            transport.close()
            return
        self._arm()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._partial = False
        self._header_timer = self.loop.call_later(self.idle_timeout, self._headers_late)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_headers():
            return
        if self._partial:  # part of a request came: say why it ends; an idle connection just closes
            message = f"the request headers did not all arrive within {self.idle_timeout:g} s (--idle-timeout)"
            self.transport.write(_raw_answer(408, "Request Timeout", message))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_headers():
            self._partial = True
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_headers():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


# What the subclass relies on in uvicorn's h11 protocol (its methods, and names its __init__ and connection_made
# set): checked when the server starts, so that a uvicorn release that renames them fails in one line instead of
# quietly serving without the cap and the deadline.
_RELIED_ON = ("connection_made", "connection_lost", "data_received", "on_response_complete")
_RELIED_ON_NAMES = ("self.connections", "self.cycle", "self.loop", "self.transport", "response_complete")


def check_uvicorn(protocol: type = H11Protocol) -> None:
    """An :class:`FcnsegError` naming the installed uvicorn when its h11 protocol lacks what the guard relies on."""
    import inspect

    import uvicorn

    try:
        source = inspect.getsource(inspect.getmodule(protocol))
    except (OSError, TypeError):
        source = ""
    missing = [m for m in _RELIED_ON if not callable(getattr(protocol, m, None))]
    missing += [n for n in _RELIED_ON_NAMES if source and n not in source]
    if missing:
        raise FcnsegError(
            f"uvicorn {uvicorn.__version__}: its h11 protocol has no {', '.join(missing)}, which fcnseg serve's "
            "connection cap and header deadline rely on; expected a uvicorn that has them (tested with 0.55)"
        )


def guarded_protocol(idle_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection cap and a deadline for request headers (see the module)."""
    check_uvicorn()
    attributes = {"idle_timeout": idle_timeout, "max_connections": max_connections, "refusals": _Throttled()}
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), attributes)


def connection_limits(requested: int, places: int, backlog: int) -> tuple[int, int]:
    """(connections, accept burst): ``requested`` connections and a burst of ``backlog``, or fewer of both where the
    open-file limit (``ulimit -n``) could not hold them beside what the process has open now and what ``places``
    admitted requests may open. The burst counts: asyncio accepts up to that many connections at once, before any of
    them can be refused."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return requested, backlog
    if soft == resource.RLIM_INFINITY:
        return requested, backlog
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    spare = soft - open_now - FD_MARGIN - FDS_PER_PLACE * places
    burst = min(backlog, max(1, spare // 4))
    return min(requested, (spare - burst) // FDS_PER_CONNECTION), burst


class Listener(socket.socket):
    """A listening socket whose ``accept`` lets one out-of-descriptors failure through per half second: asyncio then
    pauses accepting for a second (as it means to) instead of failing again for every pending connection.

    asyncio uses one number for the kernel's queue of connections waiting to be accepted and for how many it accepts
    at once; here the queue keeps ``queue`` (it costs no descriptor), whatever smaller burst is asked for."""

    def __init__(self, *args: Any, queue: int = 128, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._quiet_until = 0.0
        self._queue = queue

    def listen(self, backlog: int = 0) -> None:
        super().listen(max(backlog, self._queue))

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() < self._quiet_until:
            raise BlockingIOError(errno.EAGAIN, "pausing after running out of file descriptors")
        try:
            return super().accept()
        except OSError as e:
            if e.errno in _OUT_OF_RESOURCES:
                self._quiet_until = time.monotonic() + 0.5
            raise


_accept_failures = _Throttled()


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    error = context.get("exception")
    if isinstance(error, OSError) and error.errno in _OUT_OF_RESOURCES:
        _accept_failures(f"cannot accept connections: {error.strerror} (ulimit -n); retrying every second")
        return
    loop.default_exception_handler(context)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """asyncio's event loop, its exception handler writing running out of descriptors as one throttled line
    (uvicorn's ``loop`` setting takes this as a loop factory)."""
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(_exception_handler)
    return loop
