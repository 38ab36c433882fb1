from fractions import Fraction

import pytest
from torch import nn

from fcnseg.models import get_model
from fcnseg.models.geometry import CoordMap, compose, crop_offset, layer_map
from tests.helpers import TINY, tiny_options


def test_layer_maps_follow_caffe_conventions():
    # conv k3 pad 1 keeps the centre; pad 100 shifts it by -99; a 2x2/2 pool averages two centres (+0.5).
    assert layer_map(nn.Conv2d(1, 1, 3, padding=1)) == CoordMap(Fraction(1), Fraction(0))
    assert layer_map(nn.Conv2d(1, 1, 3, padding=100)) == CoordMap(Fraction(1), Fraction(-99))
    assert layer_map(nn.MaxPool2d(2, 2, ceil_mode=True)) == CoordMap(Fraction(2), Fraction(1, 2))
    assert layer_map(nn.ConvTranspose2d(1, 1, 64, 32)) == CoordMap(Fraction(1, 32), Fraction(-63, 64))
    # A transposed convolution undoes the convolution of the same shape.
    conv, deconv = nn.Conv2d(1, 1, 4, 2, padding=1), nn.ConvTranspose2d(1, 1, 4, 2, padding=1)
    assert compose([conv, deconv]) == CoordMap()


def test_crop_offset_refuses_fractional_and_negative_offsets():
    assert crop_offset(CoordMap(Fraction(16), Fraction(-80)), CoordMap(Fraction(16), Fraction(0))) == 5
    with pytest.raises(ValueError, match="whole number"):
        crop_offset(CoordMap(Fraction(16), Fraction(0)), CoordMap(Fraction(16), Fraction(8)))
    with pytest.raises(ValueError, match="whole number"):
        crop_offset(CoordMap(Fraction(16), Fraction(16)), CoordMap(Fraction(16), Fraction(0)))
    with pytest.raises(ValueError, match="scales"):
        crop_offset(CoordMap(Fraction(8)), CoordMap(Fraction(16)))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fcn32s", {"out": 19}),
        ("fcn16s", {"pool4": 5, "out": 27}),
        ("fcn8s", {"pool4": 5, "pool3": 9, "out": 31}),
        ("fcn8s_atonce", {"pool4": 5, "pool3": 9, "out": 31}),
    ],
)
def test_caffe_mode_derives_the_released_crops(name, expected):
    # The release's 5 / 9 and 19 / 27 / 31 follow from pad 100, the pools and the 7x7 fc6; nothing is typed in.
    assert get_model(name, alignment="caffe", **tiny_options(name)).head.crop_offsets == expected
    # Aligned mode pads the transposed convolutions instead, so no crop is left to do.
    assert set(get_model(name, alignment="aligned", **tiny_options(name)).head.crop_offsets.values()) == {0}


def test_backbone_maps_in_both_modes():
    caffe = get_model("fcn8s", alignment="caffe", **TINY).backbone.coord_maps()
    aligned = get_model("fcn8s", alignment="aligned", **TINY).backbone.coord_maps()
    # fc7 cell y is centred on input pixel 32 y + 12.5 with pad 100 (grid shifted by the padding) ...
    assert caffe["fc7"] == CoordMap(Fraction(32), Fraction(25, 2))
    # ... and on 32 y + 15.5, the centre of its 32 x 32 block, in aligned mode.
    assert aligned["fc7"] == CoordMap(Fraction(32), Fraction(31, 2))
    assert aligned["pool3"] == CoordMap(Fraction(8), Fraction(7, 2))
