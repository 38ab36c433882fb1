"""`fcnseg predict --batch N`: images of one size run as one forward pass, bounded in count and in padded pixels,
and the files written are those of ``--batch 1``.

Two oracles. A hand-built red detector (class 1 on an all-red image, class 0 on an all-blue one, by wide margins)
gives each image's mask exactly, so a batch that hands one image's output to another, or mixes images up, is seen
bit for bit. For random-weight models, ``--batch 1`` is the reference: a batched convolution sums in another order,
so values agree to float rounding and masks wherever the top two probabilities are further apart than that.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fcnseg
from fcnseg.cli import main
from fcnseg.errors import FcnsegError
from fcnseg.imageio import read_mask_png
from fcnseg.inference import Predictor
from fcnseg.predict import batch_groups, forward_size
from tests.helpers import TINY, randomise
from tests.serve.serving import red_checkpoint

A, B, C = (30, 40), (24, 56), (20, 20)  # (height, width): A and B interleaved in the folder, C once
TOL = 1e-4  # probabilities of a batched pass against one image's: float rounding only


@pytest.fixture
def passes(monkeypatch) -> list[tuple[int, ...]]:
    """The shape of every forward pass's input (N x C x H x W), recorded as the Predictor runs them."""
    seen: list[tuple[int, ...]] = []
    original = Predictor.batch_scores

    def recording(self, x):
        seen.append(tuple(x.shape))
        return original(self, x)

    monkeypatch.setattr(Predictor, "batch_scores", recording)
    return seen


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    model = randomise(fcnseg.get_model("fcn8s", num_classes=5, **TINY), seed=0).eval()
    return fcnseg.save_checkpoint(model, tmp_path_factory.mktemp("m") / "m.pt")


@pytest.fixture(scope="module")
def twohead(tmp_path_factory) -> Path:
    model = randomise(fcnseg.get_model("fcn16s_twohead", heads={"semantic": 4, "geometric": 3}, **TINY), seed=1)
    return fcnseg.save_checkpoint(model.eval(), tmp_path_factory.mktemp("m") / "two.pt")


