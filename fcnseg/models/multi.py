"""The paper's nets with more than one input or output: late fusion (NYUDv2 RGB-HHA) and two heads (SIFT Flow).

- :class:`LateFusionFCN` runs one FCN per input (colour, HHA) and sums their score maps, as the paper's RGB-HHA
  nets do "at the final layer"; the sum is trained end to end.
- ``fcn16s_twohead`` is an :class:`~fcnseg.models.fcn.FCN` with two heads on one trunk (semantic and geometric
  labels), trained with the sum of both losses. Every FCN concatenates its heads' scores along the channels, so
  export, the execution paths and tiling handle it like any FCN; :func:`split_heads` takes them apart again.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import FcnsegError
from ..preprocessing import Preprocessing
from .base import SegmentationModel
from .fcn import FCN, ScoreHead, check_input, split_heads

__all__ = ["LateFusionFCN", "TwoHeadFCN", "split_heads"]


class LateFusionFCN(SegmentationModel):
    """One FCN per input stream (e.g. ``{"rgb": ..., "hha": ...}``); the input's channels are dealt out to the
    streams in order and their score maps summed.

    All streams must have the same classes, alignment and output stride. ``preprocessing`` covers every channel
    (the streams' in order); ``head`` (skips, crops, kernels) and ``stride`` are the first stream's.
    """

    def __init__(self, streams: Mapping[str, FCN]) -> None:
        super().__init__()
        if len(streams) < 2:
            raise FcnsegError(f"late fusion needs two or more streams, got {len(streams)}")
        self.streams = nn.ModuleDict(streams)
        first = next(iter(streams.values()))
        for name, s in streams.items():
            if (s.heads, s.alignment, s.stride) != (first.heads, first.alignment, first.stride):
                raise FcnsegError(f"stream {name!r} differs from the first in classes, alignment or stride")
        pps = [s.preprocessing for s in streams.values()]
        if len({(p.channel_order, p.value_range) for p in pps}) != 1:
            raise FcnsegError("late fusion streams must share the channel order and value range of their input")
        self.preprocessing = Preprocessing(
            sum((p.mean for p in pps), ()), sum((p.std for p in pps), ()), pps[0].channel_order, pps[0].value_range
        )

    @property
    def first(self) -> FCN:
        """The first stream, whose classes, alignment and stride every stream shares."""
        return next(iter(self.streams.values()))

    @property
    def alignment(self) -> str:
        return self.first.alignment

    @property
    def stride(self) -> int:
        return self.first.stride

    def float_layers(self) -> list[str]:
        return [f"streams.{name}.{prefix}" for name, s in self.streams.items() for prefix in s.float_layers()]

    def rescaled_pairs(self) -> list[tuple[str, str]]:
        return [(f"streams.{name}.{a}", f"streams.{name}.{b}") for name, s in self.streams.items()
                for a, b in s.rescaled_pairs()]  # fmt: skip

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        # Every stream runs on the whole image: the largest of theirs.
        sizes = [s.padded_size(height, width) for s in self.streams.values()]
        return max(sizes, key=lambda rc: rc[0] * rc[1])

    @property
    def in_channels(self) -> int:
        return sum(s.in_channels for s in self.streams.values())

    @property
    def heads(self) -> dict[str, int]:
        return self.first.heads

    @property
    def head(self) -> ScoreHead:
        """The first stream's first head: its skips, crops and kernels are every stream's."""
        return self.first.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        out: torch.Tensor | None = None
        start = 0
        for stream in self.streams.values():
            n = stream.in_channels
            score = stream(x[:, start : start + n])  # every stream scores at the input's own H x W
            out = score if out is None else out + score
            start += n
        assert out is not None
        return out

    @property
    def head_classes(self) -> dict[str, list[str] | None]:
        return self.first.head_classes

    @head_classes.setter
    def head_classes(self, value: dict[str, list[str] | None]) -> None:
        for stream in self.streams.values():
            stream.head_classes = value


TwoHeadFCN = FCN
"""Kept as a name: every :class:`~fcnseg.models.fcn.FCN` takes any number of heads (``fcn16s_twohead`` builds one
with two)."""
