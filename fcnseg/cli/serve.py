"""``fcnseg serve``: a segmentation service and web page over one checkpoint or published weights.

The model is loaded once; requests run on a bounded pool of worker threads and get what ``fcnseg predict`` would
write (the same reading, runtime, tiling and PNG bytes). One log line per request; Ctrl-C lets the requests in
flight finish, then stops. What a client may cost is bounded: connections (``--max-connections``, and the time
to send headers and body: ``--idle-timeout``, ``--upload-timeout``), the upload (``--max-upload-mb``), the image
(``--max-pixels``, counted as the padded area the model computes on, also for a batch's images run together:
``--batch``) and the time a request holds its place (``--timeout``). Who may call it: the Host names it answers
to (``--allowed-hosts``), the web pages of other sites (``--cors-origin``) and an optional API key (``--api-key``
or ``FCNSEG_API_KEY``).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import math
import os
import socket
import sys
from pathlib import Path

from ..errors import FcnsegError
from ._common import (
    RUNTIME_HELP,
    add_augmentation,
    add_batch,
    add_calibration,
    add_device,
    add_runtime,
    add_sha256,
    add_tiling,
    add_weights_file,
    check_batch,
    predictor_from_flags,
)

EXTRA_HINT = "fcnseg serve needs FastAPI, uvicorn and python-multipart: pip install 'fcnseg[serve]'"
KEY_VARIABLE = "FCNSEG_API_KEY"
BACKLOG = 128  # connections the kernel holds before they are accepted (no descriptor yet); more must retry
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers larger than this are refused (400)


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-pixels", type=int, default=None, metavar="N",
        help="refuse (413) images whose padded area, as the model computes on them, is larger; with --tile, the "
        "image's own area (default: 8388608, 8 MP: 4096 x 2048 in aligned mode)",
    )  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="N", help="refuse larger uploads (default: 20)")
    add_batch(
        p, "/predict/batch runs a request's images of one size as one forward pass of up to N images, whose padded "
        "areas together stay within --max-pixels (default: 8)", default=8,
    )  # fmt: skip
    p.add_argument(
        "--workers-threads", type=int, default=1, metavar="N",
        help="inference worker threads; torch's threads are shared out among them (default: 1)",
    )  # fmt: skip
    p.add_argument("--queue", type=int, default=8, metavar="N", help="requests that may wait for a worker (default: 8)")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="S",
        help="seconds a request may take once its upload is in, waiting included; then 503, and its work stops at "
        "its next step (a tile, or the end of the inference) (default: 60)",
    )  # fmt: skip
    p.add_argument(
        "--upload-timeout", type=float, default=60.0, metavar="S",
        help="seconds for a whole request body to arrive; then 408 (default: 60)",
    )  # fmt: skip
    p.add_argument(
        "--idle-timeout", type=float, default=10.0, metavar="S",
        help="seconds a client may stay silent inside a body, and may take to send its request headers; an idle "
        "connection is closed after it (default: 10)",
    )  # fmt: skip
    p.add_argument(
        "--max-connections", type=int, default=256, metavar="N",
        help="open connections at most, fewer if the open-file limit (ulimit -n) is low; more are refused (503) "
        "(default: 256)",
    )  # fmt: skip


def _add_access(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allowed-hosts", action="append", default=None, metavar="NAMES",
        help="comma-separated Host names to answer to besides the loopback names and --host (e.g. the name clients "
        "or a reverse proxy use); '*': any. Others get 400, which stops DNS rebinding",
    )  # fmt: skip
    p.add_argument(
        "--api-key", default=None, metavar="KEY",
        help=f"require this key (header X-API-Key, or Authorization: Bearer) on every request but the page; "
        f"default: the environment variable {KEY_VARIABLE}, which other users cannot see in the process list",
    )  # fmt: skip
    p.add_argument(
        "--cors-origin", action="append", default=None, metavar="ORIGIN",
        help="a web origin (https://app.example.org) whose pages may call the API, repeatable; default: none, and "
        "requests from other sites' pages get 403",
    )  # fmt: skip
    p.add_argument(
        "--docs", action="store_true",
        help="serve FastAPI's interactive /docs page (its scripts come from a CDN); /openapi.json is always served",
    )  # fmt: skip


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP: a JSON API and a web page",
        usage="fcnseg serve (CHECKPOINT | WEIGHTS_NAME) [--host 127.0.0.1] [--port 8000] [options]",
    )
    p.add_argument("model", metavar="CHECKPOINT|WEIGHTS_NAME", help="a checkpoint file or published weights' name")
    add_weights_file(p, "a local copy of the published weights file (no download)")
    add_sha256(p, "refuse the checkpoint or weights file unless its SHA-256 is HEX")
    p.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; another needs --api-key and TLS in front)",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free port)")
    add_device(p, "cpu", "torch device (default: cpu)")
    add_runtime(p, RUNTIME_HELP + "; the int8 paths and auto-reduced need --calibration")
    add_calibration(p, "none: required for onnx-int8, openvino-int8 and auto-reduced")
    add_tiling(p)
    add_augmentation(p)
    _add_limits(p)
    _add_access(p)
    p.set_defaults(func=run)
    return p


def _check_numbers(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise FcnsegError(f"--port {args.port}: expected 0 to 65535")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise FcnsegError(f"--max-pixels {args.max_pixels}: expected a positive number of pixels")
    check_batch(args.batch)
    if not 0 < args.max_upload_mb < math.inf:
        raise FcnsegError(f"--max-upload-mb {args.max_upload_mb:g}: expected a positive size")
    if args.workers_threads < 1:
        raise FcnsegError(f"--workers-threads {args.workers_threads}: expected at least 1")
    if args.queue < 0:
        raise FcnsegError(f"--queue {args.queue}: expected 0 or more")
    for flag in ("timeout", "upload_timeout", "idle_timeout"):
        if not 0 < getattr(args, flag) < math.inf:  # every limit is finite: inf would bound nothing
            raise FcnsegError(
                f"--{flag.replace('_', '-')} {getattr(args, flag):g}: expected a positive number of seconds"
            )
    if args.max_connections < 1:
        raise FcnsegError(f"--max-connections {args.max_connections}: expected at least 1")


def _check_access(args: argparse.Namespace) -> None:
    if args.api_key is not None and (len(args.api_key) < 8 or not args.api_key.isascii() or not all(
            c.isprintable() and not c.isspace() for c in args.api_key)):  # fmt: skip
        raise FcnsegError(f"--api-key (or {KEY_VARIABLE}): expected at least 8 printable ASCII characters, no spaces")
    for origin in args.cors_origin or []:
        scheme, sep, rest = origin.partition("://")
        if origin == "*" or scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
            raise FcnsegError(f"--cors-origin {origin!r}: expected a web origin, scheme and host (and port), such as "
                              "https://app.example.org; name each site, no wildcard")  # fmt: skip
    for names in args.allowed_hosts or []:
        if not all(name.strip() for name in names.split(",")):
            raise FcnsegError(f"--allowed-hosts {names!r}: expected comma-separated host names")


def _check_flags(args: argparse.Namespace) -> None:
    if args.api_key is None:
        args.api_key = os.environ.get(KEY_VARIABLE) or None
    _check_numbers(args)
    _check_access(args)
    if args.runtime in ("onnx-int8", "openvino-int8", "auto-reduced") and not args.calibration:
        raise FcnsegError(f"--runtime {args.runtime} calibrates and checks int8 on your images: give --calibration DIR")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a taken port is one clear line and port 0 gets a free one."""
    from ..serve.protocol import Listener

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = Listener(family, socket.SOCK_STREAM, queue=BACKLOG)
    except OSError as e:
        raise FcnsegError(f"--host {host}: cannot listen there ({e.strerror or e})") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)  # connections wait in the backlog until the server starts, rather than being refused
    except OSError as e:
        sock.close()
        raise FcnsegError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    """The Host names to answer to: the loopback names, the address listened on, and ``--allowed-hosts``."""
    from ..serve.guard import LOOPBACK_HOSTS

    extra = [name.strip() for names in args.allowed_hosts or [] for name in names.split(",")]
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, args.host, *extra]))


