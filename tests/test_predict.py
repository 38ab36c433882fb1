"""`fcnseg predict` and `model.predict`: every PIL mode in, a palette mask at the original size out."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.palette import VOC_CLASSES, voc_palette
from tests.helpers import TINY


def _trained_like(num_classes: int, seed: int = 0) -> fcnseg.FCN:
    torch.manual_seed(seed)
    model = fcnseg.get_model("fcn8s", num_classes=num_classes, **TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                # Zero biases so that the scores follow the image rather than a constant.
                p.normal_(0, 0.3) if p.dim() > 1 else p.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def voc_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "voc.pt"
    fcnseg.save_checkpoint(_trained_like(21), path, classes=VOC_CLASSES)
    return path


def _mixed_images(folder):
    """One image per PIL mode, each of its own size; returns {file name: (height, width) as seen}."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    sizes = {}

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    Image.fromarray(rgb(31, 45)).save(folder / "rgb.jpg")
    Image.fromarray(rgb(20, 17)[..., 0]).save(folder / "grey.png")
    Image.fromarray(rgb(33, 40)[..., 0]).convert("LA").save(folder / "grey_alpha.png")
    Image.fromarray(rgb(25, 26)).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([rgb(19, 50), rgb(19, 50)[..., :1]]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65536, (21, 23), dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(rgb(24, 30)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb(18, 35)[..., 0] > 128).save(folder / "bits.png")
    # Stored 40 wide x 22 high, EXIF orientation 6 (rotate 90): a viewer shows 22 wide x 40 high.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb(22, 40)).save(folder / "rotated.jpg", exif=exif)
    for f in folder.iterdir():
        with Image.open(f) as im:
            w, h = im.size
        sizes[f.stem] = (w, h) if f.stem == "rotated" else (h, w)
    assert Image.open(folder / "deep.png").mode.startswith("I")
    return sizes


def test_predict_folder_of_mixed_modes(tmp_path, voc_ckpt, capsys):
    sizes = _mixed_images(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", str(voc_ckpt), str(tmp_path / "in"), "--out", str(out)]) == 0
    model = fcnseg.load(voc_ckpt)
    assert sorted(p.stem for p in out.iterdir()) == sorted(sizes)
    voc = voc_palette(256)
    labels = set()
    for stem, (h, w) in sizes.items():
        with Image.open(out / f"{stem}.png") as im:
            assert im.mode == "P"
            assert im.size == (w, h), stem
            pal = np.array(im.getpalette()[: 21 * 3]).reshape(21, 3)
            mask = np.array(im)
        np.testing.assert_array_equal(pal, voc[:21])
        # The file holds the model's own prediction for that image.
        expected = model.predict(tmp_path / "in" / next(f.name for f in (tmp_path / "in").iterdir() if f.stem == stem))
        np.testing.assert_array_equal(mask, expected)
        labels |= set(np.unique(mask).tolist())
    assert len(labels) > 1  # a non-trivial model: the comparison means something
    assert "wrote 9 mask(s)" in capsys.readouterr().out


def test_overlay_and_probabilities(tmp_path, voc_ckpt):
    img = np.random.default_rng(1).integers(0, 256, (27, 38, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(voc_ckpt),
            str(tmp_path / "a.png"),
            "--out",
            str(out),
            "--overlay",
            "png",
            "--probs",
        ]
    )
    assert code == 0
    probs = np.load(out / "a.npy")
    assert probs.shape == (21, 27, 38) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    mask = np.array(Image.open(out / "a.png"))
    np.testing.assert_array_equal(probs.argmax(0), mask)
    blend = np.array(Image.open(out / "a_overlay.png"))
    colors = voc_palette(256)[mask]
    expected = np.round(0.5 * img + 0.5 * colors)
    expected[mask == 0] = img[mask == 0]  # VOC's background is black: left untinted
    assert (mask == 0).any() and (mask != 0).any()
    assert np.abs(blend.astype(float) - expected).max() <= 1


def test_bad_files_are_listed_and_good_ones_written(tmp_path, voc_ckpt, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (10, 12), (200, 10, 10)).save(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    (tmp_path / "in" / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            str(voc_ckpt),
            str(tmp_path / "in"),
            str(tmp_path / "nothere.jpg"),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    assert [p.name for p in out.iterdir()] == ["good.png"]
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("fcnseg: error:")]
    assert len(err) == 3
    assert any("empty.jpg" in line for line in err)
    assert any("notes.png" in line for line in err)
    assert any("nothere.jpg: no such file or folder" in line for line in err)


def test_globs_and_duplicate_stems(tmp_path, voc_ckpt):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (9, 7)).save(tmp_path / sub / "x.png")
    out = tmp_path / "out"
    assert main(["predict", str(voc_ckpt), str(tmp_path / "*" / "x.png"), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x-2.png", "x.png"]


def test_generated_palette_for_other_classes(tmp_path):
    classes = ["sky", "tree", "road"]
    ckpt = fcnseg.save_checkpoint(_trained_like(3), tmp_path / "m.pt", classes=classes)
    Image.new("RGB", (16, 16), (30, 60, 90)).save(tmp_path / "a.png")
    assert main(["predict", str(ckpt), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 0
    pal = np.array(Image.open(tmp_path / "o" / "a.png").getpalette()[:9]).reshape(3, 3)
    np.testing.assert_array_equal(pal, np.array(fcnseg.load(ckpt).palette))
    assert not np.array_equal(pal, voc_palette(3))
    assert len({tuple(c) for c in pal}) == 3


@pytest.mark.parametrize("alignment", ["caffe", "aligned"])
def test_python_api_predict(alignment, tmp_path):
    model = _trained_like(5)
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "m.pt")
    loaded = fcnseg.load(ckpt)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (13, 29, 3), dtype=np.uint8))
    mask = loaded.predict(img)
    assert mask.shape == (13, 29) and mask.dtype == np.uint8
    with torch.no_grad():
        x = loaded.preprocessing(np.asarray(img)).unsqueeze(0)
        np.testing.assert_array_equal(mask, loaded(x)[0].argmax(0).numpy())
    model.train()
    model.predict(img)
    assert model.training  # predict switches to eval only for its own call


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fcnseg",
            "predict",
            str(tmp_path / "none.pt"),
            "x.jpg",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"fcnseg: error: {tmp_path / 'none.pt'}: no such checkpoint file"
    assert "Traceback" not in r.stderr
