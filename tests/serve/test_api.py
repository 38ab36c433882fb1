"""The JSON / HTTP API of ``fcnseg serve`` through FastAPI's TestClient (and, where the socket matters, uvicorn on
a loopback port): every endpoint, the byte-for-byte agreement with ``fcnseg predict``, and every bad input, after
each of which the server must still answer."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import select
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from tests.helpers import TINY, progressive_jpeg, randomise
from tests.serve.serving import (
    bomb_png,
    client_for,
    encoded,
    live,
    noise,
    rotated_jpeg,
    until_closed,
    wait_for,
)

pytest.importorskip("fastapi")
pytest.importorskip("multipart")


def _predicted(tmp_path: Path, model: Path, image: bytes, name: str, *flags: str) -> Path:
    """``fcnseg predict MODEL IMAGE --out DIR FLAGS``, the real command: the folder it wrote."""
    src = tmp_path / "in" / name
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(image)
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    assert main(["predict", str(model), str(src), "--out", str(out), "--quiet", *flags]) == 0
    return out


def _still_serving(client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    good = client.post("/predict", files={"file": ("ok.png", encoded(noise(20, 30)), "image/png")})
    assert good.status_code == 200 and good.content.startswith(b"\x89PNG")


def _indices(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.mode == "P"
    return np.array(img)


# ------------------------------------------------------------------------------------------ info endpoints


def test_health_and_model_card(ckpt):
    with client_for(ckpt, "--workers-threads", "1", "--queue", "3") as client:
        health = client.get("/health").json()
        card = client.get("/model").json()
    assert health == {"status": "ok", "model": "tiny.pt", "architecture": "fcn8s", "workers": 1, "queue": 3,
                      "admitted": 0, "running": 0, "skipped": 0}  # fmt: skip
    model = fcnseg.load(ckpt)
    assert card["architecture"] == "fcn8s" and card["alignment"] == "aligned" and card["input_channels"] == 3
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["preprocessing"] == json.loads(json.dumps(model.preprocessing.to_dict()))
    [head] = card["heads"]
    assert [c["name"] for c in head["classes"]] == [f"thing{k}" for k in range(5)]
    assert [c["color"] for c in head["classes"]] == [list(c) for c in model.palette]
    assert card["metrics"] == {"mean_iu": 0.625, "iteration": 40}  # what the checkpoint records
    assert card["serving"]["runtime"] == "eager" and card["serving"]["max_pixels"] == 8388608
    assert (card["serving"]["max_batch"], card["serving"]["timeout_s"]) == (64, 60.0)
    assert card["serving"]["max_batch_pixels"] == 8 * card["serving"]["max_pixels"]


def test_published_weights_card_metrics_come_from_the_catalogue():
    from fcnseg.serve.segment import recorded_metrics

    assert recorded_metrics("fcn8s-heavy-pascal") == {
        "seg11valid": {"pixel_acc": 91.22, "mean_acc": 77.61, "mean_iu": 65.51, "fw_iu": 84.54}
    }
    assert recorded_metrics("no-such-model") == {}


def test_docs_openapi_page_and_static_files(ckpt):
    with client_for(ckpt) as client:
        spec = client.get("/openapi.json").json()
        no_docs = [client.get(path) for path in ("/docs", "/redoc")]
        page = client.get("/")
        assets = {name: client.get(f"/static/{name}") for name in ("app.js", "app.css")}
    with client_for(ckpt, "--docs") as client:
        docs = client.get("/docs")
    # The interactive page loads Swagger UI from a CDN: off unless asked for (--docs); ReDoc is never served.
    assert [(r.status_code, r.json()) for r in no_docs] == [(404, {"error": "Not Found"})] * 2
    assert {"/health", "/model", "/predict", "/predict/batch"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and set(body["properties"]) == {"file", "extra"}
    parameters = {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]}
    assert parameters == {"format", "head", "alpha", "confidence"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert page.status_code == 200 and '<canvas id="canvas"' in page.text and 'id="opacity"' in page.text
    assert assets["app.js"].headers["content-type"].startswith(("application/javascript", "text/javascript"))
    # Works offline: nothing is fetched from another host.
    for text in (page.text, *(a.text for a in assets.values())):
        assert "http://" not in text and "https://" not in text


# ------------------------------------------------------------------------------------------ /predict


@pytest.mark.parametrize(
    "flags, name, image",
    [
        ((), "photo.png", encoded(noise(45, 70, seed=1))),
        (("--tile", "64", "--overlap", "32"), "wide.png", encoded(noise(70, 150, seed=2))),
        (("--runtime", "bf16"), "photo.png", encoded(noise(33, 47, seed=3))),
        ((), "sideways.jpg", rotated_jpeg(noise(30, 50, seed=4))),
        ((), "grey.png", encoded(noise(30, 40, seed=5)[:, :, 0])),
        (("--tile", "64", "--overlap", "32", "--flip", "--scales", "0.75", "1"), "tta.png", encoded(noise(70, 150, 6))),
    ],
    ids=["eager", "tiled", "bf16", "exif-rotated-jpeg", "grey", "tiled+flip+scales"],
)
@pytest.mark.filterwarnings("ignore:this CPU")
def test_served_masks_are_byte_identical_to_fcnseg_predict(ckpt, tmp_path, flags, name, image):
    out = _predicted(tmp_path, ckpt, image, name, "--overlay", "--confidence", *flags)
    stem = Path(name).stem
    with client_for(ckpt, *flags) as client:
        png = client.post("/predict", files={"file": (name, image, "image/png")})
        overlay = client.post("/predict?format=overlay", files={"file": (name, image, "image/jpeg")})
        confidence = client.post("/predict?format=confidence", files={"file": (name, image, "image/png")})
        answer = client.post("/predict?format=json&confidence=true", files={"file": (name, image)}).json()
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (out / f"{stem}.png").read_bytes()
    assert overlay.headers["content-type"] == "image/jpeg"
    assert overlay.content == (out / f"{stem}_overlay.jpg").read_bytes()
    # The confidence map, as predict --confidence writes it, in both answers.
    assert confidence.headers["content-disposition"] == f'inline; filename="{stem}_confidence.png"'
    assert confidence.content == (out / f"{stem}_confidence.png").read_bytes()
    assert base64.b64decode(answer["heads"][0]["confidence_png"]) == confidence.content
    mask = _indices(png.content)
    assert png.headers["x-image-size"] == f"{mask.shape[1]}x{mask.shape[0]}"
    assert len(np.unique(mask)) >= 2  # a real mask, not one class everywhere


def test_json_gives_the_mask_shares_size_and_timing(ckpt):
    image = encoded(noise(48, 64, seed=7))
    with client_for(ckpt) as client:
        answer = client.post("/predict?format=json", files={"file": ("n.png", image, "image/png")}).json()
        png = client.post("/predict", files={"file": ("n.png", image, "image/png")}).content
    assert (answer["file"], answer["width"], answer["height"]) == ("n.png", 64, 48)
    assert set(answer["timing_ms"]) == {"read", "inference", "total"} and answer["timing_ms"]["total"] > 0
    [head] = answer["heads"]
    assert head["name"] == "out" and base64.b64decode(head["mask_png"]) == png
    counts = np.bincount(_indices(png).ravel(), minlength=5)
    assert [c["pixels"] for c in head["classes"]] == counts.tolist()
    assert [c["share"] for c in head["classes"]] == pytest.approx((counts / counts.sum()).tolist())
    assert [c["name"] for c in head["classes"]] == [f"thing{k}" for k in range(5)]


def test_two_headed_model_answers_every_head(tmp_path):
    model = randomise(fcnseg.get_model("fcn16s_twohead", **TINY), seed=3).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "two.pt")
    image = encoded(noise(40, 56, seed=8))
    out = _predicted(tmp_path, ckpt, image, "scene.png")
    with client_for(ckpt) as client:
        answer = client.post("/predict?format=json", files={"file": ("scene.png", image, "image/png")}).json()
        geometric = client.post("/predict?head=geometric", files={"file": ("scene.png", image, "image/png")})
        unknown = client.post("/predict?head=depth", files={"file": ("scene.png", image, "image/png")})
    assert [h["name"] for h in answer["heads"]] == ["semantic", "geometric"]
    assert [len(h["classes"]) for h in answer["heads"]] == [33, 3]
    assert base64.b64decode(answer["heads"][0]["mask_png"]) == (out / "scene.png").read_bytes()
    assert base64.b64decode(answer["heads"][1]["mask_png"]) == (out / "scene_geometric.png").read_bytes()
    assert geometric.content == (out / "scene_geometric.png").read_bytes()
    assert geometric.headers["content-disposition"] == 'inline; filename="scene_geometric.png"'
    assert unknown.status_code == 422
    assert unknown.json() == {"error": "head 'depth': this model's heads are semantic, geometric"}


def test_fusion_net_takes_its_extra_channels_and_refuses_without_them(tmp_path):
    model = randomise(fcnseg.get_model("fcn32s", num_classes=4, in_channels=4, **TINY), seed=5).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "rgbd.pt")
    image = encoded(noise(40, 50, seed=9))
    depth = np.random.default_rng(1).integers(500, 9000, (40, 50)).astype(np.uint16)
    depth_png = encoded(depth)  # 16-bit millimetres
    (tmp_path / "depth").mkdir()
    (tmp_path / "depth" / "room.png").write_bytes(depth_png)
    out = _predicted(tmp_path, ckpt, image, "room.png", "--extra", str(tmp_path / "depth"))
    with client_for(ckpt) as client:
        both = client.post("/predict", files=[("file", ("room.png", image)), ("extra", ("d.png", depth_png))])
        color_only = client.post("/predict", files={"file": ("room.png", image, "image/png")})
        wrong_size = client.post("/predict", files=[("file", ("room.png", image)),
                                                    ("extra", ("d.png", encoded(depth[:20])))])  # fmt: skip
    assert both.status_code == 200 and both.content == (out / "room.png").read_bytes()
    assert color_only.status_code == 422
    assert color_only.json()["error"].startswith("this model takes 4 input channels (colour, then depth or HHA)")
    assert "'extra'" in color_only.json()["error"]
    assert wrong_size.status_code == 422
    assert wrong_size.json()["error"] == "d.png: is 50x20 but room.png is 50x40; expected the same size"


def test_batch_answers_every_image_good_and_bad(ckpt):
    good1, good2 = encoded(noise(30, 40, seed=1)), encoded(noise(20, 25, seed=2))
    files = [("files", ("a.png", good1)), ("files", ("notes.txt", b"hello")), ("files", ("b.png", good2)),
             ("files", ("empty.png", b""))]  # fmt: skip
    with client_for(ckpt) as client:
        batch = client.post("/predict/batch", files=files)
        singles = [client.post("/predict", files={"file": ("x.png", g)}).content for g in (good1, good2)]
        none = client.post("/predict/batch", files={"file": ("a.png", good1)})
    results = batch.json()["results"]
    assert batch.status_code == 200 and [r["status"] for r in results] == [200, 400, 200, 400]
    assert [r["file"] for r in results] == ["a.png", "notes.txt", "b.png", "empty.png"]
    assert [base64.b64decode(results[i]["heads"][0]["mask_png"]) for i in (0, 2)] == singles
    assert results[1]["error"].startswith("notes.txt: cannot read image (not an image file in a format read here")
    assert results[3]["error"] == "empty.png: cannot read image (empty file)"
    assert none.status_code == 422 and none.json() == {"error": "expected the image in the multipart field 'files'; "
                                                                "got 'file'"}  # fmt: skip


# ------------------------------------------------------------------------------------------ bad input


BAD = {
    "non-image": ({"file": ("notes.txt", b"just some text\n")}, 400,
                  "notes.txt: cannot read image (not an image file in a format read here; expected PNG, JPEG, BMP, "
                  "TIFF, WebP, GIF or PPM)"),
    "eps": ({"file": ("logo.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")}, 415,
            "logo.eps: cannot read image (its format, EPS by its first bytes, is not accepted; expected PNG, JPEG, "
            "BMP, TIFF, WebP, GIF or PPM)"),
    "pcx": ({"file": ("a.pcx", encoded(noise(8, 8), "PCX"))}, 415, "a.pcx: cannot read image (its format, PCX by "
            "its first bytes, is not accepted; expected PNG, JPEG, BMP, TIFF, WebP, GIF or PPM)"),
    "truncated": ({"file": ("cut.png", encoded(noise(30, 30))[:300])}, 400, "cut.png: cannot read image (truncated "
                  "file)"),
    "zero-byte": ({"file": ("empty.jpg", b"")}, 400, "empty.jpg: cannot read image (empty file)"),
    "decompression-bomb": ({"file": ("bomb.png", bomb_png())}, 413, "bomb.png: cannot read image (too large: "
                           "900,000,000 pixels, above PIL's limit of 89,478,485 pixels)"),
    "scan-bomb": ({"file": ("scans.jpg", progressive_jpeg(150))}, 400, "scans.jpg: cannot read image (a JPEG of "
                  "150 scans, above the 100 decoded: such a file takes minutes to decode; save it again as a "
                  "baseline JPEG)"),
    "over-max-pixels": ({"file": ("big.png", encoded(noise(40, 60)))}, 413, "big.png: image is 60x40, which the model "
                        "computes on as 64x64 = 4,096 pixels with its padding, above this server's limit of 2,000 "
                        "(--max-pixels); send a smaller image, or start the server with --tile for large ones"),
    "wrong-field": ({"image": ("a.png", encoded(noise(8, 8)))}, 422, "expected the image in the multipart field "
                    "'file'; got 'image'"),
    "text-field": ({"file": (None, "a.png")}, 422, "the multipart field 'file' must be a file upload, got text"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_clear_error_and_the_server_keeps_serving(ckpt, case):
    files, status, message = BAD[case]
    with client_for(ckpt, "--max-pixels", "2000") as client:
        r = client.post("/predict", files=files)
        assert (r.status_code, r.json()) == (status, {"error": message})
        _still_serving(client)


def test_bad_requests_that_are_not_uploads(ckpt):
    with client_for(ckpt) as client:
        not_multipart = client.post("/predict", content=b"\x89PNG...", headers={"content-type": "image/png"})
        bad_format = client.post("/predict?format=gif", files={"file": ("a.png", encoded(noise(8, 8)))})
        bad_alpha = client.post("/predict?format=overlay&alpha=2", files={"file": ("a.png", encoded(noise(8, 8)))})
        _still_serving(client)
    assert not_multipart.status_code == 415
    assert not_multipart.json()["error"] == ("expected a multipart/form-data upload with the image in the field 'file' "
                                             "(curl -F file=@photo.jpg), got content type 'image/png'")  # fmt: skip
    assert (bad_format.status_code, bad_format.json()) == (422, {"error": "format: Input should be 'png', 'overlay', "
                                                                          "'confidence' or 'json'"})  # fmt: skip
    assert (bad_alpha.status_code, bad_alpha.json()) == (422, {"error": "alpha: Input should be less than or equal "
                                                                        "to 1"})  # fmt: skip


def test_image_over_max_pixels_is_segmented_with_tile(ckpt, tmp_path):
    """70 x 100 pads to 96 x 128 = 12,288 pixels whole, over the limit; in 64-px tiles each window pads to at most
    95 x 95 = 9,025 and the image's own 7,000 pixels are under it."""
    image = encoded(noise(70, 100, seed=6))
    out = _predicted(tmp_path, ckpt, image, "big.png", "--tile", "64", "--overlap", "32")
    with client_for(ckpt, "--max-pixels", "10000") as client:
        whole = client.post("/predict", files={"file": ("big.png", image)})
    with client_for(ckpt, "--max-pixels", "10000", "--tile", "64", "--overlap", "32") as client:
        r = client.post("/predict", files={"file": ("big.png", image)})
        larger = client.post("/predict", files={"file": ("larger.png", encoded(noise(100, 101)))})
    assert whole.status_code == 413 and "computes on as 128x96 = 12,288 pixels" in whole.json()["error"]
    assert r.status_code == 200 and r.content == (out / "big.png").read_bytes()
    # Tiled or not, the image's own area is bounded too.
    assert (larger.status_code, larger.json()) == (413, {"error": "larger.png: image is 101x100 = 10,100 pixels, "
                                                                  "above this server's limit of 10,000 (--max-pixels, "
                                                                  "tiled or not); send a smaller image"})  # fmt: skip


