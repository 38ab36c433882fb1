"""``fcnseg serve`` against hostile clients: each test starts the real command on a loopback port (with short
limits through its flags) and checks that what a client may cost is bounded, that who may call it is checked, and
that the server keeps answering everyone else. Every loop is bounded in count and time; all traffic goes to
127.0.0.1."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fcnseg
from tests.helpers import TINY, randomise
from tests.serve.serving import encoded, grey16_png, noise, random_checkpoint, serving, until_closed, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

KEY = "hostile-test-key-51c9"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"


# ------------------------------------------------------------------------------------------- clients


def _address(server) -> tuple[str, int]:
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    return host, int(port)


def _multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart upload of ``(field, filename, data)`` parts."""
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n\r\n'
                    .encode() + data + b"\r\n" for field, name, data in parts)  # fmt: skip
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers with lower-case names, body) of one request on a connection of its own."""
    conn = http.client.HTTPConnection(*_address(server), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def _post(server, parts: list[tuple[str, str, bytes]], path: str = "/predict", headers: dict | None = None):
    body, content_type = _multipart(parts)
    return _request(server, "POST", path, body, {"Content-Type": content_type, **(headers or {})})


def _health(server, headers: dict | None = None) -> dict:
    status, _, body = _request(server, "GET", "/health", headers=headers)
    assert status == 200, body
    return json.loads(body)


def _error_of(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def _log_lines(server, pattern: str) -> list[str]:
    return [line for line in server.lines if re.search(pattern, line)]


# ------------------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("hostile") / "tiny.pt")


@pytest.fixture(scope="module")
def limited(ckpt):
    """One worker and two queue places (three in all), short body timeouts, a 9 MP padded-area limit."""
    flags = ["--runtime", "eager", "--workers-threads", "1", "--queue", "2", "--idle-timeout", "1",
             "--upload-timeout", "3", "--timeout", "20", "--max-pixels", "9000000"]  # fmt: skip
    with serving(ckpt, *flags) as server:
        yield server


@pytest.fixture(scope="module")
def tiled(ckpt):
    """64-px tiles, a 1 s deadline, at most 10,000,000 pixels an image."""
    flags = ["--runtime", "eager", "--workers-threads", "1", "--queue", "2", "--tile", "64", "--overlap", "32",
             "--timeout", "1", "--max-pixels", "10000000"]  # fmt: skip
    with serving(ckpt, *flags) as server:
        yield server


# ------------------------------------------------------------------------------------------- slow clients


def _trickle(socks: list[socket.socket], body: bytes, stop: threading.Event) -> None:
    """One byte of ``body`` to each socket every 0.3 s (under --idle-timeout 1), never all of it; at most 40."""
    for i in range(min(40, len(body) - 1)):
        if stop.wait(0.3):
            return
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(body[i : i + 1])


def test_slow_uploads_cost_a_connection_not_a_place(limited):
    """Four clients trickle their uploads (more than the three places): normal requests are answered meanwhile,
    no place is held by the slow ones, and each slow one gets 408 at --upload-timeout. A silent body, headers that
    never end and an idle connection each end at --idle-timeout."""
    body, content_type = _multipart([("file", "a.png", encoded(noise(40, 50)))])
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    address = _address(limited)
    slow = [socket.create_connection(address, timeout=10) for _ in range(4)]
    silent, half_headers, idle = (socket.create_connection(address, timeout=10) for _ in range(3))
    for sock in [*slow, silent]:
        sock.sendall(head)
    half_headers.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    stop = threading.Event()
    trickler = threading.Thread(target=_trickle, args=(slow, body, stop))
    trickler.start()
    try:
        answers, admitted = [], []
        for _ in range(3):
            admitted.append(_health(limited)["admitted"])
            answers.append(_post(limited, [("file", "ok.png", encoded(noise(40, 50)))])[0])
        late = [_error_of(until_closed(sock, 10)) for sock in slow]
        others = [until_closed(sock, 10) for sock in (silent, half_headers, idle)]
    finally:
        stop.set()
        trickler.join(5)
        for sock in [*slow, silent, half_headers, idle]:
            sock.close()
    assert answers == [200, 200, 200] and admitted == [0, 0, 0]
    assert late == [(408, "the upload took longer than this server's limit of 3 s (--upload-timeout); send it faster, "
                          "or a smaller file")] * 4  # fmt: skip
    assert _error_of(others[0]) == (408, "the upload stalled: nothing arrived for 1 s (--idle-timeout)")
    assert _error_of(others[1]) == (408, "the request headers did not all arrive within 1 s (--idle-timeout)")
    assert others[2] == b""  # an idle connection is closed without a word


def test_a_client_leaving_mid_upload_is_one_log_line(limited):
    body, content_type = _multipart([("file", "a.png", encoded(noise(64, 64)))])
    with socket.create_connection(_address(limited), timeout=10) as sock:
        sock.sendall(f"POST /predict?left=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])  # fmt: skip
        time.sleep(0.2)
    line = wait_for(lambda: _log_lines(limited, r"POST /predict 499 "), timeout=10)
    assert re.fullmatch(r"INFO: +POST /predict 499 \d+\.\d ms - \(client left during the upload\)", line[0]), line
    assert "Traceback" not in limited.log() and "ClientDisconnect" not in limited.log()
    assert _health(limited)["status"] == "ok"


def test_the_log_escapes_control_characters(limited):
    """A path with an encoded CR LF cannot start a forged line of its own in the log."""
    status, _, _ = _request(limited, "GET", "/x%0d%0aINFO:%20%20%20%20%20POST%20/predict%20200%201.0%20ms%20forged")
    line = wait_for(lambda: _log_lines(limited, r"forged"), timeout=10)
    assert status == 404 and len(line) == 1
    assert re.fullmatch(r"INFO: +GET /x\\r\\nINFO: {5}POST /predict 200 1\.0 ms forged 404 \d+\.\d ms -", line[0]), line
    assert not any(entry.startswith("INFO:     POST /predict 200 1.0 ms forged") for entry in limited.lines)


def test_docs_is_off_unless_asked_for(limited):
    """FastAPI's /docs and /redoc pages load their scripts from a CDN: neither is served; the spec is."""
    assert [_request(limited, "GET", path)[0] for path in ("/docs", "/redoc")] == [404, 404]
    status, headers, body = _request(limited, "GET", "/openapi.json")
    assert status == 200 and "/predict/batch" in json.loads(body)["paths"]


