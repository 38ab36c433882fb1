"""Palettes: VOC colours per the devkit's bit rule, generated colours, the 768-entry PIL palette."""

from __future__ import annotations

import numpy as np
import pytest

from fcnseg.palette import (
    VOC_CLASSES,
    full_palette,
    generated_palette,
    palette_for,
    voc_palette,
)

# Written out, not recomputed: index, name and RGB of the VOC devkit's colour map (VOClabelcolormap.m).
VOC_TABLE = [
    (0, "background", (0, 0, 0)),
    (1, "aeroplane", (128, 0, 0)),
    (2, "bicycle", (0, 128, 0)),
    (3, "bird", (128, 128, 0)),
    (4, "boat", (0, 0, 128)),
    (5, "bottle", (128, 0, 128)),
    (6, "bus", (0, 128, 128)),
    (7, "car", (128, 128, 128)),
    (8, "cat", (64, 0, 0)),
    (9, "chair", (192, 0, 0)),
    (10, "cow", (64, 128, 0)),
    (11, "diningtable", (192, 128, 0)),
    (12, "dog", (64, 0, 128)),
    (13, "horse", (192, 0, 128)),
    (14, "motorbike", (64, 128, 128)),
    (15, "person", (192, 128, 128)),
    (16, "pottedplant", (0, 64, 0)),
    (17, "sheep", (128, 64, 0)),
    (18, "sofa", (0, 192, 0)),
    (19, "train", (128, 192, 0)),
    (20, "tvmonitor", (0, 64, 128)),
]
VOID = (224, 224, 192)


def test_voc_classes_names_and_order():
    assert len(VOC_CLASSES) == 21
    assert list(VOC_CLASSES) == [name for _, name, _ in VOC_TABLE]


def test_voc_palette_matches_published_colors():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    for idx, _, rgb in VOC_TABLE:
        assert tuple(pal[idx]) == rgb, idx


def test_bit_rule_gives_void_color_for_255():
    # 255 = 0b11_111_111: bits 0-2 and 3-5 set 128 and 64 in every channel, bits 6-7 add 32 to red
    # and green.
    assert tuple(voc_palette(256)[255]) == VOID


def test_voc_palette_prefix_and_sizes():
    assert voc_palette(0).shape == (0, 3)
    np.testing.assert_array_equal(voc_palette(21), voc_palette(256)[:21])
    assert len({tuple(r) for r in voc_palette(256)}) == 256
    with pytest.raises(ValueError):
        voc_palette(-1)


def test_generated_palette_rows_distinct_and_separated():
    pal = generated_palette(256)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert len({tuple(r) for r in pal}) == 256
    # Every smaller palette is a prefix, so distinctness at 256 covers every n <= 256.
    np.testing.assert_array_equal(generated_palette(40), pal[:40])
    p = pal.astype(float)
    consecutive = np.linalg.norm(p[1:] - p[:-1], axis=1)
    assert consecutive.min() > 100
    d = np.linalg.norm(p[:21, None] - p[None, :21], axis=2) + np.eye(21) * 1e9
    assert d.min() > 40
    rows = {tuple(r) for r in pal}
    assert (0, 0, 0) not in rows and VOID not in rows


def test_palette_for_chooses_voc_or_generated():
    np.testing.assert_array_equal(palette_for(VOC_CLASSES, 21), voc_palette(21))
    np.testing.assert_array_equal(palette_for(list(VOC_CLASSES), 21), voc_palette(21))
    np.testing.assert_array_equal(palette_for(None, 21), voc_palette(21))
    np.testing.assert_array_equal(palette_for(None, 33), generated_palette(33))
    np.testing.assert_array_equal(palette_for([], 21), voc_palette(21))
    np.testing.assert_array_equal(palette_for(np.array(VOC_CLASSES), 21), voc_palette(21))
    renamed = ("bg",) + VOC_CLASSES[1:]
    expected = generated_palette(21)
    expected[0] = 0  # a class 0 named background is black; the other classes keep their generated colours
    np.testing.assert_array_equal(palette_for(renamed, 21), expected)
    np.testing.assert_array_equal(palette_for(("sky", "road"), 2), generated_palette(2))  # class 0 an object


@pytest.mark.parametrize("name", ["background", "Background", "void", "unlabeled", "_background_"])
def test_a_background_class_0_is_black_and_no_other_class_is(name):
    colors = palette_for((name, "cat", "dog", "car"), 4)
    assert colors[0].tolist() == [0, 0, 0]
    assert all(c.tolist() != [0, 0, 0] for c in colors[1:])
    # The first generated colour was a bright yellow (255, 231, 13): an overlay where nothing is found must not
    # be washed in it.
    assert generated_palette(1)[0].tolist() != [0, 0, 0]
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        palette_for(["a", "b", "c"], 4)


def test_full_palette_layout():
    colors = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    flat = full_palette(colors)
    assert len(flat) == 768 and all(isinstance(v, int) for v in flat)
    assert flat[:6] == [1, 2, 3, 4, 5, 6]
    assert flat[255 * 3 : 256 * 3] == list(VOID)
    assert set(flat[6 : 255 * 3]) == {0}


def test_full_palette_voc_and_bad_shapes():
    flat = np.array(full_palette(voc_palette(21))).reshape(256, 3)
    np.testing.assert_array_equal(flat[:21], voc_palette(21))
    assert tuple(flat[255]) == VOID
    with pytest.raises(ValueError):
        full_palette(np.zeros((257, 3)))
    with pytest.raises(ValueError):
        full_palette(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        full_palette(np.array([[0, 0, 256]]))


def test_a_class_the_user_marks_black_is_kept_black_and_left_untinted(tmp_path):
    # classes.txt gives "sky" the colour 0,0,0: a trained model keeps the data's colours (checkpoint palette), its
    # masks draw sky black and its overlays leave sky pixels as they are.
    import fcnseg
    from fcnseg.engine.config import TrainConfig
    from fcnseg.engine.fitting import build_model
    from fcnseg.engine.run import build_data
    from fcnseg.imageio import overlay
    from tests.engine.test_train import _blocks_tree
    from tests.helpers import TINY

    root = tmp_path / "data"
    _blocks_tree(root, n=2, size=32)
    (root / "classes.txt").write_text("sky\t0,0,0\nred\t200,20,20\ngreen\nblue\n")
    cfg = TrainConfig(dataset="folder", root=str(root), model="fcn32s", **TINY).resolved()
    train_ds, _ = build_data(cfg)
    model = build_model(cfg, train_ds)
    assert model.palette[0] == [0, 0, 0] and model.palette[1] == [200, 20, 20]
    ckpt = fcnseg.save_checkpoint(model, tmp_path / "m.pt")
    colors = np.asarray(fcnseg.load(ckpt).palette, np.uint8)
    np.testing.assert_array_equal(colors, np.asarray(train_ds.palette, np.uint8))
    image = np.full((2, 2, 3), 90, np.uint8)
    mask = np.array([[0, 1], [0, 1]])
    assert overlay(image, mask, colors)[:, 0].tolist() == [[90, 90, 90]] * 2  # sky: untinted
    assert overlay(image, mask, colors)[0, 1].tolist() == [145, 55, 55]  # red: blended half and half