def _noise(path: Path, size: tuple[int, int], seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _plain(path: Path, size: tuple[int, int], channel: int) -> None:
    rgb = np.zeros((*size, 3), np.uint8)
    rgb[..., channel] = 255
    Image.fromarray(rgb).save(path)


def _truncated(path: Path, size: tuple[int, int]) -> None:
    """A PNG whose header (so its size) reads but whose pixels do not: it joins its size's batch, then fails."""
    _noise(path, size, 99)
    path.write_bytes(path.read_bytes()[:120])


def _mixed_folder(folder: Path) -> list[str]:
    """Sizes A and B interleaved, C once, a truncated A image in the middle (``e_cut``); the good stems."""
    folder.mkdir()
    sizes = [A, B, A, B, None, A, B, C]
    for i, size in enumerate(sizes):
        if size is not None:
            _noise(folder / f"{'abcdefgh'[i]}.png", size, i)
    _truncated(folder / "e_cut.png", A)
    return [f"{'abcdefgh'[i]}" for i, s in enumerate(sizes) if s is not None]


def _predict(ckpt: Path, folder: Path, out: Path, *flags: str) -> int:
    return main(["predict", str(ckpt), str(folder), "--out", str(out), "--runtime", "eager", "--quiet", *flags])


def _assert_same_files(one: Path, batched: Path) -> None:
    """``batched`` holds the files of ``one`` (``--batch 1``), their values equal to float rounding."""
    names = sorted(os.listdir(one))
    assert sorted(os.listdir(batched)) == names
    for name in names:
        if name.endswith(".npy"):
            p1, pn = np.load(one / name), np.load(batched / name)
            np.testing.assert_allclose(pn, p1, atol=TOL, err_msg=name)
            top2 = np.sort(p1, axis=0)[-2:]
            decided = top2[1] - top2[0] > 2 * TOL  # elsewhere the label may honestly swap
            assert decided.mean() > 0.9
            mask1, maskn = read_mask_png(one / f"{name[:-4]}.png"), read_mask_png(batched / f"{name[:-4]}.png")
            np.testing.assert_array_equal(maskn[decided], mask1[decided], err_msg=name)
        elif name.endswith("_confidence.png"):
            c1, cn = (np.array(Image.open(d / name), np.int64) for d in (one, batched))
            assert np.abs(cn - c1).max() <= 65535 * TOL, name


# ------------------------------------------------------------------------------------------- the grouping


def test_groups_gather_one_key_across_the_order_within_count_and_pixels():
    items = [("a", 1), ("b", 1), ("a", 1), ("b", 5), ("a", 1), ("a", 1), ("a", 1), ("c", 9), ("b", 1)]
    groups = list(batch_groups(range(len(items)), key=lambda i: items[i][0], cost=lambda i: items[i][1], batch=3,
                               max_pixels=6))  # fmt: skip
    # Every item once; each group one key, in input order, at most 3 items and 6 pixels, or one item alone.
    assert sorted(i for g in groups for i in g) == list(range(len(items)))
    assert groups == [[0, 2, 4], [1, 3], [5, 6], [7], [8]]


def test_the_look_ahead_window_bounds_what_waits():
    def groups(keys: list[int], window: int | None) -> list[list[int]]:
        return list(batch_groups(range(len(keys)), key=keys.__getitem__, cost=lambda i: 1, batch=2, max_pixels=100,
                                 window=window))  # fmt: skip

    # Four sizes round robin: with 3 waiting at most, the oldest is given out alone each time a third comes in.
    assert groups([0, 1, 2, 3, 0, 1, 2, 3], 3) == [[0], [1], [2], [3], [4], [5], [6], [7]]
    # With room to wait, the same images pair up; and pairs within the window pair up under it too.
    assert groups([0, 1, 2, 3, 0, 1, 2, 3], None) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups([0, 1, 0, 1], 3) == [[0, 2], [1, 3]]


# ------------------------------------------------------------------------------------------- the command


def test_interleaved_sizes_run_together_and_write_the_files_of_batch_one(ckpt, tmp_path, capsys, passes):
    stems = _mixed_folder(tmp_path / "in")
    flags = ("--probs", "--confidence", "--overlay")
    assert _predict(ckpt, tmp_path / "in", tmp_path / "one", *flags) == 2
    one_err = capsys.readouterr().err
    assert sorted(p[0] for p in passes) == [1] * 7
    passes.clear()
    assert _predict(ckpt, tmp_path / "in", tmp_path / "four", "--batch", "4", *flags) == 2
    # A (3 good of 4: the truncated one fails alone), B (3) and C (1): one pass each, across the folder's order.
    assert sorted(p[0] for p in passes) == [1, 3, 3]
    # The same one-line report of the bad image, the same files, the same values.
    assert capsys.readouterr().err == one_err and one_err.count("\n") == 1 and "e_cut.png" in one_err
    assert sorted({n.split(".")[0].split("_")[0] for n in os.listdir(tmp_path / "four")}) == stems
    _assert_same_files(tmp_path / "one", tmp_path / "four")


def test_the_red_detector_gives_each_image_its_own_mask(tmp_path, passes):
    ckpt = red_checkpoint(tmp_path / "red.pt")
    (tmp_path / "in").mkdir()
    # Red 0, blue 2; sizes A, B alternating: A red, red, blue and B blue, blue, red, so that no reordering within a
    # pass leaves every image its own colour.
    colours = {"a": 0, "b": 2, "c": 0, "d": 2, "e": 2, "f": 0}
    for i, (stem, channel) in enumerate(colours.items()):
        _plain(tmp_path / "in" / f"{stem}.png", (A, B)[i % 2], channel)
    assert _predict(ckpt, tmp_path / "in", tmp_path / "out", "--batch", "8") == 0
    assert sorted(p[0] for p in passes) == [3, 3]
    for i, (stem, channel) in enumerate(colours.items()):
        mask = read_mask_png(tmp_path / "out" / f"{stem}.png")
        assert mask.shape == (A, B)[i % 2] and (mask == (1 if channel == 0 else 0)).all(), stem


def test_the_pixel_bound_splits_a_batch(ckpt, tmp_path, monkeypatch, passes):
    (tmp_path / "in").mkdir()
    for i in range(5):
        _noise(tmp_path / "in" / f"{i}.png", A, i)
    model = fcnseg.load(ckpt)
    rows, cols = forward_size(Predictor(model), *A)
    monkeypatch.setattr("fcnseg.predict.BATCH_PIXELS", 2 * rows * cols + 1)  # room for two, not three
    assert _predict(ckpt, tmp_path / "in", tmp_path / "out", "--batch", "8") == 0
    assert [p[0] for p in passes] == [2, 2, 1]
    assert len(os.listdir(tmp_path / "out")) == 5


def test_a_two_headed_model_batched(twohead, tmp_path, passes):
    (tmp_path / "in").mkdir()
    for i in range(4):
        _noise(tmp_path / "in" / f"{i}.png", (A, B)[i % 2], i)
    flags = ("--probs", "--confidence")
    assert _predict(twohead, tmp_path / "in", tmp_path / "one", *flags) == 0
    passes.clear()
    assert _predict(twohead, tmp_path / "in", tmp_path / "two", "--batch", "2", *flags) == 0
    assert [p[0] for p in passes] == [2, 2]
    assert "0_geometric.npy" in os.listdir(tmp_path / "two")
    _assert_same_files(tmp_path / "one", tmp_path / "two")


def test_a_fusion_net_batched_with_a_missing_depth_in_the_middle(tmp_path, capsys, passes):
    model = randomise(fcnseg.get_model("fcn32s", num_classes=3, in_channels=4, **TINY), seed=2).eval()
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "rgbd.pt")
    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    for i in range(4):
        _noise(tmp_path / "rgb" / f"{i}.png", A, i)
        if i != 1:
            depth = np.random.default_rng(i).integers(500, 5000, A, dtype=np.uint16)
            Image.fromarray(depth).save(tmp_path / "depth" / f"{i}.png")
    extra = ("--extra", str(tmp_path / "depth"), "--probs")
    assert _predict(ckpt, tmp_path / "rgb", tmp_path / "one", *extra) == 2
    one_err = capsys.readouterr().err
    passes.clear()
    assert _predict(ckpt, tmp_path / "rgb", tmp_path / "four", "--batch", "4", *extra) == 2
    assert [p[:2] for p in passes] == [(3, 4)]  # three images, four channels each, in one pass
    assert capsys.readouterr().err == one_err and "1.png" in one_err
    _assert_same_files(tmp_path / "one", tmp_path / "four")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_bad_batch_is_one_line(ckpt, tmp_path, capsys, value):
    _noise(tmp_path / "x.png", A, 0)
    assert main(["predict", str(ckpt), str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--batch", value]) == 2
    assert capsys.readouterr().err == f"fcnseg: error: --batch {value}: expected at least 1 image\n"
    assert not (tmp_path / "o").exists()


def test_one_image_the_model_refuses_does_not_fail_its_batch():
    """The model's own refusal (say, an input it cannot take) names that image alone; the others are still made."""
    from fcnseg.cli.predict import _Job, _outputs

    class Picky:  # refuses any pass that holds the image "bad"
        def outputs(self, images, **options):
            if "bad" in images:
                raise FcnsegError("bad: refused")
            return [f"masks of {i}" for i in images]

    read = [(_Job(i, Path(f"{x}.png"), x), x, None) for i, x in enumerate(["a", "bad", "c"])]
    problems: dict[int, str] = {}
    args = argparse.Namespace(probs=False, confidence=False)
    done = _outputs(Picky(), read, args, problems)
    assert [(job.stem, result) for job, _, result in done] == [("a", "masks of a"), ("c", "masks of c")]
    assert problems == {1: "bad: refused"}


def test_the_help_states_the_pixel_bound_in_force():
    from fcnseg.cli import build_parser
    from fcnseg.predict import BATCH_PIXELS

    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    [batch] = [a for a in predict._actions if "--batch" in a.option_strings]
    assert f"{BATCH_PIXELS:,} padded pixels" in batch.help and batch.default == 1


def _folder(path: Path, images: list[tuple[str, tuple[int, int]]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for seed, (name, size) in enumerate(images):
        _noise(path / f"{name}.png", size, seed)
    return path


def test_scales_below_one_on_images_one_pixel_high_or_wide(ckpt, tmp_path, capsys):
    """A view at scale 0.75 of an image 1 pixel high keeps 1 pixel (none would be no image): every file is
    written, and the 1 x 200 image's probabilities are those computed by hand over its four views."""
    import torch
    import torch.nn.functional as F

    images = _folder(tmp_path / "in", [("one", (1, 1)), ("strip", (1, 200)), ("tall", (90, 1)), ("a", A)])
    for batch in ("1", "8"):
        out = tmp_path / f"o{batch}"
        assert _predict(ckpt, images, out, "--flip", "--scales", "0.75", "1", "--batch", batch) == 0
        assert capsys.readouterr().err == ""
        assert sorted(os.listdir(out)) == ["a.png", "one.png", "strip.png", "tall.png"]
    model = fcnseg.load(ckpt).eval()
    rgb = np.asarray(Image.open(images / "strip.png"))
    x = model.preprocessing(rgb)[None]
    total = 0
    with torch.no_grad():
        for size in ((1, 150), (1, 200)):  # 0.75 of 1 x 200, at least 1 pixel high; and the image itself
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flip in (False, True):
                out = model(xs.flip(-1) if flip else xs)
                out = out.flip(-1) if flip else out
                total = total + F.interpolate(out, size=(1, 200), mode="bilinear", align_corners=False).softmax(1)
    proba = Predictor(model, flip=True, scales=(0.75, 1)).proba([rgb])
    np.testing.assert_allclose(proba[0]["out"], (total / 4)[0].numpy(), atol=1e-5)


def test_a_file_that_cannot_be_written_is_that_images_problem(ckpt, tmp_path, capsys):
    images = _folder(tmp_path / "in", [("a", A), ("b", A), ("c", A)])
    (tmp_path / "out" / "b.png").mkdir(parents=True)  # a folder where b's mask goes
    assert _predict(ckpt, images, tmp_path / "out", "--batch", "8") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"fcnseg: error: {images / 'b.png'}: cannot write its files (")
    assert "Is a directory" in err[0]
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "c.png").is_file()
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


@pytest.mark.parametrize(
    "error, line",
    [
        ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 972000000 bytes.",
         "out of memory segmenting it; segment large images in windows with --tile 512"),
        ("Input and output sizes should be greater than 0\nmore detail", "cannot segment it (Input and output sizes "
         "should be greater than 0)"),
    ],
)  # fmt: skip
def test_a_torch_error_on_some_images_is_their_problem_alone(ckpt, tmp_path, capsys, monkeypatch, error, line):
    """torch's own errors (memory it cannot allocate, a size an operation cannot take) fail the images they hit,
    one line each; the other images are written, and the exit code is 2."""
    from fcnseg.models.fcn import FCN

    original = FCN.forward

    def wide_fails(self, x):
        if x.shape[-1] > 60:
            raise RuntimeError(error)
        return original(self, x)

    monkeypatch.setattr(FCN, "forward", wide_fails)
    images = _folder(tmp_path / "in", [("a", A), ("wide1", (20, 90)), ("b", A), ("wide2", (20, 90))])
    for batch in ("1", "8"):
        assert _predict(ckpt, images, tmp_path / f"o{batch}", "--batch", batch) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == [f"fcnseg: error: {images / name}: {line}" for name in ("wide1.png", "wide2.png")]
        assert sorted(os.listdir(tmp_path / f"o{batch}")) == ["a.png", "b.png"]


def test_temporaries_a_killed_run_left_beside_the_files_written_are_removed(ckpt, tmp_path):
    images = _folder(tmp_path / "in", [("a", A)])
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".a.png.k1lled.tmp", out / ".a_overlay.jpg.x.tmp"]
    other = out / ".z.png.x.tmp"  # another image's: not this run's to judge
    for p in (*stale, other):
        p.write_bytes(b"half")
    assert _predict(ckpt, images, out, "--overlay") == 0
    assert not any(p.exists() for p in stale) and other.exists()
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["a.png", "a_overlay.jpg"]


