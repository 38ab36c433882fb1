"""Helpers of the serve tests (and of ``docs/serve_screenshot.py``): tiny models with known answers, image bytes,
bad files, and a real ``fcnseg serve`` process.

Import them from here (``from tests.serve.serving import ...``).
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fcnseg
from tests.helpers import TINY, randomise

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium and chromium-driver (.ci/run installs them)
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# The red detector's classes and colours (chosen apart from the photo's own colours).
RED_CLASSES = ["background", "red"]
RED_PALETTE = [[20, 120, 220], [250, 200, 0]]


def random_checkpoint(path: Path, *, classes: int = 5, seed: int = 0, **kwargs) -> Path:
    """A tiny FCN-8s with random weights (masks of several classes on noise), saved with class names."""
    model = randomise(fcnseg.get_model("fcn8s", num_classes=classes, **TINY, **kwargs), seed=seed).eval()
    names = [f"thing{k}" for k in range(classes)]
    return fcnseg.save_checkpoint(model, path, classes=names, extra={"mean_iu": 0.625, "iteration": 40})


def red_detector() -> nn.Module:
    """A tiny FCN-32s whose answer is known: class 1 ("red") where the picture's red channel is high, class 0
    elsewhere. Every convolution passes channel 0 (red) straight through (a 1 at the centre tap, zero bias), max
    pooling and ReLU keep it, and the score layer compares it with a threshold (class 0's bias)."""
    model = fcnseg.get_model("fcn32s", num_classes=2, **TINY).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module) is nn.Conv2d:
                module.weight.zero_()
                module.bias.zero_()
                kh, kw = module.kernel_size
                module.weight[0, 0, kh // 2, kw // 2] = 1.0
        score = model.score_heads["out"].score_fr
        score.weight.zero_()
        score.weight[1, 0] = 1.0
        score.bias.copy_(torch.tensor([0.5, 0.0]))
    return model


def red_checkpoint(path: Path) -> Path:
    return fcnseg.save_checkpoint(red_detector(), path, classes=RED_CLASSES, palette=RED_PALETTE)


def red_photo(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A noisy picture: red on the left half, blue-grey on the right (the red detector's two regions)."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    left = width // 2
    img[:, :left] = np.stack([rng.integers(200, 256, (height, left)), rng.integers(0, 80, (height, left)),
                              rng.integers(0, 80, (height, left))], axis=-1)  # fmt: skip
    right = width - left
    img[:, left:] = np.stack([rng.integers(0, 60, (height, right)), rng.integers(60, 140, (height, right)),
                              rng.integers(150, 256, (height, right))], axis=-1)  # fmt: skip
    return img


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **params)
    return buf.getvalue()


def rotated_jpeg(array: np.ndarray) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (a viewer turns it 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(array, "JPEG", quality=95, exif=exif.tobytes())


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A decompression bomb: about 100 bytes whose PNG header claims 900 megapixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def grey16_png(width: int, height: int) -> bytes:
    """A valid 16-bit greyscale PNG of zeros (depth as a fusion net takes it), compressed as it is written: a
    9000 x 9000 one is 160 MB of pixels in about 160 KB, without 160 MB in this process."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * width)  # filter byte 0, then the row's samples
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@contextlib.contextmanager
def client_for(model: str | Path, *flags: str) -> Iterator:
    """FastAPI's TestClient over the application ``fcnseg serve MODEL FLAGS`` builds (the same loading, runner,
    tiling and limits), its lifespan running for the block."""
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    with warnings.catch_warnings():
        # Starlette's TestClient prefers httpx2 now and warns about httpx; both work.
        warnings.filterwarnings("ignore", message=".*httpx2")
        from fastapi.testclient import TestClient

    from fcnseg.cli import build_parser
    from fcnseg.cli.serve import build_service
    from fcnseg.serve.app import create_app

    args = build_parser().parse_args(["serve", str(model), *flags])
    service = build_service(args)
    # A Host name the server answers to (TestClient's own, "testserver", is not one).
    with TestClient(create_app(service), base_url="http://127.0.0.1") as client:
        client.service = service
        yield client


@contextlib.contextmanager
def live(app) -> Iterator[tuple[str, int]]:
    """``app`` under uvicorn on a free loopback port, in a thread of this process: (host, port) for raw sockets."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        yield sock.getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


# ------------------------------------------------------------------------------------------- a real server


@dataclass
class Server:
    """A running ``fcnseg serve`` process: its base URL and every line it wrote on stderr so far."""

    process: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)

    def log(self) -> str:
        return "\n".join(self.lines)


def _drain(stream, lines: list[str], found: queue.Queue) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        match = re.search(r"on (http://[\d.]+:\d+/) ", line)
        if match:
            found.put(match.group(1))
    found.put(None)


def stop(server: Server, timeout: float = 30) -> int:
    """Ctrl-C (SIGINT) the server and wait for it to exit; its exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
    try:
        return server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        return server.process.wait()


@contextlib.contextmanager
def serving(
    model: str | Path, *flags: str, timeout: float = 90, env: dict[str, str] | None = None, preexec_fn=None
) -> Iterator[Server]:
    """``python -m fcnseg serve MODEL --port 0 FLAGS`` from this checkout, until the block ends (then Ctrl-C).
    ``env``: variables to set besides this process's; ``preexec_fn``: run in the child before it starts (limits)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    cmd = [sys.executable, "-m", "fcnseg", "serve", str(model), "--port", "0", *flags]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=preexec_fn)  # fmt: skip
    lines: list[str] = []
    found: queue.Queue = queue.Queue()
    threading.Thread(target=_drain, args=(process.stderr, lines, found), daemon=True).start()
    try:
        url = found.get(timeout=timeout)
    except queue.Empty:
        url = None
    server = Server(process, url or "", lines)
    try:
        if url is None:
            raise RuntimeError(f"fcnseg serve did not start:\n{server.log()}")
        yield server
    finally:
        stop(server)


def until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends on ``sock`` until it closes the connection (a reset after the answer counts as
    closed, no error)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def wait_for(predicate, timeout: float = 20, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true; that value (AssertionError after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")


# ------------------------------------------------------------------------------------------- a real browser


def have_chromium() -> bool:
    return CHROMIUM.is_file() and CHROMEDRIVER.is_file()


@contextlib.contextmanager
def chromium(width: int = 1180, height: int = 820) -> Iterator:
    """Headless Chromium driven by selenium through the system's chromedriver (nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service as DriverService

    options = Options()
    options.binary_location = str(CHROMIUM)
    flags = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"]
    for arg in (*flags, f"--window-size={width},{height}", "--force-device-scale-factor=1", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