def _tile_fits(model, args: argparse.Namespace, max_pixels: int) -> None:
    from ..serve.limits import tile_cost
    from ..tiling import tile_windows

    tile_windows(1, 1, args.tile, args.overlap, align=model.stride)  # a bad --tile / --overlap fails now
    rows, cols = tile_cost(model, args.tile)
    if rows * cols > max_pixels:
        raise FcnsegError(
            f"--tile {args.tile}: a tile is computed on as up to {cols}x{rows} = {rows * cols:,} pixels with the "
            f"model's padding, above --max-pixels {max_pixels:,}; use a smaller --tile or a larger --max-pixels"
        )


def build_service(args: argparse.Namespace):
    """Load the model once and build what the application serves."""
    from ..hub import load
    from ..serve.app import Service
    from ..serve.pool import InferencePool, share_threads
    from ..serve.segment import DEFAULT_MAX_PIXELS, Segmenter, recorded_metrics

    model = load(args.model, map_location=args.device, file=args.weights_file, sha256=args.sha256)
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    if args.tile:
        _tile_fits(model, args, max_pixels)
    pool = InferencePool(args.workers_threads, args.queue)
    threads = share_threads(args.workers_threads)  # before the runner: ONNX Runtime takes the count when built
    predictor = predictor_from_flags(args, model)
    predictor.runner(_first_input(predictor))  # built (and auto measured) now, once: not by the first requests
    segmenter = Segmenter(predictor, max_pixels=max_pixels, batch=args.batch)
    name = Path(args.model).name if Path(args.model).exists() else args.model  # no server paths in answers
    hosts = allowed_hosts(args)
    return Service(
        segmenter, pool, name=name, runtime=predictor.path, metrics=recorded_metrics(args.model),
        max_upload_mb=args.max_upload_mb, threads=threads, timeout=args.timeout, upload_timeout=args.upload_timeout,
        idle_timeout=args.idle_timeout, allowed_hosts=None if "*" in hosts else hosts, api_key=args.api_key,
        cors_origins=tuple(args.cors_origin or ()), docs=args.docs,
    )  # fmt: skip


