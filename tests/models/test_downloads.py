"""Downloads of published weights: over HTTPS, capped in size (by the announced length and while the bytes arrive),
and, where no hash is published, the SHA-256 recorded at the first use and checked at every later one; ``sha256=``
(``--sha256``) pins the hash a file must have. Nothing is kept, or used, when a check fails.

Nothing is fetched from the internet: a local HTTP server on 127.0.0.1 serves the bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import fcnseg
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.hub import weights_checkpoint
from fcnseg.models.weights import (
    MAX_DOWNLOAD_BYTES,
    FCNWeights,
    PublishedWeights,
    _HttpsOnly,
    download,
    recorded_sha256,
    sha256_record,
)
from fcnseg.palette import VOC_CLASSES
from fcnseg.preprocessing import CAFFE
from tests.caffe_files import write_caffemodel
from tests.helpers import TINY, fake_hub
from tests.models.test_caffe_import import fcn_layers

ZERO = "0" * 64


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files[path] = (bytes, announced length or None)``; ``/endless`` sends bytes until the client
    leaves, without a length (the end of the body is the end of the connection)."""

    files: dict[str, tuple[bytes, int | None]] = {}
    protocol_version = "HTTP/1.0"

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/endless":
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up once it has seen enough
                for _ in range(1000):
                    self.wfile.write(b"\0" * (1 << 16))
            return
        body, announced = self.files.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        if announced is not None:
            self.send_header("Content-Length", str(announced))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(base URL, the served files: path -> (bytes, announced length))."""
    files: dict[str, tuple[bytes, int | None]] = {}
    handler = type("Handler", (_Handler,), {"files": files})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", files
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def hub(tmp_path):
    with fake_hub(tmp_path, create=False) as checkpoints:
        yield checkpoints


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _caffe_entry(tmp_path, server, **changes) -> tuple[PublishedWeights, bytes]:
    """An entry with no published hash, like the Caffe release's, whose small FCN-16s file the server serves."""
    url, files = server
    src = tmp_path / "fcn16s-test.caffemodel"
    write_caffemodel(src, fcn_layers("fcn16s", classes=21, seed=11))
    files["/fcn16s-test.caffemodel"] = (src.read_bytes(), src.stat().st_size)
    entry = PublishedWeights(f"{url}/fcn16s-test.caffemodel", src.name, "caffe", "fcn16s", VOC_CLASSES, CAFFE, {})
    for k, v in changes.items():
        object.__setattr__(entry, k, v)
    return entry, src.read_bytes()


# ------------------------------------------------------------------------------------------------ the catalogue


def test_the_release_is_fetched_over_https():
    caffe = [w.value for w in FCNWeights if w.value.format == "caffe"]
    assert len(caffe) == 8
    assert all(w.url == f"https://dl.caffe.berkeleyvision.org/{w.file_name}" for w in caffe)
    # The largest, the colour-HHA net of two VGG16 streams, is about 1.1 GB: the cap leaves it room.
    assert all(w.value.max_bytes == MAX_DOWNLOAD_BYTES == 2 << 30 for w in FCNWeights)


def test_a_redirect_from_https_to_http_is_refused():
    request = urllib.request.Request("https://dl.example.org/a.caffemodel")
    with pytest.raises(urllib.error.HTTPError, match="redirected from https to http://dl.example.org/b"):
        _HttpsOnly().redirect_request(request, None, 302, "Found", {}, "http://dl.example.org/b")
    assert _HttpsOnly().redirect_request(request, None, 302, "Found", {}, "https://mirror.example.org/b") is not None


# ------------------------------------------------------------------------------------------------ size caps