def test_the_padded_area_is_that_of_the_largest_test_time_scale(ckpt):
    """40 x 60 pads to 64 x 64 = 4,096 pixels; at scale 2 the model computes on 80 x 120, padded to 96 x 128."""
    image = encoded(noise(40, 60, seed=8))
    with client_for(ckpt, "--max-pixels", "10000") as client:
        plain = client.post("/predict", files={"file": ("a.png", image)})
    with client_for(ckpt, "--max-pixels", "10000", "--scales", "1", "2") as client:
        scaled = client.post("/predict", files={"file": ("a.png", image)})
    assert plain.status_code == 200
    assert scaled.status_code == 413 and "computes on as 128x96 = 12,288 pixels" in scaled.json()["error"]


def _send_until_answered(sock: socket.socket, chunks) -> None:
    """Send ``chunks`` until the server answers or closes the connection."""
    for chunk in chunks:
        if select.select([sock], [], [], 0)[0]:
            return
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return


def test_upload_over_the_limit_is_refused_while_it_is_read(ckpt):
    """413 before the body ends: at once for a declared length over the limit, and for a chunked upload as soon as
    the limit is passed. Neither body is ever finished: a server that read the whole upload first would never
    answer."""
    from fcnseg.serve.app import create_app

    with client_for(ckpt, "--max-upload-mb", "1") as client, live(create_app(client.service)) as address:
        with socket.create_connection(address) as sock:  # headers only: 50 MB announced, none sent
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                         b"boundary=b\r\nContent-Length: 52428800\r\n\r\n")  # fmt: skip
            declared = until_closed(sock)
        with socket.create_connection(address) as sock:  # 1.5 MB of an unfinished chunked upload
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                         b"boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
            part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            _send_until_answered(sock, [b"10000\r\n" + b"\1" * 0x10000 + b"\r\n"] * 24)  # 1.5 MB, never ended
            chunked = until_closed(sock)
        _still_serving(client)
    assert declared.startswith(b"HTTP/1.1 413 ")
    assert declared.endswith(b'{"error": "upload of 50.0 MB is over this server\'s limit of 1 MB (--max-upload-mb); '
                             b'send a smaller file"}')  # fmt: skip
    assert chunked.startswith(b"HTTP/1.1 413 ")  # answered although the body never ended
    assert chunked.endswith(b'{"error": "upload is over this server\'s limit of 1 MB (--max-upload-mb); send a '
                            b'smaller file"}')  # fmt: skip


