"""What one image costs the served model, from its header alone: the padded area the network computes on.

An FCN does not compute on the image as it is: in ``aligned`` mode it pads the bottom and right up to a multiple of
its stride (32 for VGG16), and in ``caffe`` mode its first convolution pads 100 pixels on every side. A 1 x 100000
strip is therefore 100000 pixels on disk but about 200 x 100200 in the first layer's activations, and the time and
memory of a request follow the latter. :func:`padded_size` asks the model itself (its own padding step and its first
convolution), so every backbone and alignment is measured the same way.
"""

from __future__ import annotations

from ..models.base import SegmentationModel

__all__ = ["padded_size", "tile_cost"]


def padded_size(model: SegmentationModel, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the largest array, in input pixels, that ``model`` computes on for an image of ``height``
    x ``width``: the image after the network's padding step and its first convolution's extra padding (the model's
    own :meth:`~fcnseg.models.base.SegmentationModel.padded_size`)."""
    return model.padded_size(height, width)


def tile_cost(model: SegmentationModel, tile: int) -> tuple[int, int]:
    """The padded size of the largest window ``--tile`` runs: a tile, plus up to one stride less one pixel at the
    image's last row and column of windows (:func:`fcnseg.tiling.tile_windows`)."""
    side = tile + model.stride - 1
    return model.padded_size(side, side)
