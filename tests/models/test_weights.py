"""The published-weights registry: entries, hash-checked downloads into torch.hub's cache, load / predict by name.

Nothing is fetched from the internet: downloads go to file:// URLs and to a local HTTP server, and the registry's
own entries are exercised with a stand-in file placed in the cache (the Caffe release publishes no hashes, so its
entries take any file of the right layout; torchfcn's md5 refuses a stand-in).
"""

import functools
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

import fcnseg
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.hub import weights_checkpoint
from fcnseg.imageio import read_mask_png
from fcnseg.models.registry import list_models
from fcnseg.models.weights import (
    FCNWeights,
    PublishedWeights,
    cache_dir,
    download,
    get_weights,
)
from fcnseg.palette import VOC_CLASSES
from fcnseg.preprocessing import CAFFE
from tests.caffe_files import write_caffemodel
from tests.helpers import fake_hub
from tests.models.test_caffe_import import fcn_layers, reference_forward

METRICS = {"pixel_acc", "mean_acc", "mean_iu", "fw_iu"}


@pytest.fixture
def hub(tmp_path):
    """torch.hub's folder in tmp_path for the test, restored afterwards: its checkpoints folder, the weights cache,
    not made here (unlike tests/helpers.py's ``hub``), so the first download must make it."""
    with fake_hub(tmp_path, create=False) as checkpoints:
        assert checkpoints == cache_dir()
        yield checkpoints


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ the entries


@pytest.mark.parametrize("entry", list(FCNWeights), ids=lambda w: w.id)
def test_every_entry_is_complete(entry):
    w = entry.value
    assert w.url.startswith(("http://", "https://")) and w.file_name
    assert w.model in list_models() and w.alignment == "caffe"
    assert w.num_classes == len(w.classes) >= 2 and len(set(w.classes)) == w.num_classes
    # Every published FCN expects the Caffe input: 0-255, a mean subtracted, no std scaling; colour images in BGR
    # order (reversing the colour channels only; the HHA-only net takes its images' channels as stored).
    p = w.preprocessing
    assert p.channel_order == ("RGB" if w.file_name.startswith("nyud-fcn32s-hha") else "BGR")
    assert p.value_range == 255.0 and p.std == (1.0,) * p.channels
    assert p.channels == (6 if "color-hha" in w.file_name else 3)
    # The four figures on the first data set; further entries may hold fewer (SIFT Flow's geometric pixel acc).
    assert w.metrics and set(next(iter(w.metrics.values()))) == METRICS
    assert all(set(m) <= METRICS and 0 < min(m.values()) <= max(m.values()) < 100 for m in w.metrics.values())
    if get_model_heads(w.model) > 1:
        assert w.head_classes and list(w.head_classes.values())[0] == w.classes
    assert w.format in ("caffe", "torchfcn") and (w.md5 or w.format == "caffe")
    assert get_weights(entry.id) is entry and get_weights(entry.name) is entry


def get_model_heads(name: str) -> int:
    with torch.device("meta"):
        return len(fcnseg.get_model(name).heads)


def test_entries_carry_the_reported_numbers():
    m = FCNWeights.FCN8S_HEAVY_PASCAL.value.metrics["seg11valid"]
    assert m == {"pixel_acc": 91.22, "mean_acc": 77.61, "mean_iu": 65.51, "fw_iu": 84.54}
    assert FCNWeights.FCN8S_HEAVY_PASCAL.value.preprocessing == CAFFE
    assert FCNWeights.TORCHFCN_FCN8S_ATONCE.value.model == "fcn8s_atonce"
    assert FCNWeights.NYUD_FCN32S_COLOR_HEAVY.value.num_classes == 40
    with pytest.raises(FcnsegError, match="unknown weights 'fcn9s'; expected one of: fcn32s-heavy-pascal"):
        get_weights("fcn9s")


# ------------------------------------------------------------------------------------------------ downloading


