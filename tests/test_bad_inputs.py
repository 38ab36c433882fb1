"""The bad-input corpus: every case is generated here and its exact outcome asserted.

A user's mistake ends as one line on stderr naming the file or argument, with exit status 2 and no traceback;
batch commands still finish the good items. Inputs that are odd but valid (every PIL mode, 1 x 1, 1 x 5000) give
the correct result. Each case is one entry of CASES: (name, how the input is made, what must happen).
"""

from __future__ import annotations

import fractions
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.imageio import read_mask_png
from tests.engine.test_train import _blocks_tree
from tests.helpers import HANG_TIMEOUT, pillow_reads_its_ycbcr_tiff


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn8s", num_classes=4, width=1 / 16, fc_dim=8)
    return fcnseg.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "m.pt")


# ------------------------------------------------------------------------------------------- input makers


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header declares w x h, with an empty IDAT: enough for PIL to refuse it as a bomb on opening."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def _image_file(mode: str, size=(23, 17)):
    def make(tmp: Path) -> Path:
        rng = np.random.default_rng(0)
        rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        img = rgb.convert(mode) if mode not in ("I;16", "I;16B", "I", "F") else rgb.convert("L").convert(mode)
        path = (
            tmp / f"img_{mode.replace(';', '')}.{'tif' if mode in ('I', 'F', 'CMYK', 'YCbCr', 'PA', 'LAB') else 'png'}"
        )
        img.save(path)
        return path

    return make


def _raw(data: bytes, name: str):
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return make


