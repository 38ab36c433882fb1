"""`fcnseg predict --engine ray` and :func:`fcnseg.ray_batch.predict_dataset`, on a Ray cluster of two CPUs that
this module starts (``ray.init``) and stops.

The CLI runs in this process, which is already connected to that cluster, so ``--address auto`` takes the
connection it has (a separate process would find the cluster the same way). Oracles: the files of the
single-process ``fcnseg predict`` with the same flags and the same torch thread count as each worker (one: float
sums split across threads round differently), compared byte for byte; the masks also against the argmax of the
model's eager PyTorch logits, and read back by Pillow.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from tests.helpers import TINY, randomise

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'fcnseg[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'fcnseg[ray]'")

# (height, width) of the 20 images, 20x28 .. 40x36; even ones are JPEG, odd ones PNG.
SIZES = [(20 + 5 * (i % 5), 28 + 4 * (i % 3)) for i in range(20)]
FLAGS = ["--overlay", "--confidence", "--probs", "--runtime", "eager", "--quiet"]  # --quiet last
RAY = ["--engine", "ray", "--address", "auto", "--workers", "2"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint of a tiny random fcn8s of 3 classes, folder of 20 images and a truncated PNG)."""
    root = tmp_path_factory.mktemp("ray")
    model = randomise(fcnseg.get_model("fcn8s", num_classes=3, **TINY), seed=0).eval()
    ckpt = fcnseg.save_checkpoint(model, root / "m.pt")
    folder = root / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate(SIZES):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
    (folder / "broken.png").write_bytes((folder / "img01.png").read_bytes()[:60])
    return ckpt, folder


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> tuple[Path, str]:
    """The single-process run's folder and its stderr (one thread, as each worker computes)."""
    ckpt, folder = data
    out = tmp_path_factory.mktemp("single") / "out"
    with _threads(1):
        code, _, err = _run(["predict", str(ckpt), str(folder), "--out", str(out), *FLAGS])
    assert code == 2
    return out, err


@pytest.fixture(scope="module")
def on_ray(cluster, data, tmp_path_factory) -> tuple[Path, str]:
    ckpt, folder = data
    out = tmp_path_factory.mktemp("ray") / "out"
    code, _, err = _run(["predict", str(ckpt), str(folder), "--out", str(out), *FLAGS, *RAY])
    assert code == 2
    return out, err


