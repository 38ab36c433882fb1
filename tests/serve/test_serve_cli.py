"""``fcnseg serve`` as a command: user mistakes are one line and exit 2, and Ctrl-C lets the requests in flight
finish before the server stops."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid

import pytest

from fcnseg.cli import main
from tests.serve.serving import ROOT, encoded, noise, serving, stop, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("multipart")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "70000"], "--port 70000: expected 0 to 65535"),
        (["--workers-threads", "0"], "--workers-threads 0: expected at least 1"),
        (["--queue", "-1"], "--queue -1: expected 0 or more"),
        (["--max-upload-mb", "0"], "--max-upload-mb 0: expected a positive size"),
        (["--max-pixels", "0"], "--max-pixels 0: expected a positive number of pixels"),
        (
            ["--runtime", "onnx-int8"],
            "--runtime onnx-int8 calibrates and checks int8 on your images: give --calibration DIR",
        ),
        (
            ["--runtime", "auto-reduced"],
            "--runtime auto-reduced calibrates and checks int8 on your images: give --calibration DIR",
        ),
        (
            ["--runtime", "gpu"],
            "--runtime 'gpu': expected one of eager, winograd, bf16, onnx, onnx-int8, "
            "openvino, openvino-bf16, openvino-int8, compile, auto, auto-reduced",
        ),
        (["--timeout", "0"], "--timeout 0: expected a positive number of seconds"),
        (["--timeout", "inf"], "--timeout inf: expected a positive number of seconds"),
        (["--max-upload-mb", "inf"], "--max-upload-mb inf: expected a positive size"),
        (["--idle-timeout", "nan"], "--idle-timeout nan: expected a positive number of seconds"),
        (["--upload-timeout", "-1"], "--upload-timeout -1: expected a positive number of seconds"),
        (["--idle-timeout", "0"], "--idle-timeout 0: expected a positive number of seconds"),
        (["--max-connections", "0"], "--max-connections 0: expected at least 1"),
        (
            ["--api-key", "short"],
            "--api-key (or FCNSEG_API_KEY): expected at least 8 printable ASCII characters, no spaces",
        ),
        (
            ["--api-key", "has a space"],
            "--api-key (or FCNSEG_API_KEY): expected at least 8 printable ASCII characters, no spaces",
        ),
        (
            ["--cors-origin", "*"],
            "--cors-origin '*': expected a web origin, scheme and host (and port), such as https://app.example.org; "
            "name each site, no wildcard",
        ),
        (
            ["--cors-origin", "https://app.example.org/page"],
            "--cors-origin 'https://app.example.org/page': expected a web origin, scheme and host (and port), such as "
            "https://app.example.org; name each site, no wildcard",
        ),
        (["--allowed-hosts", "a.example,,b"], "--allowed-hosts 'a.example,,b': expected comma-separated host names"),
        (
            ["--tile", "4096"],
            "--tile 4096: a tile is computed on as up to 4128x4128 = 17,040,384 pixels with the model's padding, above "
            "--max-pixels 8,388,608; use a smaller --tile or a larger --max-pixels",
        ),
        (["--tile", "50"], "--tile must be a positive multiple of 32 (the model's stride), got 50"),
        (
            ["--tile", "64", "--overlap", "64"],
            "--overlap must be between 0 and 32 (--tile 64 minus one 32-px step), got 64",
        ),  # fmt: skip
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(ckpt, capsys, flags, message):
    assert main(["serve", str(ckpt), "--port", "0", *flags]) == 2
    assert capsys.readouterr().err == f"fcnseg: error: {message}\n"


def test_a_missing_model_or_a_taken_port_is_one_line(ckpt, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "none.pt"), "--port", "0"]) == 2
    assert capsys.readouterr().err == f"fcnseg: error: {tmp_path / 'none.pt'}: no such checkpoint file\n"
    assert main(["serve", "fcn9s-nowhere", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fcnseg: error: fcn9s-nowhere: no such checkpoint file, nor published weights") and (
        err.count("\n") == 1
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", str(ckpt), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (
        f"fcnseg: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use)\n"
    )


def test_a_pinned_sha256_the_checkpoint_does_not_have_is_one_line(ckpt, capsys):
    import hashlib

    right = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    wrong = "0" * 64
    assert main(["serve", str(ckpt), "--port", "0", "--sha256", wrong]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(ckpt) in err and f"sha256 is {right}, expected {wrong}" in err


def test_without_the_serve_extra_it_says_what_to_install(ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if uvicorn were not installed
    assert main(["serve", str(ckpt)]) == 2
    assert capsys.readouterr().err == (
        "fcnseg: error: fcnseg serve needs FastAPI, uvicorn and python-multipart: pip install 'fcnseg[serve]' "
        "(uvicorn is missing)\n"
    )


def test_a_short_key_in_the_environment_is_a_mistake_too(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("FCNSEG_API_KEY", "short")
    assert main(["serve", str(ckpt), "--port", "0"]) == 2
    assert (
        capsys.readouterr().err
        == "fcnseg: error: --api-key (or FCNSEG_API_KEY): expected at least 8 printable ASCII characters, no spaces\n"
    )


def test_listening_beyond_this_machine_without_a_key_is_warned_about(capsys):
    from argparse import Namespace

    from fcnseg.cli.serve import _warn_if_open

    _warn_if_open(Namespace(host="127.0.0.1", api_key=None), 8000)
    _warn_if_open(Namespace(host="0.0.0.0", api_key="a-long-key"), 8000)
    assert capsys.readouterr().err == ""
    _warn_if_open(Namespace(host="0.0.0.0", api_key=None), 8000)
    assert capsys.readouterr().err == (
        "fcnseg serve: warning: listening on 0.0.0.0 with no API key: anyone who can reach port 8000 can use this "
        "model; set FCNSEG_API_KEY, and put TLS in front (see the README)\n"
    )


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fcnseg", "serve", str(tmp_path / "none.pt")], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert (r.returncode, r.stderr) == (2, f"fcnseg: error: {tmp_path / 'none.pt'}: no such checkpoint file\n")


def _post_batch(url: str, images: list[bytes]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n\r\n'.encode() + im
        + b"\r\n" for i, im in enumerate(images)
    ) + f"--{boundary}--\r\n".encode()  # fmt: skip
    request = urllib.request.Request(f"{url}predict/batch", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as r:
        return r.status, json.loads(r.read())


def _health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}health", timeout=10) as r:
        return json.loads(r.read())


def test_ctrl_c_finishes_the_requests_in_flight_then_stops(ckpt):
    images = [encoded(noise(320, 320, seed=s)) for s in range(12)]
    with serving(ckpt) as server:
        answers = []
        client = threading.Thread(target=lambda: answers.append(_post_batch(server.url, images)))
        client.start()
        wait_for(lambda: _health(server.url)["running"] >= 1)
        status = stop(server)  # SIGINT while the batch is being segmented
        client.join(60)
        log = server.log()
    assert status == 0, log
    [(code, body)] = answers
    assert code == 200 and [r["status"] for r in body["results"]] == [200] * 12
    # The server was shutting down while it answered the batch, then said it stopped.
    assert log.index("Shutting down") < log.index("POST /predict/batch 200") < log.index("fcnseg serve: stopped")
    assert re.search(r"POST /predict/batch 200 \d+\.\d ms (320x320,){11}320x320$", log, re.MULTILINE), log
    assert "Traceback" not in log


def test_a_uvicorn_without_what_the_connection_guard_relies_on_is_one_line():
    from fcnseg.errors import FcnsegError
    from fcnseg.serve.protocol import check_uvicorn

    check_uvicorn()  # the installed one has it all

    class Renamed:  # an h11 protocol whose hooks were renamed
        def connection_made(self, transport):
            pass

    with pytest.raises(
        FcnsegError,
        match=r"^uvicorn [0-9.]+: its h11 protocol has no connection_lost, data_received, "
        r"on_response_complete\b.*, which fcnseg serve's connection cap and header deadline rely on",
    ):
        check_uvicorn(Renamed)
