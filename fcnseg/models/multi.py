"""The paper's nets with more than one input or output: late fusion (NYUDv2 RGB-HHA) and two heads (SIFT Flow).

- :class:`LateFusionFCN` runs one FCN per input (colour, HHA) and sums their score maps, as the paper's RGB-HHA
  nets do "at the final layer"; the sum is trained end to end.
- ``fcn16s_twohead`` is an :class:`~fcnseg.models.fcn.FCN` with two heads on one trunk (semantic and geometric
  labels), trained with the sum of both losses. Every FCN concatenates its heads' scores along the channels, so
  export, the execution paths and tiling handle it like any FCN; :func:`split_heads` takes them apart again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import FcnsegError
from ..preprocessing import Preprocessing
from .fcn import FCN, _build, _check_common, _check_fully_connected, check_input, split_heads
from .registry import register_model

__all__ = ["LateFusionFCN", "TwoHeadFCN", "split_heads"]


class LateFusionFCN(nn.Module):
    """One FCN per input stream (e.g. ``{"rgb": ..., "hha": ...}``); the input's channels are dealt out to the
    streams in order and their score maps summed.

    All streams must have the same classes, alignment and output stride. ``preprocessing`` covers every channel
    (the streams' in order); ``skips``, ``crop_offsets`` and ``stride`` are the first stream's.
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
        self.num_classes = first.num_classes
        self.alignment = first.alignment
        self.stride = first.stride
        pps = [s.preprocessing for s in streams.values()]
        if len({(p.channel_order, p.value_range) for p in pps}) != 1:
            raise FcnsegError("late fusion streams must share the channel order and value range of their input")
        self.preprocessing = Preprocessing(
            sum((p.mean for p in pps), ()), sum((p.std for p in pps), ()), pps[0].channel_order, pps[0].value_range
        )
        self.classes: list[str] | None = None
        self.palette: list[list[int]] | None = None

    @property
    def in_channels(self) -> int:
        return sum(s.in_channels for s in self.streams.values())

    @property
    def heads(self) -> dict[str, int]:
        return next(iter(self.streams.values())).heads

    @property
    def skips(self) -> tuple[str, ...]:
        return next(iter(self.streams.values())).skips

    @property
    def crop_offsets(self) -> dict[str, int]:
        return next(iter(self.streams.values())).crop_offsets

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
        return next(iter(self.streams.values())).head_classes

    @head_classes.setter
    def head_classes(self, value: dict[str, list[str] | None]) -> None:
        for stream in self.streams.values():
            stream.head_classes = value

    predict_proba = FCN.predict_proba
    predict = FCN.predict


TwoHeadFCN = FCN
"""Kept as a name: every :class:`~fcnseg.models.fcn.FCN` takes any number of heads (``fcn16s_twohead`` builds one
with two)."""


# ------------------------------------------------------------------------------------------------ builders


@register_model()
def fcn16s_twohead(
    *,
    num_classes: int = 33,
    second_classes: int = 3,
    head_names: Sequence[str] = ("semantic", "geometric"),
    heads: Mapping[str, int] | None = None,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 3,
) -> TwoHeadFCN:
    """The paper's SIFT Flow net: FCN-16s on VGG16 with two heads on one trunk, ``head_names[0]`` with
    ``num_classes`` (33 semantic classes) and ``head_names[1]`` with ``second_classes`` (3 geometric classes:
    sky, horizontal, vertical). ``heads`` ({name: classes}, two of them) names and sizes both at once, as
    ``fcnseg train`` passes them from the data. Other options as :func:`~fcnseg.models.fcn16s`."""
    if heads is None:
        if len(head_names) != 2 or len(set(head_names)) != 2:
            raise FcnsegError(f"head_names must be two different names, got {list(head_names)}")
        heads = {head_names[0]: num_classes, head_names[1]: second_classes}
    elif len(heads) != 2:
        raise FcnsegError(f"heads: fcn16s_twohead has two heads, got {dict(heads)}")
    return _build(
        ("pool4",),
        num_classes=heads,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        batch_norm=batch_norm,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


def _rgb_hha(skips: tuple[str, ...], **options: Any) -> LateFusionFCN:
    if options.pop("in_channels") != 6:
        raise FcnsegError("in_channels: a colour + HHA late-fusion net takes 6 channels (RGB, then HHA)")
    _check_common(options["alignment"], options["width"])
    _check_fully_connected(options["fc_dim"], options["dropout"])
    # The HHA stream starts from the same (ImageNet) weights as the colour one: HHA is read as a 3-channel image.
    return LateFusionFCN({"rgb": _build(skips, **options), "hha": _build(skips, **options)})


@register_model()
def fcn32s_rgb_hha(
    *,
    num_classes: int = 40,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 6,
) -> LateFusionFCN:
    """The paper's NYUDv2 late fusion: an FCN-32s on colour and one on HHA, score maps summed. Input: 6 channels,
    RGB then HHA (``fcnseg train --dataset nyud --data-option modality=rgb-hha``). Options as ``fcn32s``; the
    backbone weights initialise both streams."""
    return _rgb_hha((), **locals())


@register_model()
def fcn16s_rgb_hha(
    *,
    num_classes: int = 40,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 6,
) -> LateFusionFCN:
    """Late fusion of two FCN-16s (colour and HHA), the paper's best NYUDv2 net. Options as ``fcn32s_rgb_hha``."""
    return _rgb_hha(("pool4",), **locals())
