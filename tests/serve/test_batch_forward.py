"""``fcnseg serve --batch N``: /predict/batch runs a request's images of one size as one forward pass, whose padded
areas together stay within ``--max-pixels``; every image still gets its own answer, as one by one.

The red detector (class 1 on an all-red image, class 0 on an all-blue one, by wide margins) is the exact oracle of
which answer belongs to which image; a random-weight model's batched masks are compared with one image's at a time
through the eager logits, wherever the top two are further apart than float rounding.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import fcnseg
from fcnseg.inference import Predictor
from fcnseg.predict import forward_size
from fcnseg.serve.segment import Segmenter, ServeError, Upload
from tests.helpers import TINY, randomise
from tests.serve.serving import client_for, encoded, noise, red_checkpoint

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

A, B = (30, 40), (24, 56)  # (height, width)


@pytest.fixture
def passes(monkeypatch) -> list[int]:
    """The batch size of every forward pass, recorded as the Predictor runs them (on the pool's threads too)."""
    seen: list[int] = []
    original = Predictor.batch_scores

    def recording(self, x):
        seen.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(Predictor, "batch_scores", recording)
    return seen


def _plain(size: tuple[int, int], channel: int) -> bytes:
    rgb = np.zeros((*size, 3), np.uint8)
    rgb[..., channel] = 255
    return encoded(rgb)


def _mask(entry: dict, head: int = 0) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(entry["heads"][head]["mask_png"]))))


def _batch(client, images: list[tuple[str, bytes]]) -> list[dict]:
    answer = client.post("/predict/batch", files=[("files", item) for item in images])
    assert answer.status_code == 200, answer.text
    return answer.json()["results"]


def test_a_mixed_batch_runs_by_size_and_answers_each_image_its_own(tmp_path, passes):
    ckpt = red_checkpoint(tmp_path / "red.pt")
    # Sizes A and B interleaved, a file that is no image in the middle; A red, red, blue and B blue, blue, red, so
    # that no reordering within a pass leaves every image its own colour.
    colours = [("a", A, 0), ("b", B, 2), ("c", A, 0), ("d", B, 2), ("e", A, 2), ("f", B, 0)]
    images = [(f"{n}.png", _plain(size, ch)) for n, size, ch in colours]
    images.insert(3, ("notes.png", b"not an image"))
    with client_for(ckpt, "--runtime", "eager", "--batch", "4") as client:
        results = _batch(client, images)
        assert sorted(passes) == [3, 3]  # one pass per size, across the request's order
        passes.clear()
        singles = [client.post("/predict?format=json", files={"file": item}).json() for item in images]
        assert client.get("/model").json()["serving"]["batch"] == 4
    assert [r["file"] for r in results] == [name for name, _ in images]
    assert [r["status"] for r in results] == [200, 200, 200, 400, 200, 200, 200]
    assert results[3] == {"file": "notes.png", "status": 400, "error": singles[3]["error"]}
    good = [r for r in results if r["status"] == 200]
    for (name, size, channel), entry in zip(colours, good, strict=True):
        assert (entry["height"], entry["width"]) == size
        assert (_mask(entry) == (1 if channel == 0 else 0)).all(), name
    # Each answer is the one-image answer, but for its timing.
    for entry, single in zip(results, singles, strict=True):
        if entry["status"] == 200:
            assert {k: v for k, v in entry.items() if k not in ("timing_ms", "status")} == {
                k: v for k, v in single.items() if k != "timing_ms"}  # fmt: skip
            t = entry["timing_ms"]
            assert t["read"] + t["inference"] == pytest.approx(t["total"], abs=0.05) and t["inference"] > 0


def test_random_weights_batched_masks_equal_one_by_one_where_decided(tmp_path, passes):
    model = fcnseg.get_model("fcn8s", num_classes=5, **TINY)
    ckpt = fcnseg.save_checkpoint(randomise(model, seed=3).eval(), tmp_path / "m.pt")
    rgbs = [noise(*(A, B)[i % 2], seed=i) for i in range(6)]
    with client_for(ckpt, "--runtime", "eager") as client:  # the default --batch: 8
        results = _batch(client, [(f"{i}.png", encoded(rgb)) for i, rgb in enumerate(rgbs)])
        assert client.get("/model").json()["serving"]["batch"] == 8
    assert sorted(passes) == [3, 3]
    reference = Predictor(fcnseg.load(ckpt), runtime="eager")
    for rgb, entry in zip(rgbs, results, strict=True):
        logits = reference.logits([rgb])[0]["out"].numpy()  # one image alone
        top2 = np.sort(logits, axis=0)[-2:]
        decided = top2[1] - top2[0] > 1e-4
        assert decided.mean() > 0.9
        np.testing.assert_array_equal(_mask(entry)[decided], logits.argmax(0)[decided])


def test_the_pixel_bound_splits_a_batch_and_refuses_an_image_alone(tmp_path, passes):
    ckpt = red_checkpoint(tmp_path / "red.pt")
    rows, cols = forward_size(Predictor(fcnseg.load(ckpt)), *A)
    limit = 2 * rows * cols + 1  # two images of size A in one pass, not three
    big = np.zeros((70, 90, 3), np.uint8)  # more than the limit on its own: 413, as /predict answers it
    images = [(f"{i}.png", _plain(A, 0)) for i in range(5)]
    images.insert(2, ("big.png", encoded(big)))
    with client_for(ckpt, "--runtime", "eager", "--batch", "8", "--max-pixels", str(limit)) as client:
        results = _batch(client, images)
        single = client.post("/predict", files={"file": ("big.png", encoded(big))})
    assert passes == [2, 2, 1]  # every pass within --max-pixels
    assert [r["status"] for r in results] == [200, 200, 413, 200, 200, 200]
    assert single.status_code == 413 and results[2]["error"] == single.json()["error"]


