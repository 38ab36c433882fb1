"""Who may use the service: the Host names it answers to, the web pages that may call it, and the API key.

:class:`Guard` is a plain ASGI layer that decides from the request's headers alone, before any of its body is read:

- **Host.** Only the names in ``allowed_hosts`` are answered (by default the loopback names and the address the
  server is bound to). A web page on another site cannot reach a server on 127.0.0.1 by pointing its own name at
  that address (DNS rebinding): its requests carry its own name, and get 400.
- **Origin.** A browser names the page a request comes from. A request from a page of another origin is refused
  (403) unless that origin is one of ``cors_origins``; those get the CORS headers that let their scripts read the
  answer, and a preflight is answered for them. Without ``cors_origins`` no CORS header is ever sent.
- **API key.** With ``api_key`` set, every request but the page itself (``/`` and ``/static/...``, which hold no
  data) must carry it, as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``; it is compared in constant time, and
  a request without it or with another gets 401.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Collection, Sequence

from .middleware import ASGIApp, Message, Receive, Scope, Send, header, send_json_error

__all__ = ["LOOPBACK_HOSTS", "Guard", "host_name"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PUBLIC_PREFIXES = ("/static/",)  # with "/" itself: the page and its files, served to anyone who may reach it
_CORS_METHODS = "GET, POST"
_CORS_HEADERS = "Authorization, Content-Type, X-API-Key"
_CORS_EXPOSED = "Content-Disposition, Retry-After, X-Image-Size, X-Inference-Ms"


def host_name(value: str) -> str:
    """The host of a ``Host`` header or of an origin's authority: lower case, without port, brackets or final dot;
    "" (a name no server answers to) when anything but a port follows the host (``[::1]evil.example``)."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 address, [::1]:8000
        host, bracket, rest = value[1:].partition("]")
        return host if bracket and (not rest or re.fullmatch(r":[0-9]{1,5}", rest)) else ""
    if value.count(":") == 1:
        value, _, port = value.partition(":")
        if not re.fullmatch(r"[0-9]{1,5}", port):
            return ""
    return value.rstrip(".")


def _authority(origin: str) -> str:
    """``https://example.org:8443`` -> ``example.org:8443`` (lower case)."""
    return origin.partition("://")[2].lower()


def _given_key(scope: Scope) -> str | None:
    key = header(scope, b"x-api-key")
    if key is not None:
        return key.strip()
    scheme, _, token = (header(scope, b"authorization") or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class Guard:
    """Host check, cross-origin policy and API key, decided before the request's body is read (see the module)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Collection[str] | None = None,
        api_key: str | None = None,
        cors_origins: Sequence[str] = (),
    ) -> None:
        self.app = app
        # None or "*" among them: any Host (behind a proxy that checks it, say).
        self.hosts = None if allowed_hosts is None or "*" in allowed_hosts else {host_name(h) for h in allowed_hosts}
        self.key = api_key.encode() if api_key else None
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    def _refusal(self, scope: Scope, origin: str | None, preflight: bool) -> tuple[int, str, dict[str, str]] | None:
        host = header(scope, b"host")
        if self.hosts is not None and (host is None or host_name(host) not in self.hosts):
            named = f"Host {host!r} is not" if host is not None else "a request without a Host header is not"
            name = host_name(host or "")
            hint = f"; start the server with --allowed-hosts {name} to accept it" if name else ""
            return 400, f"{named} a name this server answers to{hint}", {}
        if origin is not None and origin.lower() not in self.origins and _authority(origin) != (host or "").lower():
            return 403, (f"a request from the web page origin {origin!r} is refused; start the server with "
                         f"--cors-origin {origin} to allow that site's pages to call it"), {}  # fmt: skip
        if self.key is None or preflight or self._public(scope):  # a preflight never carries the key
            return None
        given = _given_key(scope)
        if given is None:
            return 401, ("this server needs an API key: send it in the X-API-Key header (or Authorization: Bearer "
                         "KEY)"), {"WWW-Authenticate": 'Bearer realm="fcnseg"'}  # fmt: skip
        if not hmac.compare_digest(given.encode(), self.key):
            return 401, "the API key sent is not this server's", {"WWW-Authenticate": 'Bearer realm="fcnseg"'}
        return None

    @staticmethod
    def _public(scope: Scope) -> bool:
        path = scope.get("path", "")
        return scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith(PUBLIC_PREFIXES))

    def _cors(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        if origin is None or origin.lower() not in self.origins:
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", _CORS_EXPOSED.encode())]  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = header(scope, b"origin")
        cors = self._cors(origin)
        preflight = bool(cors) and self._preflight(scope)
        refusal = self._refusal(scope, origin, preflight)

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start" and cors:
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        if refusal is not None:
            await send_json_error(with_cors, *refusal)
        elif preflight:
            await _answer_preflight(with_cors)
        else:
            await self.app(scope, receive, with_cors)

    @staticmethod
    def _preflight(scope: Scope) -> bool:
        return scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method") is not None


async def _answer_preflight(send: Send) -> None:
    """The answer to an allowed origin's preflight: the methods and headers its scripts may use, for 10 minutes."""
    headers = [(b"access-control-allow-methods", _CORS_METHODS.encode()),
               (b"access-control-allow-headers", _CORS_HEADERS.encode()), (b"access-control-max-age", b"600"),
               (b"content-length", b"0")]  # fmt: skip
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
