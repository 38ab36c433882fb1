"""What one image costs the served model, from its header alone: the padded area the network computes on.

An FCN does not compute on the image as it is: in ``aligned`` mode it pads the bottom and right up to a multiple of
its stride (32 for VGG16), and in ``caffe`` mode its first convolution pads 100 pixels on every side. A 1 x 100000
strip is therefore 100000 pixels on disk but about 200 x 100200 in the first layer's activations, and the time and
memory of a request follow the latter. :func:`padded_size` asks the model itself (its own padding step and its first
convolution), so every backbone and alignment is measured the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.backbones import first_conv

__all__ = ["padded_size", "tile_cost"]


def _networks(model: nn.Module) -> list[nn.Module]:
    # A late-fusion net runs one FCN per input stream, each on the whole (padded) image.
    streams = getattr(model, "streams", None)
    return list(streams.values()) if isinstance(streams, nn.ModuleDict) else [model]


def _model_padding(net: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The input size after the network's own padding step (aligned mode: up to its stride and margin), run on a
    tensor without storage: the geometry, not a copy of it."""
    shape = net._pad(torch.empty(1, net.in_channels, height, width, device="meta")).shape
    return int(shape[-2]), int(shape[-1])


def _first_layer_excess(net: nn.Module) -> tuple[int, int]:
    """Rows and columns the first convolution adds beyond "same" padding (caffe mode's 100 px a side)."""
    conv = first_conv(getattr(net, "backbone", net))
    if isinstance(conv.padding, str):  # "same" or "valid": nothing added
        return 0, 0
    extra = [max(0, 2 * p - d * (k - 1)) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size, strict=True)]
    return extra[0], extra[1]


def padded_size(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of the largest array, in input pixels, that ``model`` computes on for an image of ``height``
    x ``width``: the image after the network's padding step and its first convolution's extra padding."""
    best = (0, 0)
    for net in _networks(model):
        h, w = _model_padding(net, height, width)
        dh, dw = _first_layer_excess(net)
        if (h + dh) * (w + dw) > best[0] * best[1]:
            best = (h + dh, w + dw)
    return best


def tile_cost(model: nn.Module, tile: int) -> tuple[int, int]:
    """The padded size of the largest window ``--tile`` runs: a tile, plus up to one stride less one pixel at the
    image's last row and column of windows (:func:`fcnseg.tiling.tile_windows`)."""
    side = tile + int(getattr(model, "stride", 1)) - 1
    return padded_size(model, side, side)