def _eager_masks(ckpt: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """The oracle of every mask: argmax of the model's own forward on its normalised input."""
    model = fcnseg.load(ckpt)
    with torch.no_grad():
        return [model(model.preprocessing(rgb)[None])[0].argmax(0).numpy() for rgb in images]


def test_the_files_are_those_of_a_single_process_run(data, single, on_ray):
    ckpt, folder = data
    (local, _), (out, _) = single, on_ray
    expected = _files(local)
    assert len(expected) == 80  # 20 images x (mask, overlay, probabilities, confidence)
    got = _files(out)
    assert got.keys() == expected.keys()
    assert [name for name in expected if got[name] != expected[name]] == []
    assert _leftovers(out) == []
    images = [np.array(Image.open(folder / f"img{i:02d}.{'png' if i % 2 else 'jpg'}").convert("RGB")) for i in
              range(20)]  # fmt: skip
    for i, mask in enumerate(_eager_masks(ckpt, images)):
        assert np.array_equal(np.array(Image.open(out / f"img{i:02d}.png")), mask), i
        probs = np.load(out / f"img{i:02d}.npy")
        assert probs.shape == (3, *SIZES[i]) and np.allclose(probs.sum(0), 1, atol=1e-5)


def _errors(stderr: str) -> list[str]:
    return re.findall(r"^fcnseg: error: .*$", stderr, flags=re.MULTILINE)


def test_a_broken_image_is_reported_and_the_others_written(data, single, on_ray):
    _, folder = data
    (_, local_err), (_, err) = single, on_ray
    assert (
        _errors(err)
        == _errors(local_err)
        == [f"fcnseg: error: {folder}/broken.png: cannot read image (truncated file)"]
    )


def test_a_rerun_skips_what_is_complete_and_writes_nothing(data, on_ray):
    ckpt, folder = data
    out, _ = on_ray
    before = _stats(out)
    code, printed, err = _run(["predict", str(ckpt), str(folder), "--out", str(out), *FLAGS[:-1], *RAY])
    assert code == 2 and "broken.png: cannot read image (truncated file)" in err
    assert "skipped 20 input(s)" in printed and "wrote 0 mask(s)" in printed
    assert _stats(out) == before  # every file, the record included: same inode, same modification time
    # Other settings (another output asked for) make the recorded files no longer the answer: all are written.
    code, printed, _ = _run(["predict", str(ckpt), str(folder), "--out", str(out), *FLAGS[:-1], "--flip", *RAY])
    assert code == 2 and "skipped" not in printed and "wrote 20 mask(s)" in printed
    changed = _stats(out)
    assert all(changed[name] != before[name] for name in _files(out))


def _workers() -> list:
    """The Ray Data map workers started under this process (Ray titles them ``ray::MapWorker(...)``)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "MapWorker(MapBatches(" in " ".join(p.cmdline()):
                found.append(p)
    return found


def _kill_one_when_writing(out: Path, seen: dict) -> None:
    """Wait for the first mask, then SIGKILL one worker: a run in the middle of its inputs."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        masks = list(out.glob("img*.png")) if out.is_dir() else []
        workers = _workers()
        if masks and workers:
            seen["masks"] = len([m for m in masks if "_confidence" not in m.name])
            seen["pid"] = workers[0].pid
            os.kill(workers[0].pid, signal.SIGKILL)
            return
        time.sleep(0.005)


def test_a_killed_worker_is_replaced_and_the_files_are_whole(data, single, cluster, tmp_path):
    """Inputs as file:// URLs (read through fsspec); one worker killed once the first mask is written."""
    psutil = pytest.importorskip("psutil", reason="psutil finds the workers' processes")
    ckpt, folder = data
    local, _ = single
    out = tmp_path / "out"
    seen: dict = {}
    killer = threading.Thread(target=_kill_one_when_writing, args=(out, seen))
    killer.start()
    try:
        code, printed, err = _run(["predict", str(ckpt), f"file://{folder}", "--out", str(out), *FLAGS[:-1], *RAY])
    finally:
        killer.join()
    assert seen and seen["masks"] < 20, seen  # killed in the middle of the run
    assert not psutil.pid_exists(seen["pid"]) or psutil.Process(seen["pid"]).status() == psutil.STATUS_ZOMBIE
    assert code == 2 and f"fcnseg: error: file://{folder}/broken.png: cannot read image (truncated file)" in err
    assert "wrote 20 mask(s)" in printed
    got, expected = _files(out), _files(local)
    assert got.keys() == expected.keys()
    assert [name for name in expected if got[name] != expected[name]] == []
    assert _leftovers(out) == []


def test_a_retried_batch_writes_only_what_this_run_has_not(data, single, tmp_path):
    """Ray retries the whole batch of a worker that died: the files this run wrote before the death stay as they
    are (same inode, same time), and a file from before the run (another model's, say) is replaced. The worker
    runs in this process here, its batches given by hand."""
    import functools

    from fcnseg.inference import Predictor
    from fcnseg.predict import output_names
    from fcnseg.ray_batch import Job, ModelSource, WriteOptions, _FileWriter, _row, identities, local_input

    ckpt, folder = data
    local, _ = single
    out = tmp_path / "out"
    out.mkdir()
    model = fcnseg.load(ckpt)
    for name in output_names(model, "img02", probs=True, confidence=True):
        (out / name).write_bytes(b"from an earlier run")
    jobs = []
    for i, path in ((1, folder / "img01.png"), (2, folder / "img02.jpg")):
        names = tuple(output_names(model, path.stem, probs=True, confidence=True))
        jobs.append(Job(i, local_input(path), path.stem, names, identities(out, names)))
    rows = np.array([_row(job)["job"] for job in jobs], dtype=object)
    options = WriteOptions(str(out), probs=True, confidence=True)
    with _threads(1):
        worker = _FileWriter(ModelSource(source=str(ckpt)), functools.partial(Predictor, runtime="eager"), 1, options)
        first = worker({"job": rows[:1]})  # the batch's first job written, then the worker died
        assert list(first["problem"]) == [""] and _leftovers(out) == []
        img01 = {name: (out / name).stat() for name in jobs[0].names}
        retried = worker({"job": rows})
    assert list(retried["index"]) == [1, 2] and list(retried["problem"]) == ["", ""]
    for name, st in img01.items():
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    expected = _files(local)
    assert _files(out) == {name: expected[name] for name in (*jobs[0].names, *jobs[1].names)}
    assert _leftovers(out) == [] and [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_predict_dataset_of_arrays_and_of_file_bytes(data, cluster):
    from fcnseg.inference import Predictor
    from fcnseg.ray_batch import predict_dataset

    ckpt, folder = data
    model = fcnseg.load(ckpt)
    images = [np.asarray(Image.open(folder / f"img{i:02d}.png").convert("RGB")) for i in (1, 3, 5, 7)]
    expected = Predictor(model).masks(images)
    ds = ray.data.from_items([{"id": i, "image": image} for i, image in enumerate(images)], override_num_blocks=2)
    rows = sorted(predict_dataset(ds, model, concurrency=2).take_all(), key=lambda row: row["id"])
    assert [row["id"] for row in rows] == [0, 1, 2, 3] and "image" not in rows[0]
    for row, want, oracle in zip(rows, expected, _eager_masks(ckpt, images), strict=True):
        assert row["error"] == "" and row["mask"].dtype == np.uint8
        assert np.array_equal(row["mask"], want["out"]) and np.array_equal(row["mask"], oracle)
    # Encoded files, as Ray Data reads them; the truncated one is named in its row's error.
    paths = [str(folder / "img00.jpg"), str(folder / "img01.png"), str(folder / "broken.png")]
    ds = ray.data.read_binary_files(paths, include_paths=True)
    rows = {Path(row["path"]).name: row for row in predict_dataset(ds, str(ckpt), column="bytes").take_all()}
    assert rows["broken.png"]["error"].endswith("broken.png: cannot read image (truncated file)")
    assert rows["broken.png"]["mask"].shape == (0, 0)
    for name in ("img00.jpg", "img01.png"):
        rgb = np.asarray(Image.open(folder / name).convert("RGB"))
        assert rows[name]["error"] == ""
        assert np.array_equal(rows[name]["mask"], Predictor(model).masks([rgb])[0]["out"])
