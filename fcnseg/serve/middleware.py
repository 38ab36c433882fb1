"""Two plain ASGI layers around the application: the upload size limit and the one log line per request.

:class:`UploadLimit` refuses a body over the limit with 413 *while it is read*: at once when the declared
``Content-Length`` is over it (nothing of the body is read), else as soon as the bytes received pass it (a chunked
upload), so an oversized upload never lands in memory or on disk. :class:`AccessLog` writes, when a request is
answered, its method, path, status, milliseconds and the image size the application noted in ``scope["state"]``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["AccessLog", "UploadLimit", "send_json_error"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_json_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer ``{"error": message}`` with ``status`` (the connection is closed after it: a body may be unread)."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _UploadTooLargeError(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class UploadLimit:
    """413 for a request body over ``max_bytes``, decided before or while the body is read, never after."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: int | None = None) -> str:
        limit = f"this server's limit of {self.max_bytes / 2**20:g} MB (--max-upload-mb)"
        if size is None:
            return f"upload is over {limit}; send a smaller file"
        return f"upload of {size / 2**20:.1f} MB is over {limit}; send a smaller file"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await send_json_error(send, 413, self._message(declared))
            return
        seen = {"bytes": 0, "started": False}

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_bytes:
                    raise _UploadTooLargeError
            return message

        async def watched(message: Message) -> None:
            seen["started"] = seen["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _UploadTooLargeError:
            if not seen["started"]:
                await send_json_error(send, 413, self._message())


class AccessLog:
    """One line per request on ``logger``: ``POST /predict 200 85.3 ms 640x480`` (image size: ``-`` when none)."""

    def __init__(self, app: ASGIApp, logger: logging.Logger) -> None:
        self.app = app
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = {"code": 500}  # an exception that escapes is answered 500 by the outermost layer

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            ms = (time.perf_counter() - start) * 1000
            size = state.get("image_size", "-")
            self.logger.info("%s %s %d %.1f ms %s", scope["method"], scope["path"], status["code"], ms, size)