# ------------------------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def half(tmp_path_factory) -> Path:
    """FCN-8s at half width: its memory peaks at full resolution, on the input, its padded copy and conv1_1's and
    conv1_2's outputs (32 channels each): 4 x (3 + 3 + 32 + 32) = 280 bytes a padded pixel (see
    tests/models/test_complexity.py)."""
    model = randomise(fcnseg.get_model("fcn8s", num_classes=5, width=0.5, fc_dim=16), seed=0).eval()
    return fcnseg.save_checkpoint(model, tmp_path_factory.mktemp("m") / "half.pt")


def _need(ckpt: Path, *sizes: tuple[int, int]) -> int:
    """Bytes of one pass over ``sizes`` by hand: 280 a padded pixel, and the float32 weights once more."""
    model = fcnseg.load(ckpt)
    return 280 * sum(np.prod(model.padded_size(*s)) for s in sizes) + 4 * sum(p.numel() for p in model.parameters())


def test_an_image_too_large_for_the_memory_free_is_refused_before_it_is_read(half, tmp_path, capsys, monkeypatch,
                                                                             passes):  # fmt: skip
    """One line naming the image, its estimated need and what is free; the image that fits is written. What is
    free counts the memory of the pass already run, which the process keeps for reuse."""
    big = (200, 300)
    free = _need(half, big) - _need(half, A) - (2 << 20)
    monkeypatch.setattr("fcnseg._memory.available_memory", lambda: free)
    images = _folder(tmp_path / "in", [("a", A), ("big", big)])
    assert _predict(half, images, tmp_path / "out") == 2
    mib = 1 << 20
    assert capsys.readouterr().err.splitlines() == [
        f"fcnseg: error: {images / 'big.png'}: an image of 300 x 200 needs about {_need(half, big) / mib:.0f} MiB "
        f"for its forward pass, more than the {(free + _need(half, A)) / mib:.0f} MiB of memory free; run it in "
        "tiles (--tile 512)"
    ]
    assert os.listdir(tmp_path / "out") == ["a.png"] and passes == [(1, 3, *A)]  # the big one was never run


def test_a_batch_too_large_for_the_memory_free_runs_image_by_image(half, tmp_path, monkeypatch, passes):
    monkeypatch.setattr("fcnseg._memory.available_memory", lambda: _need(half, A, A) - 1)  # one fits, two not
    images = _folder(tmp_path / "in", [("a", A), ("b", A), ("c", A)])
    assert _predict(half, images, tmp_path / "out", "--batch", "8") == 0
    assert passes == [(1, 3, *A)] * 3 and len(os.listdir(tmp_path / "out")) == 3


def test_tiles_bound_the_pass_so_nothing_is_refused(half, tmp_path, monkeypatch):
    monkeypatch.setattr("fcnseg._memory.available_memory", lambda: 0)
    images = _folder(tmp_path / "in", [("big", (200, 300))])
    assert _predict(half, images, tmp_path / "out", "--tile", "64", "--overlap", "32") == 0
    assert os.listdir(tmp_path / "out") == ["big.png"]