def test_an_announced_length_over_the_cap_is_refused_unread(server, tmp_path):
    url, files = server
    files["/big"] = (b"x" * 5000, 5000)
    t0 = time.perf_counter()
    with pytest.raises(FcnsegError) as caught:
        download(f"{url}/big", tmp_path / "c" / "big", max_bytes=1000, progress=False)
    assert str(caught.value) == (
        f"download of {url}/big refused: its announced length is 5,000 bytes, over the 1,000 expected at most; "
        "nothing was kept"
    )
    assert _leftovers(tmp_path / "c") == [] and time.perf_counter() - t0 < 10
    assert download(f"{url}/big", tmp_path / "c" / "big", max_bytes=5000, progress=False).stat().st_size == 5000


def test_a_stream_without_a_length_is_cut_at_the_cap(server, tmp_path):
    url, _ = server
    with pytest.raises(FcnsegError) as caught:
        download(f"{url}/endless", tmp_path / "c" / "f", max_bytes=100_000, progress=False)
    assert str(caught.value) == (
        f"download of {url}/endless refused: more than 100,000 bytes arrived, over the 100,000 expected at most; "
        "nothing was kept"
    )
    assert _leftovers(tmp_path / "c") == []


# -------------------------------------------------------------------------------------- recorded SHA-256


def test_the_hash_is_recorded_at_the_first_download_and_checked_after(tmp_path, server, hub, capsys):
    entry, published = _caffe_entry(tmp_path, server)
    digest = hashlib.sha256(published).hexdigest()
    first = weights_checkpoint(entry, progress=True)
    assert f"fcnseg: fcn16s-test.caffemodel: sha256 {digest}, recorded in fcn16s-test.caffemodel.sha256" in (
        capsys.readouterr().err
    )
    cached = hub / "fcn16s-test.caffemodel"
    assert sha256_record(cached).read_text() == f"{digest}  fcn16s-test.caffemodel\n"
    assert recorded_sha256(cached) == digest
    assert weights_checkpoint(entry, progress=False)["state_dict"].keys() == first["state_dict"].keys()
    # The cached file changed since: one line, and nothing of it is used (not even its cached conversion).
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 1
    cached.write_bytes(bytes(data))
    tampered = hashlib.sha256(bytes(data)).hexdigest()
    message = (
        f"{cached}: sha256 is {tampered}, but fcn16s-test.caffemodel.sha256 recorded {digest} at its first use (a "
        "changed or damaged file); delete both to download it again"
    )
    with pytest.raises(FcnsegError) as caught:
        weights_checkpoint(entry, progress=False)
    assert str(caught.value) == message


