"""Tiled inference: window layout, blend weights, blended logits equal to the whole-image logits where they can be."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fcnseg
from fcnseg.errors import FcnsegError
from fcnseg.tiling import blend_weights, tile_windows, tiled_logits, tiled_mask
from tests.helpers import TINY

# VGG16's receptive field is 404 px (radius 202); one more 32-px cell for the last bilinear upsampling, and a few
# pixels to spare: beyond this distance from a window's inner edges its logits are the whole image's.
MARGIN = 240


def _axes(windows):
    """The distinct (start, length) rows and columns of a row-major window list."""
    rows = sorted({(y0, h) for y0, _, h, _ in windows})
    cols = sorted({(x0, w) for _, x0, _, w in windows})
    return rows, cols


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many small convolutions, one window after another: with the two cores shared by other work, a two-thread pool
    # stalls (runs here took 4 to 40 s for the same test); one thread is about as fast and steady. Restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    model = fcnseg.get_model("fcn8s", num_classes=5, **TINY)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # the fixed bilinear upsampling kernels stay as they are
                p.normal_(0, 0.5)
    return model.eval()


def _run(model):
    def run(x):
        with torch.inference_mode():
            return model(x)

    return run


# ---- tile_windows ----------------------------------------------------------------------------------------------


def test_windows_by_hand():
    # step (64 - 32) = 32; the last origin is (100 - 64) rounded down to 32 = 32, so that window is 68 long.
    assert tile_windows(100, 100, 64, 32) == [(0, 0, 64, 64), (0, 32, 64, 68), (32, 0, 68, 64), (32, 32, 68, 68)]
    # Rows: step 96, last origin (300 - 128) // 32 * 32 = 160 -> [0, 96, 160]; columns: last 64 -> [0, 64].
    rows, cols = [(0, 128), (96, 128), (160, 140)], [(0, 128), (64, 136)]
    assert tile_windows(300, 200, 128, 32) == [(y, x, h, w) for y, h in rows for x, w in cols]
    # No overlap: windows abut; the last one absorbs the remainder that is not a whole step of align.
    assert tile_windows(64, 128, 64, 0) == [(0, 0, 64, 64), (0, 64, 64, 64)]
    assert tile_windows(64, 130, 64, 0) == [(0, 0, 64, 64), (0, 64, 64, 66)]
    # A finer align allows a finer step: 64 - 40 = 24 is a multiple of 8.
    assert [x for _, x, _, _ in tile_windows(8, 100, 64, 40, align=8)] == [0, 24, 32]


def test_image_not_larger_than_tile_is_one_window():
    assert tile_windows(50, 20, 64, 32) == [(0, 0, 50, 20)]
    assert tile_windows(64, 64, 64, 32) == [(0, 0, 64, 64)]
    # Less than one align step longer than the tile: still one window, ending at the edge.
    assert tile_windows(70, 64, 64, 0) == [(0, 0, 70, 64)]
    assert tile_windows(1, 1, 32, 0) == [(0, 0, 1, 1)]


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 300),
    width=st.integers(1, 300),
    align=st.sampled_from([1, 8, 32]),
    k=st.integers(1, 6),
    data=st.data(),
)
def test_windows_cover_the_image(height, width, align, k, data):
    tile = align * k
    overlap = data.draw(st.integers(0, tile - align))
    windows = tile_windows(height, width, tile, overlap, align)
    count = np.zeros((height, width), int)
    for y0, x0, h, w in windows:
        assert y0 % align == 0 and x0 % align == 0
        assert min(y0, x0) >= 0 and y0 + h <= height and x0 + w <= width
        count[y0 : y0 + h, x0 : x0 + w] += 1
    assert (count > 0).all()
    rows, cols = _axes(windows)
    assert len(windows) == len(rows) * len(cols)
    for axis, n in ((rows, height), (cols, width)):
        assert axis[-1][0] + axis[-1][1] == n  # the last window ends at the edge
        for (s, length), (t, _) in zip(axis, axis[1:], strict=False):
            assert length == tile and s < t and s + length - t >= overlap
        # Every window is a tile long, except the last, which may exceed it by less than one align step.
        assert min(tile, n) <= axis[-1][1] < max(tile + align, n + 1)


@pytest.mark.parametrize(
    ("tile", "overlap", "flag"),
    [(100, 0, "--tile"), (0, 0, "--tile"), (-32, 0, "--tile"), (64, 64, "--overlap"), (64, -1, "--overlap")],
)
def test_bad_tiling_is_a_user_error(tile, overlap, flag):
    with pytest.raises(FcnsegError, match=flag):
        tile_windows(100, 100, tile, overlap)
    with pytest.raises(FcnsegError, match=flag):
        tiled_mask(torch.nn.Conv2d(3, 2, 1), torch.zeros(3, 10, 10), 2, tile=tile, overlap=overlap)


def test_overlap_must_leave_one_aligned_step():
    # Origins on multiples of 32 cannot step by 24; 64 - 32 = 32 is the largest overlap a 64 tile allows.
    with pytest.raises(FcnsegError, match=r"--overlap must be between 0 and 32"):
        tile_windows(100, 100, 64, 40)
    assert tile_windows(100, 100, 64, 32)


# ---- blend_weights ---------------------------------------------------------------------------------------------


def test_blend_weights_by_hand():
    # Top (32) and bottom (96) edges are inside a 128-high image; left and right are its border.
    weights = blend_weights((32, 0, 64, 64), 128, 64, 4)
    assert weights.shape == (64, 64) and weights.dtype == torch.float32
    profile = torch.ones(64)
    profile[:4] = torch.tensor([0.125, 0.375, 0.625, 0.875])
    profile[-4:] = torch.tensor([0.875, 0.625, 0.375, 0.125])
    assert torch.equal(weights, profile[:, None].expand(64, 64))
    # Top-left corner window: ramps on its right and bottom only; separable, so the corner is 0.25 * 0.25.
    corner = blend_weights((0, 0, 8, 8), 16, 16, 2)
    ramp = torch.tensor([1, 1, 1, 1, 1, 1, 0.75, 0.25])
    assert torch.equal(corner, ramp[:, None] * ramp[None, :])
    assert corner[7, 7] == 0.0625
    # A window shorter than two ramps: each pixel takes the lower of both ramps, still > 0.
    short = torch.tensor([0.125, 0.375, 0.375, 0.125])
    assert torch.equal(blend_weights((8, 8, 4, 4), 32, 32, 4), short[:, None] * short[None, :])


def test_blend_weights_border_and_no_overlap():
    assert torch.equal(blend_weights((0, 0, 50, 70), 50, 70, 16), torch.ones(50, 70))  # the whole image
    assert torch.equal(blend_weights((32, 32, 64, 64), 200, 200, 0), torch.ones(64, 64))
    assert (blend_weights((32, 32, 64, 64), 200, 200, 32) > 0).all()


# ---- tiled_logits / tiled_mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("tile", "overlap", "align"), [(64, 32, 32), (64, 0, 32), (48, 40, 8)])
def test_per_pixel_run_is_reproduced_exactly(tile, overlap, align):
    # A 1x1 convolution has no context, so every window is right everywhere: normalised weights must give it back.
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.randn(3, 150, 231)
    with torch.inference_mode():
        expected = conv(x[None])[0]
        got = tiled_logits(conv, x, 5, tile=tile, overlap=overlap, align=align)
    assert got.shape == (5, 150, 231) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_tile_covering_the_image_gives_the_untiled_logits(fcn):
    x = torch.randn(3, 200, 330)  # 330 < 320 + 32: one window of the whole image
    with torch.inference_mode():
        expected = fcn(x[None])[0]
    assert torch.equal(tiled_logits(_run(fcn), x, 5, tile=320, overlap=64), expected)
    assert torch.equal(tiled_logits(_run(fcn), x, 5, tile=512, overlap=64), expected)


def _exact_1d(n, axis, margin):
    """Pixels at least `margin` from every inner edge of every window covering them."""
    ok = np.ones(n, bool)
    for s, length in axis:
        idx = np.arange(s, s + length)
        good = np.ones(length, bool)
        if s > 0:
            good &= idx - s >= margin
        if s + length < n:
            good &= s + length - 1 - idx >= margin
        ok[s : s + length] &= good
    return ok


@pytest.mark.parametrize("alignment", ["aligned", "caffe"])
def test_fcn_tiles_agree_with_the_whole_image_away_from_inner_edges(fcn, alignment):
    model = fcn
    if alignment == "caffe":
        torch.manual_seed(0)
        model = fcnseg.get_model("fcn8s", num_classes=5, alignment="caffe", **TINY)
        model.load_state_dict(fcn.state_dict())
        model.eval()
    # Windows [0, 576) and [64, 640) each way, overlapping by 512: pixels 304..335 lie 240 px inside both, so
    # the centre 32 x 32 block is a blend of four windows with weights ~0.5 each, not one window's logits.
    size, tile, overlap = 640, 576, 512
    torch.manual_seed(2)
    x = torch.randn(3, size, size)
    with torch.inference_mode():
        expected = model(x[None])[0]
    got = tiled_logits(_run(model), x, 5, tile=tile, overlap=overlap)
    assert got.shape == expected.shape == (5, size, size)

    windows = tile_windows(size, size, tile, overlap)
    rows, cols = _axes(windows)
    assert rows == cols == [(0, 576), (64, 576)]
    mask = torch.from_numpy(_exact_1d(size, rows, MARGIN)[:, None] & _exact_1d(size, cols, MARGIN)[None, :])
    assert mask[304:336, 304:336].all() and not mask[303, 320] and not mask[336, 320]
    assert int(mask.sum()) == (64 + 32 + 64) ** 2

    scale = float(expected.max() - expected.min())
    diff = (got - expected).abs().amax(0)
    assert float(diff[mask].max()) <= 1e-4 * scale
    # ... and the blend is doing something: near inner edges, windows disagree with the whole image.
    assert float(diff[~mask].max()) > 1e-3 * scale


def test_mask_equals_argmax_of_blended_logits(fcn):
    torch.manual_seed(3)
    x = torch.randn(3, 333, 517)
    logits = tiled_logits(_run(fcn), x, 5, tile=256, overlap=64)
    mask = tiled_mask(_run(fcn), x, 5, tile=256, overlap=64)
    assert mask.shape == (333, 517) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, logits.argmax(0).numpy())
    assert len(np.unique(mask)) > 1


@pytest.mark.parametrize("overlap", [0, 8, 24])
def test_mask_with_many_classes_and_progress(capsys, overlap):
    # Several bands of windows (origins every 8 to 32 rows), rows carried from band to band, or none when they abut.
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(3, 300, 1)
    x = torch.randn(3, 70, 90)
    mask = tiled_mask(conv, x, 300, tile=32, overlap=overlap, align=8, progress=True)
    assert mask.dtype == np.int64
    expected = tiled_logits(conv, x, 300, tile=32, overlap=overlap, align=8).argmax(0).numpy()
    np.testing.assert_array_equal(mask, expected)
    assert "tile" in capsys.readouterr().err


def test_large_image_mask(fcn):
    height, width = 3000, 4000
    torch.manual_seed(5)
    x = torch.randn(3, height, width)  # 144 MB; the logits are never held at this size
    calls = []

    def run(window):
        calls.append(tuple(window.shape[-2:]))
        with torch.inference_mode():
            return fcn(window)

    mask = tiled_mask(run, x, 5, tile=512, overlap=64)
    assert mask.shape == (height, width) and mask.dtype == np.uint8
    assert mask.max() < 5
    # Every window once, none of them larger than a tile plus less than one 32-px step.
    windows = tile_windows(height, width, 512, 64)
    assert calls == [(h, w) for _, _, h, w in windows]
    assert max(max(c) for c in calls) < 512 + 32