# ------------------------------------------------------------------------------------------ the pool


def test_a_full_queue_answers_503_with_retry_after(ckpt):
    gate, image = threading.Event(), encoded(noise(16, 16))
    with client_for(ckpt, "--workers-threads", "1", "--queue", "1") as client:
        segment = client.service.segmenter.segment
        client.service.segmenter.segment = lambda *a, **k: gate.wait(30) and segment(*a, **k)
        answers = []
        waiting = [threading.Thread(target=lambda: answers.append(client.post("/predict", files={"file": ("a.png",
                   image)}))) for _ in range(2)]  # fmt: skip
        for t in waiting:
            t.start()
        wait_for(lambda: client.get("/health").json()["admitted"] == 2)  # one running, one queued
        busy = client.post("/predict", files={"file": ("a.png", image)})
        gate.set()
        for t in waiting:
            t.join(30)
        after = client.post("/predict", files={"file": ("a.png", image)})
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
    assert busy.json()["error"].startswith("the server is busy (every worker and queue place taken); retry in ")
    assert [a.status_code for a in answers] == [200, 200] and answers[0].content == answers[1].content
    assert after.status_code == 200 and after.content == answers[0].content


def test_workers_share_the_thread_budget(ckpt):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with client_for(ckpt, "--workers-threads", "2") as client:
            card = client.get("/model").json()["serving"]
            assert (card["workers"], card["threads_per_worker"], torch.get_num_threads()) == (2, 1, 1)
            images = [encoded(noise(24, 32, seed=s)) for s in range(4)]
            answers = [client.post("/predict", files={"file": ("a.png", im)}).status_code for im in images]
            assert answers == [200] * 4
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ log