def test_a_two_headed_model_batched(tmp_path, passes):
    model = randomise(fcnseg.get_model("fcn16s_twohead", heads={"semantic": 4, "geometric": 3}, **TINY), seed=4)
    ckpt = fcnseg.save_checkpoint(model.eval(), tmp_path / "two.pt")
    images = [(f"{i}.png", encoded(noise(*A, seed=i))) for i in range(3)]
    with client_for(ckpt, "--runtime", "eager", "--batch", "3") as client:
        results = _batch(client, images)
    assert passes == [3]
    reference = Predictor(fcnseg.load(ckpt), runtime="eager")
    for (_, data), entry in zip(images, results, strict=True):
        assert [h["name"] for h in entry["heads"]] == ["semantic", "geometric"]
        logits = reference.logits([np.array(Image.open(io.BytesIO(data)))])[0]
        for i, head in enumerate(("semantic", "geometric")):
            scores = logits[head].numpy()
            top2 = np.sort(scores, axis=0)[-2:]
            decided = top2[1] - top2[0] > 1e-4
            np.testing.assert_array_equal(_mask(entry, i)[decided], scores.argmax(0)[decided])


def test_batch_one_runs_one_image_a_pass(tmp_path, passes):
    ckpt = red_checkpoint(tmp_path / "red.pt")
    with client_for(ckpt, "--runtime", "eager", "--batch", "1") as client:
        results = _batch(client, [(f"{i}.png", _plain(A, 0)) for i in range(3)])
    assert passes == [1, 1, 1] and [r["status"] for r in results] == [200] * 3


@pytest.mark.parametrize(
    "error, status, message",
    [
        (fcnseg.errors.FcnsegError("the model cannot take this input"), 422, "the model cannot take this input"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory\ndetail"), 500,
         "1.png: cannot segment it (DefaultCPUAllocator: can't allocate memory)"),
    ],
)  # fmt: skip
def test_one_image_the_model_refuses_does_not_fail_its_group(tmp_path, monkeypatch, error, status, message):
    """A refusal by the model (a pass that raises: fcnseg's error, or torch's own) is that image's answer alone;
    the others are segmented."""
    ckpt = red_checkpoint(tmp_path / "red.pt")
    seg = Segmenter(Predictor(fcnseg.load(ckpt), runtime="eager"), batch=4)
    original = Predictor.outputs

    def picky(self, images, **options):
        if any(int(x[0, 0, 1]) == 7 for x in images):  # the image marked with green 7
            raise error
        return original(self, images, **options)

    monkeypatch.setattr(Predictor, "outputs", picky)
    marked = np.zeros((*A, 3), np.uint8)
    marked[..., 1] = 7
    uploads = [Upload(f"{i}.png", io.BytesIO(data)) for i, data in enumerate([_plain(A, 0), encoded(marked),
                                                                             _plain(A, 2)])]  # fmt: skip
    assert seg.batch_groups(uploads) == [[0, 1, 2]]
    first, refused, last = seg.segment_batch(uploads)
    assert isinstance(refused, ServeError) and (refused.status, str(refused)) == (status, message)
    assert (first.heads[0].mask == 1).all() and (last.heads[0].mask == 0).all()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_bad_batch_flag_is_one_line(tmp_path, capsys, value):
    from fcnseg.cli import main

    ckpt = red_checkpoint(tmp_path / "red.pt")
    assert main(["serve", str(ckpt), "--port", "0", "--batch", value]) == 2
    assert capsys.readouterr().err == f"fcnseg: error: --batch {value}: expected at least 1 image\n"


@pytest.mark.parametrize("batch", ["1", "4"])
def test_a_batch_over_eight_requests_worth_of_pixels_is_refused_whole(tmp_path, batch):
    """The request's padded areas summed, from the headers: 8 images each at --max-pixels are served, a 9th is
    one request too many (413, one line, nothing decoded), and the server keeps serving."""
    from fcnseg.serve.segment import BATCH_COST

    ckpt = red_checkpoint(tmp_path / "red.pt")
    rows, cols = forward_size(Predictor(fcnseg.load(ckpt)), *A)
    with client_for(ckpt, "--runtime", "eager", "--batch", batch, "--max-pixels", str(rows * cols)) as client:
        results = _batch(client, [(f"{i}.png", _plain(A, 0)) for i in range(BATCH_COST)])
        assert [r["status"] for r in results] == [200] * BATCH_COST
        files = [("files", (f"{i}.png", _plain(A, 0))) for i in range(BATCH_COST + 1)]
        refused = client.post("/predict/batch", files=files)
        assert (refused.status_code, refused.json()) == (413, {"error": (
            f"the batch's images make the model compute on {(BATCH_COST + 1) * rows * cols:,} pixels with their "
            f"padding, above this server's limit of {BATCH_COST * rows * cols:,} for one request (8 x --max-pixels); "
            "send them in several requests")})  # fmt: skip
        assert _batch(client, [("a.png", _plain(A, 0))])[0]["status"] == 200
