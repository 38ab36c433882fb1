"""`fcnseg predict` never writes over a file it reads, and no two inputs write over each other's outputs.

An output that would replace an input (the same path once resolved, or the same file through a hard link) is
refused in one line, exit status 2, before anything is written. Inputs whose outputs share a name (a/x.png and
b/x.png; x.png beside x_overlay.png or x_geometric.png) get ``STEM-2``, ``STEM-3``, ... in input order.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.imageio import read_mask_png
from tests.helpers import TINY, randomise


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "m.pt"
    fcnseg.save_checkpoint(randomise(fcnseg.get_model("fcn8s", num_classes=3, **TINY), seed=0), path)
    return path


@pytest.fixture(scope="module")
def twohead(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "two.pt"
    model = fcnseg.get_model("fcn16s_twohead", heads={"semantic": 4, "geometric": 3}, **TINY)
    fcnseg.save_checkpoint(randomise(model, seed=1), path)
    return path


def _image(path, seed: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _refused(args, folder, capsys) -> str:
    before = _snapshot(folder)
    assert main(["predict", *map(str, args), "--quiet"]) == 2
    assert _snapshot(folder) == before  # nothing written, nothing replaced
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_out_in_the_input_folder_does_not_replace_the_image(ckpt, tmp_path, capsys):
    _image(tmp_path / "same" / "photo.png", 0)
    err = _refused([ckpt, tmp_path / "same" / "photo.png", "--out", tmp_path / "same"], tmp_path / "same", capsys)
    assert err == (
        f"fcnseg: error: --out {tmp_path / 'same'}: the output photo.png of photo.png would overwrite the input "
        f"{tmp_path / 'same' / 'photo.png'}; expected an --out folder where no input has an output's name (a "
        "folder of its own, say)\n"
    )
    # A JPEG alone writes photo.png beside it: no input is replaced, so it is allowed.
    os.remove(tmp_path / "same" / "photo.png")
    _image(tmp_path / "same" / "photo.jpg", 0)
    assert main(["predict", str(ckpt), str(tmp_path / "same"), "--out", str(tmp_path / "same"), "--quiet"]) == 0
    assert sorted(os.listdir(tmp_path / "same")) == ["photo.jpg", "photo.png"]


def test_a_jpeg_mask_does_not_replace_the_png_of_the_same_stem(ckpt, tmp_path, capsys):
    _image(tmp_path / "in" / "x.jpg", 1)
    _image(tmp_path / "in" / "x.png", 2)
    err = _refused([ckpt, tmp_path / "in", "--out", tmp_path / "in"], tmp_path / "in", capsys)
    assert "the output x.png of x.jpg would overwrite the input" in err
    # Elsewhere, both are written under names of their own, each its own image's mask.
    assert main(["predict", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    model = fcnseg.load(ckpt)
    assert sorted(os.listdir(tmp_path / "out")) == ["x-2.png", "x.png"]
    np.testing.assert_array_equal(read_mask_png(tmp_path / "out" / "x.png"), model.predict(tmp_path / "in" / "x.jpg"))
    np.testing.assert_array_equal(read_mask_png(tmp_path / "out" / "x-2.png"), model.predict(tmp_path / "in" / "x.png"))


def test_overlays_and_other_heads_are_outputs_too(ckpt, twohead, tmp_path, capsys):
    _image(tmp_path / "in" / "a.jpg", 3)
    _image(tmp_path / "in" / "a_overlay.jpg", 4)
    args = [ckpt, tmp_path / "in", "--out", tmp_path / "in", "--probs", "--overlay", "jpg"]
    assert "the output a_overlay.jpg of a.jpg would overwrite" in _refused(args, tmp_path / "in", capsys)
    os.remove(tmp_path / "in" / "a_overlay.jpg")
    _image(tmp_path / "in" / "a_geometric.png", 5)
    args = [twohead, tmp_path / "in", "--out", tmp_path / "in"]
    assert "the output a_geometric.png of a.jpg would overwrite" in _refused(args, tmp_path / "in", capsys)


def test_links_to_inputs_are_inputs(ckpt, tmp_path, capsys):
    _image(tmp_path / "in" / "x.png", 6)
    (tmp_path / "link").symlink_to(tmp_path / "in")  # --out names the input folder through a symbolic link
    assert "would overwrite the input" in _refused(
        [ckpt, tmp_path / "in", "--out", tmp_path / "link"], tmp_path / "in", capsys
    )
    (tmp_path / "out").mkdir()
    os.link(tmp_path / "in" / "x.png", tmp_path / "out" / "x.png")  # the same file under another folder
    err = _refused([ckpt, tmp_path / "in", "--out", tmp_path / "out"], tmp_path / "in", capsys)
    assert f"the output x.png of x.png would overwrite the input {tmp_path / 'in' / 'x.png'}" in err


def test_the_extra_channels_and_the_checkpoint_are_inputs(tmp_path, capsys):
    ckpt = fcnseg.save_checkpoint(
        randomise(fcnseg.get_model("fcn32s", num_classes=3, in_channels=4, **TINY)), tmp_path / "d.pt"
    )
    _image(tmp_path / "rgb" / "x.jpg", 7)
    (tmp_path / "depth").mkdir()
    Image.fromarray(np.full((18, 22), 1200, np.uint16)).save(tmp_path / "depth" / "x.png")
    args = [ckpt, tmp_path / "rgb" / "x.jpg", "--extra", tmp_path / "depth", "--out", tmp_path / "depth"]
    err = _refused(args, tmp_path / "depth", capsys)
    assert f"the output x.png of x.jpg would overwrite the input {tmp_path / 'depth' / 'x.png'}" in err
    assert main(["predict", *map(str, args[:-1]), str(tmp_path / "out"), "--quiet"]) == 0
    assert os.listdir(tmp_path / "out") == ["x.png"]


def test_same_stems_never_share_an_output(ckpt, twohead, tmp_path):
    # c/x-2.png's own stem is the name b/x.png gets; a/x_geometric.png's is a's second head's.
    for i, name in enumerate(["a/x.png", "b/x.png", "c/x-2.png", "a/x_geometric.png"]):
        _image(tmp_path / name, 10 + i)
    inputs = [tmp_path / n for n in ("a/x.png", "b/x.png", "c/x-2.png", "a/x_geometric.png")]
    out = tmp_path / "out"
    assert main(["predict", str(twohead), *map(str, inputs), "--out", str(out), "--probs", "--quiet"]) == 0
    stems = ["x", "x-2", "x-2-2", "x_geometric-2"]
    assert sorted(os.listdir(out)) == sorted(
        f"{s}{h}.{e}" for s in stems for h in ("", "_geometric") for e in ("png", "npy")
    )
    model = fcnseg.load(twohead)
    for stem, source in zip(stems, inputs, strict=True):
        expected = model.predict(source)
        np.testing.assert_array_equal(read_mask_png(out / f"{stem}.png"), expected["semantic"])
        np.testing.assert_array_equal(read_mask_png(out / f"{stem}_geometric.png"), expected["geometric"])
        assert np.load(out / f"{stem}_geometric.npy").shape == (3, 18, 22)


def test_confidence_maps_are_each_heads_top_probability_by_hand(twohead, tmp_path):
    # --confidence writes STEM_confidence.png (and STEM_geometric_confidence.png): 16-bit grey, the largest class
    # probability x 65535, rounded; computed here from the model's own forward, each head its own softmax.
    _image(tmp_path / "in" / "x.png", 5)
    assert main(["predict", str(twohead), str(tmp_path / "in" / "x.png"), "--out", str(tmp_path / "out"),
                 "--confidence", "--runtime", "eager", "--quiet"]) == 0  # fmt: skip
    model = fcnseg.load(twohead).eval()
    rgb = np.asarray(Image.open(tmp_path / "in" / "x.png"))
    with torch.no_grad():
        logits = model(model.preprocessing(rgb)[None])[0].double()
    for name, part in (("x", logits[:4]), ("x_geometric", logits[4:])):
        with Image.open(tmp_path / "out" / f"{name}_confidence.png") as im:
            assert im.mode.startswith("I") and im.size == (22, 18)
            levels = np.asarray(im).astype(np.int64)
        expected = np.rint(part.softmax(0).max(0).values.numpy() * 65535)
        assert np.abs(levels - expected).max() <= 1
        assert levels.min() >= 65535 // 4 - 1  # never below a uniform guess over four classes (three for geometric)