# ------------------------------------------------------------------------------------------- what an image costs


def test_images_are_admitted_by_their_padded_area(limited):
    """A 1 x 400,000 strip is 400,000 pixels in its file but 32 x 400,000 once padded to the stride: refused, from
    its header, under a 9 MP limit."""
    status, _, body = _post(limited, [("file", "strip.png", encoded(np.zeros((1, 400_000, 3), np.uint8)))])
    assert (status, json.loads(body)) == (413, {"error": "strip.png: image is 400000x1, which the model computes on "
                                                "as 400000x32 = 12,800,000 pixels with its padding, above this "
                                                "server's limit of 9,000,000 (--max-pixels); send a smaller image, "
                                                "or start the server with --tile for large ones"})  # fmt: skip


@pytest.mark.parametrize("alignment", ["caffe", "aligned"])
def test_padded_size_is_what_the_first_layer_computes_on(alignment):
    """The padded size is the first convolution's output (a 3 x 3 filter at stride 1 keeps the size it sees): caffe
    mode's 100 px a side, aligned mode's multiple of 32."""
    from fcnseg.serve.limits import padded_size

    model = fcnseg.get_model("fcn8s", num_classes=3, alignment=alignment, **TINY).eval()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    seen = []
    handle = conv.register_forward_hook(lambda module, inputs, output: seen.append(tuple(output.shape[-2:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, 5, 70))
    handle.remove()
    assert padded_size(model, 5, 70) == seen[0] == {"caffe": (203, 268), "aligned": (32, 96)}[alignment]
    assert padded_size(model, 1, 100_000) == {"caffe": (199, 100_198), "aligned": (32, 100_000)}[alignment]


def test_a_batch_holds_at_most_64_images(limited):
    files = [("files", f"{i}.png", encoded(noise(8, 8, seed=i))) for i in range(65)]
    status, _, body = _post(limited, files, "/predict/batch")
    assert (status, json.loads(body)) == (413, {"error": "a batch holds at most 64 images; send the others in "
                                                "another request"})  # fmt: skip


def test_formats_outside_the_allowlist_get_415(limited):
    status, _, body = _post(limited, [("file", "logo.eps", EPS)])
    assert (status, json.loads(body)) == (415, {"error": "logo.eps: cannot read image (its format, EPS by its first "
                                                "bytes, is not accepted; expected PNG, JPEG, BMP, TIFF, WebP, GIF or "
                                                "PPM)"})  # fmt: skip


# ------------------------------------------------------------------------------------------- time


def _big_tiled() -> bytes:
    """3000 x 3000 in 64-px tiles: about 8,800 tiles, many seconds of work even for the tiny model."""
    return encoded(np.zeros((3000, 3000, 3), np.uint8))


def test_the_deadline_answers_503_and_the_tiles_stop(tiled):
    """Thousands of tiles: 503 at the 1 s deadline, and the place comes back as soon as the worker reaches its next
    tile, long before the tiles would have ended."""
    big = _big_tiled()
    start = time.monotonic()
    status, _, body = _post(tiled, [("file", "big.png", big)])
    answered = time.monotonic() - start
    freed = wait_for(lambda: _health(tiled)["admitted"] == 0 and time.monotonic() - start, timeout=30)
    assert (status, json.loads(body)) == (503, {"error": "the request took longer than this server's limit of 1 s "
                                                "(--timeout) and was stopped; send a smaller image, or retry when the "
                                                "server is less busy"})  # fmt: skip
    assert 1.0 <= answered < 10 and freed < answered + 3
    assert _health(tiled)["running"] == 0


def test_a_batch_past_its_deadline_keeps_the_answers_it_finished(tiled):
    """/predict/batch at the 1 s deadline: the image segmented before it keeps its answer (as /predict gives it),
    the one stopped mid-way is a 503 entry naming the limit; with nothing finished the request itself is a 503."""
    small = encoded(noise(16, 16))
    status, _, body = _post(
        tiled, [("files", "small.png", small), ("files", "big.png", _big_tiled())], "/predict/batch"
    )
    assert status == 200, body
    first, second = json.loads(body)["results"]
    alone = json.loads(_post(tiled, [("file", "small.png", small)], "/predict?format=json")[2])
    assert first["status"] == 200 and first["heads"][0]["mask_png"] == alone["heads"][0]["mask_png"]
    assert second == {"file": "big.png", "status": 503, "error": "the request took longer than this server's limit "
                      "of 1 s (--timeout) and was stopped; send a smaller image, or retry when the server is less "
                      "busy"}  # fmt: skip
    wait_for(lambda: _health(tiled)["admitted"] == 0, timeout=30)
    status, _, body = _post(
        tiled, [("files", "big.png", _big_tiled()), ("files", "small.png", small)], "/predict/batch"
    )
    assert status == 503 and "limit of 1 s (--timeout)" in json.loads(body)["error"]
    wait_for(lambda: _health(tiled)["admitted"] == 0, timeout=30)


def test_tiled_images_are_bounded_by_max_pixels(tiled):
    status, _, body = _post(tiled, [("file", "huge.png", encoded(np.zeros((3200, 3200, 3), np.uint8)))])
    assert (status, json.loads(body)) == (413, {"error": "huge.png: image is 3200x3200 = 10,240,000 pixels, above "
                                                "this server's limit of 10,000,000 (--max-pixels, tiled or not); "
                                                "send a smaller image"})  # fmt: skip


def test_work_for_a_client_that_left_is_skipped(tiled):
    """A request queued behind a long one whose client leaves is logged 499 at once, and its job never starts."""
    skipped = _health(tiled)["skipped"]
    long_one = threading.Thread(target=_post, args=(tiled, [("file", "big.png", _big_tiled())]))
    long_one.start()
    try:
        wait_for(lambda: _health(tiled)["running"] == 1, timeout=10)
        body, content_type = _multipart([("file", "small.png", encoded(noise(16, 16)))])
        with socket.create_connection(_address(tiled), timeout=10) as sock:
            sock.sendall(f"POST /predict?leaving=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            wait_for(lambda: _health(tiled)["admitted"] == 2, timeout=10)
        line = wait_for(lambda: _log_lines(tiled, r"POST /predict 499 "), timeout=10)[0]
    finally:
        long_one.join(30)
    wait_for(lambda: _health(tiled)["admitted"] == 0, timeout=30)
    # Logged when the client left, before its own 1 s deadline; its job was skipped, not run.
    ms = float(re.search(r"499 (\d+\.\d) ms - \(client left before its answer\)$", line).group(1))
    assert ms < 1000 and _health(tiled)["skipped"] == skipped + 1


def test_a_request_keeps_its_place_until_its_job_stops():
    """The pool answers at the deadline but counts the place free only when the worker thread has stopped."""
    import asyncio

    from fcnseg.serve.pool import DeadlineError, InferencePool

    pool, gate = InferencePool(1, 0), threading.Event()

    async def late() -> dict:
        with pool.admit(timeout=0.2) as place, pytest.raises(DeadlineError):
            await pool.run(place, gate.wait, 10)
        return pool.stats()

    try:
        during = asyncio.run(late())
        gate.set()
        wait_for(lambda: pool.stats()["admitted"] == 0, timeout=10)
    finally:
        gate.set()
        pool.shutdown()
    assert (during["admitted"], during["running"]) == (1, 1)  # answered, but the job still ran: its place held


# ------------------------------------------------------------------------------------------- who may call


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A fusion net (colour + depth) behind an API key (from FCNSEG_API_KEY), one extra Host name and one CORS
    origin."""
    model = randomise(fcnseg.get_model("fcn32s", num_classes=4, in_channels=4, **TINY), seed=5).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path_factory.mktemp("guarded") / "rgbd.pt")
    flags = ["--runtime", "eager", "--allowed-hosts", "seg.example.org", "--cors-origin", "http://good.example"]
    with serving(ckpt, *flags, env={"FCNSEG_API_KEY": KEY}) as server:
        yield server


def _status(server, method: str, path: str, headers: dict) -> tuple[int, str]:
    status, _, body = _request(server, method, path, headers=headers)
    return status, json.loads(body)["error"] if status >= 400 else ""


def test_host_names_and_the_api_key(guarded):
    key = {"X-API-Key": KEY}
    assert _status(guarded, "GET", "/model", {"Host": "attacker.example", **key}) == (
        400, "Host 'attacker.example' is not a name this server answers to; start the server with --allowed-hosts "
        "attacker.example to accept it")  # fmt: skip
    assert _status(guarded, "GET", "/model", {"Host": "SEG.example.org:8443", **key}) == (200, "")
    for malformed in ("[::1]evil.example", "127.0.0.1:x", "localhost:"):  # a loopback name with more after it
        assert _status(guarded, "GET", "/model", {"Host": malformed, **key}) == (
            400, f"Host {malformed!r} is not a name this server answers to")  # fmt: skip
    assert _status(guarded, "GET", "/model", {}) == (401, "this server needs an API key: send it in the X-API-Key "
                                                          "header (or Authorization: Bearer KEY)")  # fmt: skip
    assert _status(guarded, "GET", "/health", {"X-API-Key": KEY[:-1] + "x"}) == (401, "the API key sent is not "
                                                                                      "this server's")  # fmt: skip
    assert _status(guarded, "GET", "/health", {"Authorization": f"Bearer {KEY}"}) == (200, "")
    assert _status(guarded, "GET", "/openapi.json", key) == (200, "")
    # The page and its files hold no data: served without the key (the page asks for it).
    assert [_request(guarded, "GET", path)[0] for path in ("/", "/static/app.js")] == [200, 200]
    assert "Traceback" not in guarded.log()


def test_other_sites_pages_are_refused_unless_named(guarded):
    port = _address(guarded)[1]
    key = {"X-API-Key": KEY}
    status, error = _status(guarded, "POST", "/predict", {"Origin": "http://evil.example", **key})
    assert (status, error) == (403, "a request from the web page origin 'http://evil.example' is refused; start the "
                                    "server with --cors-origin http://evil.example to allow that site's pages to "
                                    "call it")  # fmt: skip
    assert _status(guarded, "GET", "/model", {"Origin": f"http://127.0.0.1:{port}", **key}) == (200, "")  # the page
    _, good, _ = _request(guarded, "GET", "/model", headers={"Origin": "http://good.example", **key})
    assert (good["access-control-allow-origin"], good["vary"]) == ("http://good.example", "Origin")
    preflight = {"Origin": "http://good.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key"}  # fmt: skip
    status, headers, _ = _request(guarded, "OPTIONS", "/predict", headers=preflight)
    assert status == 204 and "X-API-Key" in headers["access-control-allow-headers"]
    assert _request(guarded, "OPTIONS", "/predict", headers={**preflight, "Origin": "http://evil.example"})[0] == 403
    _, plain, _ = _request(guarded, "GET", "/model", headers=key)
    assert not any(name.startswith("access-control-") for name in plain)  # no CORS unless an origin is named


def _peak_mb(server) -> float:
    text = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", text, re.M).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's peak memory from /proc")
def test_extra_images_are_checked_from_their_headers(guarded):
    """A 9000 x 9000 16-bit depth image (160 MB of pixels, 160 KB of file) beside a 50 x 40 photo is refused from
    its header: the server's peak memory does not move."""
    key = {"X-API-Key": KEY}
    image = encoded(noise(40, 50))
    before = _peak_mb(guarded)
    status, _, body = _post(guarded, [("file", "room.png", image), ("extra", "d.png", grey16_png(9000, 9000))],
                            headers=key)  # fmt: skip
    grown = _peak_mb(guarded) - before
    assert (status, json.loads(body)) == (422, {"error": "d.png: is 9000x9000 but room.png is 50x40; expected the "
                                                "same size"})  # fmt: skip
    assert grown < 100, f"peak memory grew by {grown:.0f} MB"
    status, _, body = _post(guarded, [("file", "room.png", image), ("extra", "d.eps", EPS)], headers=key)
    assert status == 415 and json.loads(body)["error"].startswith("d.eps: cannot read depth or HHA image (its format")
    good = _post(guarded, [("file", "room.png", image), ("extra", "d.png", grey16_png(50, 40))], headers=key)
    assert good[0] == 200 and good[2].startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------- connections and log


def _low_file_limit() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))


def _ending(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent on ``sock`` before closing it, if it closed it before ``deadline`` (monotonic)."""
    try:
        return until_closed(sock, max(0.01, deadline - time.monotonic()))
    except TimeoutError:
        return None


@pytest.mark.skipif(sys.platform == "win32", reason="needs setrlimit (POSIX)")
def test_a_low_file_limit_degrades_to_refusals_not_a_log_flood(ckpt):
    """300 idle connections to a server limited to 160 open files: the connections beyond its cap are refused at
    once, the rest closed at --idle-timeout, the log stays a few lines, and /health answers afterwards."""
    with serving(ckpt, "--runtime", "eager", "--idle-timeout", "1", preexec_fn=_low_file_limit) as server:
        socks = []
        for _ in range(300):
            with contextlib.suppress(OSError):
                socks.append(socket.create_connection(_address(server), timeout=5))
        deadline = time.monotonic() + 6
        endings = [_ending(sock, deadline) for sock in socks]
        for sock in socks:
            sock.close()
        health = _health(server)
        log = server.log()
    assert len(socks) == 300
    # Every one refused at once (a one-line 503) or closed after a second of silence: none left hanging.
    assert None not in endings
    refused = [e for e in endings if e.startswith(b"HTTP/1.1 503 ")]
    assert len(refused) >= 100 and all(e.endswith(b'connections open, its limit; retry in a moment"}') for e in refused)
    assert health["status"] == "ok"
    # The cap kept the process under its file limit: no failed accept, no traceback, a short log.
    assert "cannot accept" not in log and "Traceback" not in log and len(log.splitlines()) < 20, log
    assert 4 <= int(re.search(r"at most (\d+) connections: the open-file limit", log).group(1)) < 60