def test_one_log_line_per_request(ckpt, caplog):
    caplog.set_level(logging.INFO, logger="fcnseg.serve")
    with client_for(ckpt, "--max-pixels", "1100") as client:  # 11 x 9 pads to 32 x 32 = 1,024; 60 x 30 to 2,048
        client.post("/predict?format=json", files={"file": ("a.png", encoded(noise(9, 11)))})
        client.post("/predict", files={"file": ("b.png", encoded(noise(30, 60)))})
        client.get("/health")
    lines = [r.getMessage() for r in caplog.records if r.name == "fcnseg.serve"]
    assert len(lines) == 3
    pattern = r"^{} {} {} \d+\.\d ms {}$"
    for line, expected in zip(lines, [("POST", "/predict", 200, "11x9"), ("POST", "/predict", 413, "-"),
                                      ("GET", "/health", 200, "-")], strict=True):  # fmt: skip
        assert re.match(pattern.format(*expected), line), line


def test_timing_is_measured_not_made_up(ckpt):
    with client_for(ckpt) as client:
        start = time.perf_counter()
        answer = client.post("/predict?format=json", files={"file": ("a.png", encoded(noise(64, 64)))}).json()
        wall = (time.perf_counter() - start) * 1000
    t = answer["timing_ms"]
    assert 0 < t["read"] < t["total"] and 0 < t["inference"] < t["total"] <= wall
    assert t["read"] + t["inference"] == pytest.approx(t["total"], abs=0.05)
    json.dumps(answer)  # plain JSON throughout