@pytest.fixture
def served(tmp_path):
    """A file served over file:// and over a local HTTP server."""
    root = tmp_path / "server"
    root.mkdir()
    payload = root / "model.bin"
    payload.write_bytes(np.random.default_rng(0).bytes(300_000))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield payload, {"file": payload.as_uri(), "http": f"http://127.0.0.1:{server.server_port}/model.bin"}
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_download_checks_the_hash(served, scheme, tmp_path):
    payload, urls = served
    cache = tmp_path / "cache"
    good = download(urls[scheme], cache / "a.bin", sha256=_sha256(payload), progress=False)
    assert good.read_bytes() == payload.read_bytes() and _leftovers(cache) == ["a.bin"]
    md5 = hashlib.md5(payload.read_bytes()).hexdigest()
    assert download(urls[scheme], cache / "b.bin", md5=md5, progress=False).is_file()
    with pytest.raises(
        FcnsegError,
        match=r"download of .* refused: sha256 is [0-9a-f]{64}, expected 0+ \(a different or damaged file\); nothing",
    ):
        download(urls[scheme], cache / "c.bin", sha256="0" * 64, progress=False)
    assert _leftovers(cache) == ["a.bin", "b.bin"]  # no c.bin, no temporary folder


def test_download_failure_is_one_line_and_leaves_nothing(served, tmp_path):
    _, urls = served
    cache = tmp_path / "cache"
    for url in (urls["http"].replace("model.bin", "gone.bin"), (tmp_path / "nowhere.bin").as_uri()):
        by_hand = r"fetch it by hand and pass it with --weights-file FILE .* or place it at .*x\.bin"
        with pytest.raises(FcnsegError, match=r"cannot download .*; " + by_hand):
            download(url, cache / "x.bin", progress=False)
    assert _leftovers(cache) == []


def _fake_entry(tmp_path, **changes) -> tuple[PublishedWeights, list]:
    """A published-weights entry whose 'published file' is a small FCN-16s caffemodel served over file://."""
    layers = fcn_layers("fcn16s", classes=21, seed=11)
    src = tmp_path / "server" / "fcn16s-test.caffemodel"
    src.parent.mkdir(exist_ok=True)
    write_caffemodel(src, layers)
    entry = PublishedWeights(
        src.as_uri(), src.name, "caffe", "fcn16s", VOC_CLASSES, CAFFE,
        {"seg11valid": {"pixel_acc": 1.0, "mean_acc": 2.0, "mean_iu": 3.0, "fw_iu": 4.0}}, sha256=_sha256(src),
    )  # fmt: skip
    for k, v in changes.items():
        object.__setattr__(entry, k, v)
    return entry, layers


