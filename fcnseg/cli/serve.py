"""``fcnseg serve``: a segmentation service and web page over one checkpoint or published weights.

The model is loaded once; requests run on a bounded pool of worker threads and get what ``fcnseg predict`` would
write (the same reading, runtime, tiling and PNG bytes). One log line per request; Ctrl-C lets the requests in
flight finish, then stops.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
from pathlib import Path

from ..errors import FcnsegError
from ._common import (
    RUNTIME_HELP,
    add_calibration,
    add_device,
    add_runtime,
    add_tiling,
    add_weights_file,
    runner_from_flags,
)

EXTRA_HINT = "fcnseg serve needs FastAPI, uvicorn and python-multipart: pip install 'fcnseg[serve]'"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP: a JSON API and a web page",
        usage="fcnseg serve (CHECKPOINT | WEIGHTS_NAME) [--host 127.0.0.1] [--port 8000] [options]",
    )
    p.add_argument("model", metavar="CHECKPOINT|WEIGHTS_NAME", help="a checkpoint file or published weights' name")
    add_weights_file(p, "a local copy of the published weights file (no download)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free port)")
    add_device(p, "cpu", "torch device (default: cpu)")
    add_runtime(p, RUNTIME_HELP + "; onnx-int8 needs --calibration")
    add_calibration(p, "none: required for onnx-int8")
    add_tiling(p)
    p.add_argument(
        "--max-pixels", type=int, default=None, metavar="N",
        help="refuse larger images with 413 unless --tile is set (default: 8388608, 8 MP)",
    )  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="N", help="refuse larger uploads (default: 20)")
    p.add_argument(
        "--workers-threads", type=int, default=1, metavar="N",
        help="inference worker threads; torch's threads are shared out among them (default: 1)",
    )  # fmt: skip
    p.add_argument("--queue", type=int, default=8, metavar="N", help="requests that may wait for a worker (default: 8)")
    p.set_defaults(func=run)
    return p


def _check_flags(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise FcnsegError(f"--port {args.port}: expected 0 to 65535")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise FcnsegError(f"--max-pixels {args.max_pixels}: expected a positive number of pixels")
    if not args.max_upload_mb > 0:
        raise FcnsegError(f"--max-upload-mb {args.max_upload_mb:g}: expected a positive size")
    if args.workers_threads < 1:
        raise FcnsegError(f"--workers-threads {args.workers_threads}: expected at least 1")
    if args.queue < 0:
        raise FcnsegError(f"--queue {args.queue}: expected 0 or more")
    if args.runtime == "onnx-int8" and not args.calibration:
        raise FcnsegError("--runtime onnx-int8 calibrates on your images: give --calibration DIR")


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a taken port is one clear line and port 0 gets a free one."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise FcnsegError(f"--host {host}: cannot listen there ({e.strerror or e})") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the server starts, rather than being refused
    except OSError as e:
        sock.close()
        raise FcnsegError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def build_service(args: argparse.Namespace):
    """Load the model once and build what the application serves."""
    from ..hub import load
    from ..serve.app import Service
    from ..serve.pool import InferencePool, share_threads
    from ..serve.segment import DEFAULT_MAX_PIXELS, Segmenter, recorded_metrics
    from ..tiling import tile_windows

    model = load(args.model, map_location=args.device, file=args.weights_file)
    if args.tile:
        tile_windows(1, 1, args.tile, args.overlap, align=model.stride)  # a bad --tile / --overlap fails now
    pool = InferencePool(args.workers_threads, args.queue)
    threads = share_threads(args.workers_threads)  # before the runner: ONNX Runtime takes the count when built
    runner = runner_from_flags(args, model)
    max_pixels = args.max_pixels or DEFAULT_MAX_PIXELS
    segmenter = Segmenter(model, runner=runner, tile=args.tile, overlap=args.overlap, max_pixels=max_pixels)
    name = Path(args.model).name if Path(args.model).is_file() else args.model  # no server paths in answers
    return Service(
        segmenter, pool, name=name, runtime=args.runtime, metrics=recorded_metrics(args.model),
        max_upload_mb=args.max_upload_mb, threads=threads,
    )  # fmt: skip


def _log_config() -> dict:
    from uvicorn.config import LOGGING_CONFIG

    config = {**LOGGING_CONFIG, "loggers": dict(LOGGING_CONFIG["loggers"])}
    config["loggers"]["fcnseg.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


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
    except BaseException:
        sock.close()
        raise
    config = uvicorn.Config(
        create_app(service), log_config=_log_config(), access_log=False, timeout_graceful_shutdown=None,
        ws="none", lifespan="on",
    )  # fmt: skip
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    print(f"fcnseg serve: {args.model} on {url} (API: {url}docs; Ctrl-C stops)", file=sys.stderr, flush=True)
    # uvicorn answers the requests in flight after a Ctrl-C, then raises it again: here it is the normal way out.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[sock])
    print("fcnseg serve: stopped", file=sys.stderr, flush=True)
    return 0