def test_a_file_placed_by_hand_is_recorded_at_its_first_use(tmp_path, hub, capsys):
    # The registry's own entry, its file put in the cache by hand: recorded, then checked by name and on the CLI.
    hub.mkdir(parents=True)
    cached = hub / "fcn16s-heavy-pascal.caffemodel"
    write_caffemodel(cached, fcn_layers("fcn16s", classes=21, seed=5))
    model = fcnseg.load("fcn16s-heavy-pascal")
    assert model.classes == list(VOC_CLASSES)
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    assert recorded_sha256(cached) == digest
    assert f"fcn16s-heavy-pascal.caffemodel: sha256 {digest}, recorded in" in capsys.readouterr().err
    cached.write_bytes(cached.read_bytes() + b"\0")
    img = tmp_path / "in.png"
    img.write_bytes(b"")
    out = tmp_path / "out"
    assert main(["predict", "--weights", "fcn16s-heavy-pascal", str(img), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fcnseg: error: {cached}: sha256 is ") and err.count("\n") == 1
    assert "recorded" in err and not out.exists()


# ------------------------------------------------------------------------------------------ pinned SHA-256


def test_a_pin_that_differs_refuses_the_download_and_keeps_nothing(tmp_path, server, hub):
    entry, published = _caffe_entry(tmp_path, server)
    digest = hashlib.sha256(published).hexdigest()
    with pytest.raises(FcnsegError) as caught:
        weights_checkpoint(entry, sha256=ZERO, progress=False)
    assert str(caught.value) == (
        f"download of {entry.url} refused: sha256 is {digest}, expected {ZERO} (a different or damaged file); "
        "nothing was kept"
    )
    assert _leftovers(hub) == []
    # The right pin (any case) downloads, records and converts it.
    assert weights_checkpoint(entry, sha256=digest.upper(), progress=False)["model"] == "fcn16s"
    assert _leftovers(hub) == ["fcn16s-test.caffemodel", "fcn16s-test.caffemodel.sha256", "fcn16s-test.fcnseg-v1.pt"]
    # A pin the cached copy does not match: refused, and the copy is not used.
    with pytest.raises(FcnsegError, match=f"^{hub / 'fcn16s-test.caffemodel'}: sha256 is {digest}, expected 0+ "):
        weights_checkpoint(entry, sha256=ZERO, progress=False)


def test_pins_on_the_command_line(tmp_path, hub, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(img)
    local = tmp_path / "mine.caffemodel"
    write_caffemodel(local, fcn_layers("fcn16s", classes=21, seed=5))
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    args = ["predict", "--weights", "fcn16s-heavy-pascal", "--weights-file", str(local), str(img), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--sha256", ZERO]) == 2
    assert (
        capsys.readouterr().err
        == f"fcnseg: error: {local}: sha256 is {digest}, expected {ZERO} (a different or damaged file)\n"
    )
    assert not (tmp_path / "a").exists()
    assert main([*args, "--out", str(tmp_path / "a"), "--sha256", digest]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--sha256", "abc"]) == 2
    assert (
        capsys.readouterr().err
        == "fcnseg: error: --sha256 'abc': expected 64 hexadecimal digits (as sha256sum prints them)\n"
    )
    # A checkpoint, and a file to convert, are checked the same way.
    ckpt = fcnseg.save_checkpoint(fcnseg.get_model("fcn8s", num_classes=3, **TINY), tmp_path / "m.pt")
    ckpt_digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "c"), "--sha256", ZERO]) == 2
    assert f"{ckpt}: sha256 is {ckpt_digest}, expected {ZERO}" in capsys.readouterr().err
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "c"), "--sha256", ckpt_digest, "--quiet"]) == 0
    assert main(["convert", str(local), "--out", str(tmp_path / "c.pt"), "--sha256", ZERO]) == 2
    assert f"{local}: sha256 is {digest}, expected {ZERO}" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()


def test_a_pin_that_contradicts_the_published_hash_is_refused(tmp_path, server, hub):
    entry, _ = _caffe_entry(tmp_path, server, sha256="a" * 64)
    with pytest.raises(FcnsegError, match=f"--sha256 {ZERO}: fcn16s-test.caffemodel is published with sha256 a+$"):
        weights_checkpoint(entry, sha256=ZERO, progress=False)
    assert _leftovers(hub) == []


def test_torchvision_backbone_downloads_are_checked_against_their_hash_prefix(hub, monkeypatch):
    import torch.hub
    from torchvision.models import VGG16_Weights

    from tests.helpers import TINY

    asked = {}

    def download(url, dst, hash_prefix=None, progress=True):
        asked["hash_prefix"] = hash_prefix
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0123abcd")')  # as torch.hub says

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    with pytest.raises(FcnsegError, match="is not the published file .*; nothing was kept$"):
        fcnseg.get_model("fcn32s", backbone_weights="IMAGENET1K_V1", **TINY)
    assert asked["hash_prefix"] == VGG16_Weights.IMAGENET1K_V1.url.rsplit("-", 1)[1].split(".")[0] == "397923af"


def test_a_pin_adds_to_a_published_hash_and_never_replaces_it(tmp_path, server):
    import hashlib

    entry, data = _caffe_entry(tmp_path, server, sha256=ZERO)  # the published hash says: not this file
    local = tmp_path / "copy.caffemodel"
    local.write_bytes(data)
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(FcnsegError, match=f"sha256 is {actual}, expected {ZERO}"):
        weights_checkpoint(entry, file=local, sha256=actual)  # a pin of the file's own hash overrides nothing