def test_first_use_downloads_converts_and_caches(tmp_path, hub, monkeypatch):
    from fcnseg import hub as weights  # weights_checkpoint and import_file live in fcnseg.hub

    entry, layers = _fake_entry(tmp_path)
    ckpt = weights_checkpoint(entry, progress=False)
    assert ckpt["model"] == "fcn16s" and ckpt["preprocessing"] == CAFFE.to_dict()
    assert ckpt["extra"]["weights"]["metrics"]["seg11valid"]["mean_iu"] == 3.0
    # The file, the SHA-256 recorded at its download, and its conversion.
    assert _leftovers(hub) == ["fcn16s-test.caffemodel", "fcn16s-test.caffemodel.sha256", "fcn16s-test.fcnseg-v1.pt"]
    (tmp_path / "server" / "fcn16s-test.caffemodel").unlink()  # the second use needs no network...

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(weights, "import_file", no_conversion)  # ...and no conversion
    again = weights_checkpoint(entry, progress=False)
    assert all(torch.equal(again["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    # A damaged cached conversion is made again from the cached file, not trusted.
    monkeypatch.undo()
    (hub / "fcn16s-test.fcnseg-v1.pt").write_bytes(b"junk")
    assert torch.equal(
        weights_checkpoint(entry)["state_dict"]["score_heads.out.score_fr.weight"],
        ckpt["state_dict"]["score_heads.out.score_fr.weight"],
    )


def test_a_download_that_does_not_convert_is_not_kept(tmp_path, hub, capsys):
    # The Caffe entries have no hash: an error page saved under the model's name must not stay in the cache.
    page = tmp_path / "server" / "page.caffemodel"
    page.parent.mkdir()
    page.write_bytes(b"<html>quota exceeded</html>")
    entry = PublishedWeights(page.as_uri(), "x.caffemodel", "caffe", "fcn8s", VOC_CLASSES, CAFFE, {})
    with pytest.raises(FcnsegError, match=r"x.caffemodel: .*not a Caffe model.*\(downloaded from file:.*; removed\)"):
        weights_checkpoint(entry, progress=False)
    assert _leftovers(hub) == []


def test_truncated_download_is_refused(tmp_path):
    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)  # and the connection closes

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FcnsegError, match="cannot download .*received 10 of 1000 bytes"):
            download(f"http://127.0.0.1:{server.server_port}/f", tmp_path / "c" / "f", progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert _leftovers(tmp_path / "c") == []


def test_google_drive_and_cache_failures_are_one_line(tmp_path, hub, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def no_gdown(*args, **kwargs):
        raise RuntimeError("To download files from GDrive, 'gdown' is required.")

    monkeypatch.setattr(tv_utils, "download_file_from_google_drive", no_gdown)
    with pytest.raises(
        FcnsegError, match=r"cannot download https://drive.google.com/.*'gdown' is required.*place it at"
    ):
        weights_checkpoint("torchfcn-fcn32s", progress=False)
    assert _leftovers(hub) == []
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(FcnsegError, match="cannot write the weights cache .* set TORCH_HOME"):
        download("file:///nowhere", blocker / "sub" / "x.bin")


def test_wrong_hash_is_refused_and_nothing_is_cached(tmp_path, hub):
    entry, _ = _fake_entry(tmp_path, sha256="f" * 64)
    with pytest.raises(
        FcnsegError, match=r"refused: sha256 is .*, expected f+ \(a different or damaged file\); nothing was kept"
    ):
        weights_checkpoint(entry, progress=False)
    assert _leftovers(hub) == []
    # A local copy with the wrong hash is refused too, naming the file.
    local = tmp_path / "server" / "fcn16s-test.caffemodel"
    with pytest.raises(FcnsegError, match=f"{local}: sha256 is"):
        weights_checkpoint(entry, file=local)


# ------------------------------------------------------------------------------ the registry's own entries


@pytest.fixture
def stand_in(tmp_path, hub):
    """A stand-in for fcn16s-heavy-pascal.caffemodel (the release publishes no hash), placed in the cache."""
    layers = fcn_layers("fcn16s", classes=21, seed=5)
    hub.mkdir(parents=True)
    write_caffemodel(hub / "fcn16s-heavy-pascal.caffemodel", layers)
    return layers


def test_load_by_name_uses_the_cache_and_the_caffe_input(stand_in, tmp_path):
    model = fcnseg.load(FCNWeights.FCN16S_HEAVY_PASCAL)
    assert model.build_config["name"] == "fcn16s" and model.alignment == "caffe"
    assert model.preprocessing == CAFFE and model.classes == list(VOC_CLASSES)
    # predict() feeds what the Caffe weights expect: BGR, 0-255, minus the mean, never RGB in [0, 1].
    rgb = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    bgr = torch.from_numpy(rgb[:, :, ::-1].astype(np.float32).copy()).permute(2, 0, 1)
    x = (bgr - torch.tensor([104.00699, 116.66877, 122.67892]).view(3, 1, 1)).unsqueeze(0)
    with torch.no_grad():
        expected = reference_forward(stand_in, "fcn16s", x)[0]
    assert np.array_equal(model.predict(rgb), expected.argmax(0).numpy())
    assert np.allclose(model.predict_proba(rgb), expected.softmax(0).numpy(), atol=1e-5)


def test_predict_with_weights_name_and_a_local_file(stand_in, tmp_path, hub, capsys):
    from PIL import Image

    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(img)
    assert main(["predict", "--weights", "fcn16s-heavy-pascal", str(img), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    mask = read_mask_png(tmp_path / "a" / "in.png")
    assert mask.shape == (30, 41) and np.array_equal(mask, fcnseg.load("fcn16s-heavy-pascal").predict(img))
    # The same file given by hand, from anywhere (no cache involved).
    local = tmp_path / "mine.caffemodel"
    (hub / "fcn16s-heavy-pascal.caffemodel").rename(local)
    for f in _leftovers(hub):
        (hub / f).unlink()
    args = ["predict", "--weights", "fcn16s-heavy-pascal", "--weights-file", str(local), str(img)]
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert np.array_equal(read_mask_png(tmp_path / "b" / "in.png"), mask)
    assert _leftovers(hub) == []
    capsys.readouterr()
    assert main(["weights"]) == 0
    listing = capsys.readouterr().out
    assert "fcn8s-heavy-pascal" in listing and "65.51" in listing and "torchfcn-fcn8s-atonce" in listing


def test_the_listing_names_each_nets_input(capsys):
    # The input column says what the net reads: the colour order of its preprocessing, HHA for the HHA net (whose
    # preprocessing keeps the stored channel order, "RGB", though it reads no colour), both for the fusion net.
    from fcnseg.models.weights import FCNWeights

    assert main(["weights"]) == 0
    rows = {line.split()[0]: line.split()[3] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert rows["nyud-fcn32s-hha-heavy"] == "HHA" and rows["nyud-fcn32s-color-hha-heavy"] == "BGR+HHA"
    for w in FCNWeights:
        color = w.value.preprocessing.channel_order
        expected = {3: color, 6: f"{color}+HHA"}[w.value.preprocessing.channels]
        assert rows[w.id] == ("HHA" if w.id == "nyud-fcn32s-hha-heavy" else expected), w.id


def test_a_stand_in_for_a_hashed_file_is_refused(tmp_path, hub, capsys):
    fake = tmp_path / "fcn8s_from_caffe.pth"
    torch.save({"score_fr.weight": torch.zeros(21, 4096, 1, 1)}, fake)
    img = tmp_path / "x.png"
    args = ["predict", "--weights", "torchfcn-fcn8s", "--weights-file", str(fake), str(img), "--out", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{fake}: md5 is" in err and "expected de93e540ec79512f8770033849c8ae89" in err
    assert main(["predict", "--weights", "fcn99s", str(img), "--out", str(tmp_path)]) == 2
    assert "unknown weights 'fcn99s'" in capsys.readouterr().err
    with pytest.raises(FcnsegError, match="fcn99s: no such checkpoint file, nor published weights of that name"):
        fcnseg.load("fcn99s")


def test_training_from_published_weights_takes_their_input(stand_in, tmp_path):
    from fcnseg.engine.fitting import staged_init

    model = fcnseg.get_model("fcn8s", alignment="caffe", width=0.25, fc_dim=32, num_classes=21)
    assert model.preprocessing != CAFFE
    left = staged_init(model, "fcn16s-heavy-pascal")
    assert model.preprocessing == CAFFE
    # New in FCN-8s: the pool3 score layer and upsampler; the last upsampler is 16/8 instead of 32/16.
    assert left == [
        "score_heads.out.score_skip.pool3.bias",
        "score_heads.out.score_skip.pool3.weight",
        "score_heads.out.upsample_out.weight",
        "score_heads.out.upsample_skip.pool3.weight",
    ]


def test_convert_a_published_file_by_hand(stand_in, hub, tmp_path, capsys):
    # --weights NAME: the entry gives the model, the classes and the input (the NYUDv2 mean here).
    from fcnseg.checkpoint import read_checkpoint
    from fcnseg.models.weights import NYUD_CAFFE, NYUD_CLASSES

    nyud = fcn_layers("fcn32s", classes=40, seed=9)
    write_caffemodel(tmp_path / "nyud.caffemodel", nyud)
    out = tmp_path / "nyud.pt"
    assert (
        main(["convert", str(tmp_path / "nyud.caffemodel"), "--weights", "nyud-fcn32s-color-heavy", "--out", str(out)])
        == 0
    )
    ckpt = read_checkpoint(out)
    assert ckpt["preprocessing"] == NYUD_CAFFE.to_dict() and ckpt["classes"] == list(NYUD_CLASSES)
    # A file of another variant than the entry's is refused, and so is a --classes file of the wrong length.
    args = ["convert", str(hub / "fcn16s-heavy-pascal.caffemodel"), "--out", str(tmp_path / "y.pt")]
    assert main([*args, "--weights", "fcn32s-heavy-pascal"]) == 2
    assert "layer 'upscore2' (Deconvolution) has no counterpart in fcnseg fcn32s" in capsys.readouterr().err
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert main([*args, "--classes", str(tmp_path / "three.txt")]) == 2
    assert f"--classes {tmp_path / 'three.txt'}: 3 names given for a model of 21 classes" in capsys.readouterr().err


def test_nyud_hha_entry_takes_the_hha_image_as_stored():
    # The release's HHA net subtracts the HHA mean from the image's channels in their stored order (its reader
    # reverses only colour images), so the entry's input reverses nothing.
    from fcnseg.data.nyud import NYUD_CLASSES
    from fcnseg.models.weights import FCNWeights

    entry = FCNWeights.NYUD_FCN32S_HHA_HEAVY.value
    assert entry.model == "fcn32s" and entry.classes == NYUD_CLASSES and entry.file_name.endswith(".caffemodel")
    assert entry.metrics["nyudv2-test"] == {"pixel_acc": 57.1, "mean_acc": 35.2, "mean_iu": 24.2, "fw_iu": 40.4}
    hha = np.array([[[10, 20, 30]]], np.uint8)
    assert entry.preprocessing(hha).flatten().tolist() == pytest.approx([10 - 132.431, 20 - 94.076, 30 - 118.477])


def test_siftflow_and_color_hha_entries_load_from_the_cache(hub, tmp_path):
    # Stand-ins in the release's layouts (written as test_caffe_import.py writes them), placed where the download
    # would put them: loaded by name, with both heads' names and the six-channel input.
    from fcnseg.models.weights import NYUD_CAFFE_RGB_HHA, SIFTFLOW_CAFFE
    from tests.models.test_caffe_import import _split, _suffixed

    trunk, sem = _split(fcn_layers("fcn16s", classes=33, seed=1))
    _, geo = _split(fcn_layers("fcn16s", classes=3, seed=2))
    hub.mkdir(parents=True)
    write_caffemodel(hub / "siftflow-fcn16s-heavy.caffemodel", trunk + _suffixed(sem, "_sem") + _suffixed(geo, "_geo"))
    model = fcnseg.load("siftflow-fcn16s-heavy")
    assert model.heads == {"semantic": 33, "geometric": 3} and model.preprocessing == SIFTFLOW_CAFFE
    assert model.head_classes["geometric"] == ["sky", "horizontal", "vertical"] and model.classes[8] == "cow"
    masks = model.predict(np.zeros((20, 24, 3), np.uint8))
    assert masks["semantic"].shape == masks["geometric"].shape == (20, 24)
    color, hha = fcn_layers("fcn32s", classes=40, seed=3), fcn_layers("fcn32s", classes=40, seed=4)
    layers = [
        x
        for x in _suffixed(color, "color") + _suffixed(hha, "hha")
        if not x.name.startswith(("upscore", "loss", "score"))
    ]
    layers += [x for x in _suffixed(color, "color") + _suffixed(hha, "hha") if x.name.startswith("score_fr")]
    layers += [x for x in color if x.name == "upscore"]
    write_caffemodel(hub / "nyud-fcn32s-color-hha-heavy.caffemodel", layers)
    model = fcnseg.load("nyud-fcn32s-color-hha-heavy")
    assert model.in_channels == 6 and model.preprocessing == NYUD_CAFFE_RGB_HHA