def _truncated_jpeg(tmp: Path) -> Path:
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(tmp / "t.jpg", quality=90)
    data = (tmp / "t.jpg").read_bytes()
    (tmp / "t.jpg").write_bytes(data[: len(data) // 3])
    return tmp / "t.jpg"


def _bomb(tmp: Path) -> Path:
    _png_header_only(tmp / "bomb.png", 40_000, 40_000)  # 1.6 gigapixels, above PIL's limit
    return tmp / "bomb.png"


# -------------------------------------------------------------------------------------- predict on a file

# (name, maker, expected): expected "ok:HxW" = a mask of that size is written, else an error fragment.
PREDICT_CASES = [
    ("zero-byte-png", _raw(b"", "empty.png"), "cannot read image"),
    ("text-as-jpg", _raw(b"not an image at all\n", "notes.jpg"), "cannot read image"),
    ("truncated-jpeg", _truncated_jpeg, "cannot read image"),
    ("decompression-bomb", _bomb, "too large: 1,600,000,000 pixels, above PIL's limit"),
    ("mode-1", _image_file("1"), "ok:17x23"),
    ("mode-L", _image_file("L"), "ok:17x23"),
    ("mode-LA", _image_file("LA"), "ok:17x23"),
    ("mode-P", _image_file("P"), "ok:17x23"),
    ("mode-RGBA", _image_file("RGBA"), "ok:17x23"),
    ("mode-I;16", _image_file("I;16"), "ok:17x23"),
    ("mode-I", _image_file("I"), "ok:17x23"),
    ("mode-F", _image_file("F"), "ok:17x23"),
    ("mode-CMYK", _image_file("CMYK"), "ok:17x23"),
    # Pillow 12 writes uncompressed YCbCr TIFFs that it cannot read back: then the file is one bad input among many.
    ("mode-YCbCr", _image_file("YCbCr"), "ok:17x23" if pillow_reads_its_ycbcr_tiff() else "cannot read image"),
    ("mode-PA", _image_file("PA"), "ok:17x23"),
    ("mode-LAB", _image_file("LAB"), "ok:17x23"),
    ("mode-I;16B", _image_file("I;16B"), "ok:17x23"),
    ("one-pixel", _image_file("RGB", (1, 1)), "ok:1x1"),
    ("one-by-5000", _image_file("RGB", (5000, 1)), "ok:1x5000"),
]


@pytest.mark.parametrize("name, make, expected", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_corpus(name, make, expected, ckpt, tmp_path, capsys):
    path = make(tmp_path)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(good)
    code = main(["predict", str(ckpt), str(path), str(good), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert read_mask_png(tmp_path / "out" / "good.png").shape == (8, 9)  # the good file is always written
    if expected.startswith("ok:"):
        assert code == 0, err
        h, w = (int(v) for v in expected[3:].split("x"))
        mask = read_mask_png(tmp_path / "out" / f"{path.stem}.png")
        assert mask.shape == (h, w) and mask.max() < 4
    else:
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fcnseg: error: {path}") and expected in lines[0], err


# ------------------------------------------------------------------------------------ data (check-data)


def _tree(tmp: Path) -> Path:
    """A clean folder dataset: im0..im2 train, im3 val."""
    root = tmp / "data"
    _blocks_tree(root, n=4, size=32)
    (root / "train.txt").write_text("im0\nim1\nim2\n")
    (root / "val.txt").write_text("im3\n")
    return root


def _bad_value(root: Path) -> str:
    m = np.asarray(Image.open(root / "masks" / "im0.png")).copy()
    m[0, :2] = 7
    Image.fromarray(m).save(root / "masks" / "im0.png")
    return "values 7 (2 px) are neither a class index 0..3 nor 255 (void)"


def _other_size(root: Path) -> str:
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(root / "masks" / "im1.png")
    return "mask is 32x30 but its image im1.png is 32x32; expected the same size"


def _foreign_color(root: Path) -> str:
    m = np.zeros((32, 32, 3), np.uint8)
    m[:3, :3] = (9, 9, 9)
    Image.fromarray(m).save(root / "masks" / "im2.png")
    return "9,9,9 (9 px) not in the palette"


def _missing_id(root: Path) -> str:
    (root / "train.txt").write_text("im0\nim1\nim2\nghost\n")
    return "'ghost' has no image in images/ and no mask in masks/"


DATA_CASES = [
    ("mask-value-not-a-class", _bad_value),
    ("mask-of-another-size", _other_size),
    ("rgb-mask-foreign-colour", _foreign_color),
    ("split-names-missing-id", _missing_id),
]


@pytest.mark.parametrize("name, corrupt", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_check_data_corpus(name, corrupt, tmp_path, capsys):
    root = _tree(tmp_path)
    message = corrupt(root)
    assert main(["check-data", "--dataset", "folder", "--root", str(root), "--quiet"]) == 2
    out, err = capsys.readouterr()  # the problem lines on stdout, one count line on stderr
    assert message in out and "Traceback" not in err
    assert sum(line.startswith("fcnseg: error: ") for line in err.splitlines()) == 1


def test_mat_without_the_expected_key(tmp_path, capsys):
    root = tmp_path / "benchmark_RELEASE" / "dataset"
    (root / "img").mkdir(parents=True)
    (root / "cls").mkdir()
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(root / "img" / "2008_000001.jpg")
    scipy.io.savemat(root / "cls" / "2008_000001.mat", {"Other": np.zeros((6, 7), np.uint8)})
    (root / "train.txt").write_text("2008_000001\n")
    assert main(["check-data", "--dataset", "sbd", "--root", str(tmp_path), "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "2008_000001.mat" in out and "GTcls" in out and "Traceback" not in err


# ------------------------------------------------------------------------------ checkpoints, configs, output


def _edited_checkpoint(ckpt: Path, tmp: Path, **changes) -> Path:
    data = torch.load(ckpt, weights_only=True)
    data.update(changes)
    torch.save(data, tmp / "edited.pt")
    return tmp / "edited.pt"


def _other_architecture(ckpt, tmp):
    return _edited_checkpoint(ckpt, tmp, model="fcn32s")


def _newer_schema(ckpt, tmp):
    return _edited_checkpoint(ckpt, tmp, schema_version=99)


def _truncated(ckpt, tmp):
    (tmp / "cut.pt").write_bytes(ckpt.read_bytes()[:5000])
    return tmp / "cut.pt"


def _jpeg_renamed(ckpt, tmp):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "photo.jpg")
    (tmp / "photo.pt").write_bytes((tmp / "photo.jpg").read_bytes())
    return tmp / "photo.pt"


def _text_file(ckpt, tmp):
    (tmp / "notes.pt").write_text("these are my notes, not a network\n")
    return tmp / "notes.pt"


def _python_objects(ckpt, tmp):
    # A pickle of a class, not of tensors: what a weights-only read refuses (torch.save of a whole model is such).
    torch.save({"format": "fcnseg", "value": fractions.Fraction(1, 3)}, tmp / "objects.pt")
    return tmp / "objects.pt"


def _bare_state_dict(ckpt, tmp):
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], tmp / "bare.pt")
    return tmp / "bare.pt"


CKPT_CASES = [
    ("checkpoint-of-another-architecture", _other_architecture, "weights do not fit model 'fcn32s'"),
    ("checkpoint-newer-schema", _newer_schema, "schema version 99 is newer than this fcnseg reads"),
    ("checkpoint-truncated", _truncated, "truncated: the zip archive ends before its directory (5000 bytes)"),
    ("checkpoint-bare-state-dict", _bare_state_dict, "not an fcnseg checkpoint (a bare state dict?"),
    ("checkpoint-jpeg-renamed", _jpeg_renamed, "not a checkpoint: a JPEG image (a checkpoint is a zip archive"),
    ("checkpoint-text-file", _text_file, "not a checkpoint: a text file (a checkpoint is a zip archive"),
    ("checkpoint-python-objects", _python_objects, "holds Python objects beyond tensors"),
]


@pytest.mark.parametrize("name, make, message", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_checkpoint_corpus(name, make, message, ckpt, tmp_path, capsys):
    bad = make(ckpt, tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(bad), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fcnseg: error: {bad}") and message in err, err
    assert "weights_only" not in err and "WeightsUnpickler" not in err  # torch's lecture is not the user's problem
    assert not (tmp_path / "o").exists()  # refused before any output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_cuda_says_so(ckpt, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    argv = ["predict", str(ckpt), str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "fcnseg: error: --device cuda: this machine has no CUDA device; use --device cpu (or auto)\n"
    assert not (tmp_path / "o").exists()


CONFIG_CASES = [
    ("yaml-unknown-key", "iters: 5\nlearning_rate: 0.1\n", "learning_rate"),
    ("yaml-wrong-type", "iters: many\n", "iters"),
]


@pytest.mark.parametrize("name, text, key", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_corpus(name, text, key, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--config {tmp_path / 'c.yaml'}" in err and key in err, err
    assert not (tmp_path / "run").exists()


def test_output_folder_that_cannot_be_written(ckpt, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(ckpt), str(tmp_path / "x.png"), "--out", str(tmp_path / "a-file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {tmp_path / 'a-file' / 'sub'}: cannot create folder" in err


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan-array", "inf-array"])
def test_non_finite_array_given_to_the_api(bad, ckpt):
    model = fcnseg.load(ckpt)
    a = np.random.default_rng(0).random((10, 12, 3))
    a[3, 4, 1] = bad
    with pytest.raises(FcnsegError, match="image array contains NaN or inf values"):
        model.predict(a)


ARGUMENT_CASES = [
    ("missing-input", ["predict", "{ckpt}", "{tmp}/nope.png", "--out", "{tmp}/o"], "nope.png: no such file or folder"),
    (
        "tile-not-multiple-of-32",
        ["predict", "{ckpt}", "{tmp}/x.png", "--out", "{tmp}/o", "--tile", "100"],
        "--tile must be a positive multiple of 32 (the model's stride), got 100",
    ),
    (
        "overlap-too-large",
        ["predict", "{ckpt}", "{tmp}/x.png", "--out", "{tmp}/o", "--tile", "64", "--overlap", "40"],
        "--overlap must be between 0 and 32",
    ),
    (
        "missing-input-folder",
        ["predict", "{ckpt}", "{tmp}/no-folder", "--out", "{tmp}/o"],
        "no-folder: no such file or folder",
    ),
    ("unknown-runtime", ["predict", "{ckpt}", "{tmp}/x.png", "--out", "{tmp}/o", "--runtime", "fp4"], "--runtime"),
    (
        "bench-unknown-path",
        ["bench", "--paths", "eager", "onnxx"],
        "--paths 'onnxx': expected one of eager, winograd, bf16, onnx, onnx-int8, openvino, "
        "openvino-bf16, openvino-int8, compile, or all",
    ),
    ("unknown-weights", ["predict", "--weights", "fcn99s", "{tmp}/x.png", "--out", "{tmp}/o"], "unknown weights"),
    ("unknown-model", ["train", "--model", "fcn4s", "--out", "{tmp}/r", "--iters", "1"], "unknown model 'fcn4s'"),
    ("convert-garbage", ["convert", "{tmp}/x.png", "--format", "caffe", "--out", "{tmp}/c.pt"], "x.png"),
]


@pytest.mark.parametrize("name, argv, message", ARGUMENT_CASES, ids=[c[0] for c in ARGUMENT_CASES])
def test_argument_corpus(name, argv, message, ckpt, tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    assert main([a.format(ckpt=ckpt, tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fcnseg: error: ")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and "wrote 0" not in capsys.readouterr().out  # no output for a dead run


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pil_mode_in_memory(mode, ckpt):
    # Every mode PIL knows, handed to the API as an image object (some cannot be saved to any file format).
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 14, 3), dtype=np.uint8))
    try:
        img = rgb.convert(mode)
    except ValueError:
        img = rgb.convert("L").convert(mode)
    mask = fcnseg.load(ckpt).predict(img)
    assert mask.shape == (9, 14) and mask.dtype == np.uint8 and mask.max() < 4


def test_the_corpus_has_at_least_30_cases():
    n = len(PREDICT_CASES) + len(DATA_CASES) + 1 + len(CKPT_CASES) + len(CONFIG_CASES) + 1 + 2 + len(ARGUMENT_CASES)
    assert n >= 30, n


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"] + ["YCbCr"] * pillow_reads_its_ycbcr_tiff()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 70), w=st.integers(1, 70), mode=st.sampled_from(MODES), seed=st.integers(0, 2**16))
def test_predict_any_size_and_mode_gives_a_valid_palette_mask(ckpt, tmp_path, h, w, mode, seed):
    model = fcnseg.load(ckpt)
    rgb = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    img = rgb.convert(mode) if mode not in ("I;16", "I", "F") else rgb.convert("L").convert(mode)
    path = (
        tmp_path
        / f"in_{mode.replace(';', '')}_{h}x{w}.{'tif' if mode in ('I', 'F', 'CMYK', 'YCbCr', 'PA', 'LAB') else 'png'}"
    )
    img.save(path)
    out = tmp_path / f"out_{h}x{w}_{seed}"
    assert main(["predict", str(ckpt), str(path), "--out", str(out), "--quiet"]) == 0
    with Image.open(out / f"{path.stem}.png") as written:
        assert written.mode == "P" and written.size == (w, h)
        palette = np.asarray(written.getpalette()[: 3 * 4]).reshape(4, 3)
        labels = np.asarray(written)
    assert palette.tolist() == model.palette  # the checkpoint's colours, class c at index c
    assert labels.max() < model.num_classes
    assert np.array_equal(labels, model.predict(path))


def test_a_closed_pipe_ends_quietly():
    # `fcnseg weights | head -1`: the reader leaves early; no traceback, like any Unix tool.
    import subprocess
    import sys

    done = subprocess.run(
        f"'{sys.executable}' -m fcnseg weights | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert done.stdout.startswith("name") and done.stdout.count("\n") == 1
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_an_empty_checkpoint_file_is_named_as_such(ckpt, tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "empty.pt"), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"fcnseg: error: {tmp_path / 'empty.pt'}: empty file (0 bytes): an interrupted copy or download? " \
                  "copy it again\n"  # fmt: skip
