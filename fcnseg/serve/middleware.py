"""Two plain ASGI layers around the application: the request body, read in full within its limits, and the one log
line per request.

:class:`BodyReader` reads every request's body *before* the application sees the request, so a request takes a
place in the inference pool only once its upload is complete: a slow or silent client costs a connection, never a
place. The body must arrive within ``upload_timeout`` seconds in all and with no gap longer than ``idle_timeout``
(408 otherwise), and it may not pass ``max_bytes`` (413: at once when the declared ``Content-Length`` is over it,
else as soon as the bytes received pass it), so an oversized upload never lands in memory or on disk. The body is
spooled (in memory up to 1 MB, then to a temporary file) and handed to the application as if it arrived now. A
client that leaves during the upload is logged in one line and nothing more is done for it; one that leaves later
sets ``scope["state"]["client_gone"]``, which the pool watches.

:class:`AccessLog` writes, when a request is answered, its method, path, status, milliseconds and the image size the
application noted in ``scope["state"]``; every field has its control characters escaped, so a client cannot forge
log lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import IO, Any

__all__ = ["AccessLog", "BodyReader", "header", "printable", "send_json_error"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Refusal = tuple[int, str, dict[str, str]]  # status, one-line message, extra headers

SPOOL_IN_MEMORY = 1 << 20  # bytes of a body kept in memory; the rest goes to a temporary file
REPLAY_CHUNK = 1 << 16


async def send_json_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer ``{"error": message}`` with ``status`` (the connection is closed after it: a body may be unread)."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def printable(text: str) -> str:
    """``text`` with every control character (and the backslash) written as its escape: one log field, one line."""
    return "".join(c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii") for c in text)


class _BodyRefusedError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _ClientLeftError(Exception):
    pass


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the request header ``name`` (lower case, as ASGI gives names), or None."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    try:
        return int(header(scope, b"content-length") or "")
    except ValueError:
        return None


def _replay(body: IO[bytes], size: int, gone: asyncio.Event) -> Receive:
    """An ASGI ``receive`` that hands out the spooled ``body`` in chunks, then waits for the client to leave."""

    finished = False

    async def receive() -> Message:
        nonlocal finished
        if not finished:
            chunk = body.read(REPLAY_CHUNK)
            finished = body.tell() >= size
            return {"type": "http.request", "body": chunk, "more_body": not finished}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive


async def _watch(receive: Receive, gone: asyncio.Event) -> None:
    """Set ``gone`` when the client disconnects (or the answer is complete: the server then reports the same)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


class BodyReader:
    """Reads each request's body in full, within its size and time limits, before the application sees it.

    ``precheck(scope)`` may refuse a request from its headers alone (a full pool: 503 before any of the body is
    sent, so a client that waits for ``100 Continue`` sends nothing)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        upload_timeout: float,
        idle_timeout: float,
        precheck: Callable[[Scope], Refusal | None] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_timeout, self.idle_timeout = upload_timeout, idle_timeout
        self.precheck = precheck

    def _too_large(self, size: int | None = None) -> _BodyRefusedError:
        limit = f"this server's limit of {self.max_bytes / 2**20:g} MB (--max-upload-mb)"
        if size is None:
            return _BodyRefusedError(413, f"upload is over {limit}; send a smaller file")
        return _BodyRefusedError(413, f"upload of {size / 2**20:.1f} MB is over {limit}; send a smaller file")

    def _late(self, whole: bool) -> _BodyRefusedError:
        if whole:
            message = (f"the upload took longer than this server's limit of {self.upload_timeout:g} s "
                       "(--upload-timeout); send it faster, or a smaller file")  # fmt: skip
        else:
            message = f"the upload stalled: nothing arrived for {self.idle_timeout:g} s (--idle-timeout)"
        return _BodyRefusedError(408, message)

    async def _read(self, receive: Receive, spool: IO[bytes]) -> int:
        """Read the whole body into ``spool`` (rewound after); its size. :class:`_BodyRefusedError` or
        :class:`_ClientLeftError` when it fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.upload_timeout
        size, more = 0, True
        while more:
            wait = min(self.idle_timeout, deadline - loop.time())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except asyncio.TimeoutError:
                raise self._late(whole=wait < self.idle_timeout) from None
            if message["type"] == "http.disconnect":
                raise _ClientLeftError
            chunk, more = message.get("body", b""), message.get("more_body", False)
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            spool.write(chunk)
        spool.seek(0)
        return size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        refusal = self.precheck(scope) if self.precheck else None
        if declared is not None and declared > self.max_bytes:
            refusal = (413, str(self._too_large(declared)), {})
        if refusal:
            await send_json_error(send, refusal[0], refusal[1], refusal[2])
            return
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as body:
            size = await self._read_or_refuse(scope, receive, send, body)
            if size is None:
                return
            gone = scope["state"]["client_gone"] = asyncio.Event()
            watcher = asyncio.ensure_future(_watch(receive, gone))
            try:
                await self.app(scope, _replay(body, size, gone), send)
            finally:
                watcher.cancel()

    async def _read_or_refuse(self, scope: Scope, receive: Receive, send: Send, body: IO[bytes]) -> int | None:
        """The body's size once read; None when the request ended there (refused, or its client left)."""
        state = scope.setdefault("state", {})
        try:
            return await self._read(receive, body)
        except _BodyRefusedError as e:
            await send_json_error(send, e.status, str(e))
        except _ClientLeftError:
            state["client_left"] = "during the upload"
        except OSError as e:  # the spool could not be written (disk full, out of file descriptors)
            await send_json_error(send, 503, f"the server cannot take the upload now ({e.strerror or e}); retry later")
        return None


class AccessLog:
    """One line per request on ``logger``: ``POST /predict 200 85.3 ms 640x480`` (image size: ``-`` when none); a
    client that left before its answer: ``499`` and when it left."""

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = {"code": 0}

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            ms = (time.perf_counter() - start) * 1000
            left = state.get("client_left")
            # No answer started: the client left (499, nginx's code for it), or an exception escaped (500).
            code = status["code"] or (499 if left else 500)
            fields = [scope["method"], scope["path"], str(code), f"{ms:.1f} ms", str(state.get("image_size", "-"))]
            if left:
                fields.append(f"(client left {left})")
            self.logger.info("%s", " ".join(printable(f) for f in fields))