def _first_input(predictor):
    """What the path is built and ``auto`` measured on: the first calibration image, else a seeded 375 x 500
    noise image (the size of a PASCAL VOC photo)."""
    import torch

    if predictor.calibration:
        return predictor.inputs(predictor.calibration[:1])[0][None]
    return torch.randn(1, predictor.model.in_channels, 375, 500, generator=torch.Generator().manual_seed(0))


def _log_config() -> dict:
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG, "loggers": dict(LOGGING_CONFIG["loggers"])}
    config["loggers"]["fcnseg.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _connections(args: argparse.Namespace) -> tuple[int, int]:
    """(connections, accept burst): --max-connections and the listen backlog, lowered to what the open-file limit
    holds (said on stderr); an error when that is almost nothing."""
    from ..serve.protocol import connection_limits

    cap, backlog = connection_limits(args.max_connections, args.workers_threads + args.queue, BACKLOG)
    if cap < 4:
        raise FcnsegError("the open-file limit (ulimit -n) leaves room for almost no connections; raise it "
                          "(ulimit -n 4096) or lower --queue")  # fmt: skip
    if cap < args.max_connections:
        print(f"fcnseg serve: at most {cap} connections: the open-file limit (ulimit -n) allows no more",
              file=sys.stderr)  # fmt: skip
    return cap, backlog


def _uvicorn_config(app, args: argparse.Namespace, limits: tuple[int, int]):
    import uvicorn

    from ..serve.protocol import guarded_protocol

    connections, backlog = limits
    return uvicorn.Config(
        app, log_config=_log_config(), access_log=False, timeout_graceful_shutdown=None, ws="none", lifespan="on",
        http=guarded_protocol(args.idle_timeout, connections), loop="fcnseg.serve.protocol:new_event_loop",
        # The protocol refuses connections beyond the cap first, in JSON; uvicorn's own limit is the backstop.
        limit_concurrency=connections + 1, timeout_keep_alive=min(5.0, args.idle_timeout), backlog=backlog,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )  # fmt: skip


def _warn_if_open(args: argparse.Namespace, port: int) -> None:
    if _is_loopback(args.host):
        return
    if not args.api_key:
        message = (f"listening on {args.host} with no API key: anyone who can reach port {port} can use this model; "
                   f"set {KEY_VARIABLE}, and put TLS in front (see the README)")  # fmt: skip
        print(f"fcnseg serve: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    try:
        import uvicorn

        from ..serve.app import create_app
    except ImportError as e:
        raise FcnsegError(f"{EXTRA_HINT} ({e.name} is missing)") from None
    sock = _bind(args.host, args.port)  # a taken port fails before the model is loaded
    host, port = sock.getsockname()[:2]
    try:
        service = build_service(args)
        config = _uvicorn_config(create_app(service), args, _connections(args))
    except BaseException:
        sock.close()
        raise
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    api = f"{url}docs" if args.docs else f"{url}openapi.json"
    print(f"fcnseg serve: {args.model} on {url} (API: {api}; Ctrl-C stops)", file=sys.stderr, flush=True)
    _warn_if_open(args, port)
    # uvicorn answers the requests in flight after a Ctrl-C, then raises it again: here it is the normal way out.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    print("fcnseg serve: stopped", file=sys.stderr, flush=True)
    return 0
