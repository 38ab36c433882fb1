"""Coordinate maps: where a feature-map pixel sits in the input image.

Caffe's `crop` layer derives the offsets of FCN (5, 9, 19, 27, 31 for VGG16) from the geometry of the layers; we do
the same. Every layer maps an output coordinate ``y`` to the input coordinate of the centre of its receptive field,
``x = a * y + b``. Chaining layers composes these affine maps. Fractions keep the arithmetic exact, so an offset
that is not a whole number is caught instead of being rounded away.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

from torch import nn

_PASS_THROUGH = (
    nn.ReLU,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm2d,
    nn.Identity,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
)


@dataclass(frozen=True)
class CoordMap:
    """``input = scale * y + offset`` for a pixel ``y`` of a feature map."""

    scale: Fraction = Fraction(1)
    offset: Fraction = Fraction(0)

    def then(self, layer: CoordMap) -> CoordMap:
        """The map after one more layer whose own map is ``layer``."""
        return CoordMap(self.scale * layer.scale, self.scale * layer.offset + self.offset)

    @property
    def stride(self) -> int:
        if self.scale.denominator != 1:
            raise ValueError(f"coordinate map {self} has a fractional stride")
        return int(self.scale)


def _pair(v: int | tuple[int, ...]) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"anisotropic layer parameters {v} are not supported")
        return int(v[0])
    return int(v)


def layer_map(layer: nn.Module) -> CoordMap:
    """The coordinate map of a single layer (output pixel -> centre of its input window)."""
    if isinstance(layer, nn.ConvTranspose2d):
        # An input pixel i spreads over outputs s*i - p + [0, k-1], centred at s*i - p + (k-1)/2.
        k, s, p = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)
        d = _pair(layer.dilation)
        return CoordMap(Fraction(1, s), (Fraction(p) - Fraction(d * (k - 1), 2)) / s)
    if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding)
        d = _pair(getattr(layer, "dilation", 1))
        # Ceil-mode pooling only adds windows at the far end; the map of the ones that exist is unchanged.
        return CoordMap(Fraction(s), Fraction(d * (k - 1), 2) - p)
    if isinstance(layer, nn.Sequential):
        return compose(layer)
    if isinstance(layer, _PASS_THROUGH):
        return CoordMap()
    raise TypeError(f"no coordinate map for layer type {type(layer).__name__}")


def compose(layers: Iterable[nn.Module], start: CoordMap | None = None) -> CoordMap:
    """The map of several layers applied one after the other."""
    cmap = start or CoordMap()
    for layer in layers:
        cmap = cmap.then(layer_map(layer))
    return cmap


def crop_offset(big: CoordMap, small: CoordMap) -> int:
    """Offset at which ``big`` must be cropped so that its pixel ``offset + y`` sits where ``small``'s pixel ``y`` does.

    Both maps must have the same scale (the two feature maps share a grid); the offset must be a whole,
    non-negative number of pixels, or the fusion cannot be aligned by cropping.
    """
    if big.scale != small.scale:
        raise ValueError(f"cannot align maps of different scales {big.scale} and {small.scale}")
    off = (small.offset - big.offset) / big.scale
    if off.denominator != 1 or off < 0:
        raise ValueError(f"feature maps cannot be aligned by cropping: offset {off} is not a whole number >= 0")
    return int(off)
