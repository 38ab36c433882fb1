"""The fully convolutional network of Long, Shelhamer and Darrell, with its skip architecture.

One parametric model serves every variant: FCN-32s scores the coarsest map only; FCN-16s and FCN-8s upsample the
coarse scores 2x at a time and add scores from finer backbone maps (pool4, pool3) before the last upsampling
("combining what and where"). All crop offsets come from the layers' geometry (``geometry.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FcnsegError
from ..preprocessing import Preprocessing
from .backbones import Backbone, VGG16Backbone, check_alignment, load_vgg16_imagenet
from .geometry import CoordMap, crop_offset, layer_map
from .registry import register_model
from .upsampling import BilinearUpsample


def _score_layer(in_channels: int, num_classes: int) -> nn.Conv2d:
    # The release starts the class-score layers at zero: the net first outputs all-zero logits and learns from there.
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCN(nn.Module):
    """A backbone, class-score layers on its taps, and bilinear-initialised transposed-convolution upsampling.

    Args:
        backbone: returns ``{tap: map}`` and knows each tap's coordinate map.
        num_classes: number of output classes.
        skips: finer taps to fuse, e.g. ``("pool4", "pool3")`` for FCN-8s; ``()`` for FCN-32s.
        skip_scales: factor applied to a tap before its score layer (FCN-8s at once: pool4 0.01, pool3 1e-4).
        learnable_upsampling: train the upsampling kernels (the release keeps them fixed).

    ``forward`` maps N x 3 x H x W normalised images to N x num_classes x H x W logits for every H, W >= 1.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        skips: Sequence[str] = (),
        skip_scales: Mapping[str, float] | None = None,
        learnable_upsampling: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise FcnsegError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.alignment: str = backbone.alignment
        self.preprocessing: Preprocessing = backbone.preprocessing
        self.classes: list[str] | None = None
        self.palette: list[list[int]] | None = None

        maps = backbone.coord_maps()
        self.top = backbone.taps[-1]
        unknown = [s for s in skips if s not in backbone.taps[:-1]]
        if unknown:
            raise FcnsegError(f"unknown skip tap(s) {unknown}; this backbone has {backbone.taps[:-1]}")
        # Fuse from coarse to fine, whatever order the caller gave.
        self.skips = tuple(sorted(skips, key=lambda s: -maps[s].stride))
        self.skip_scales = {s: float((skip_scales or {}).get(s, 1.0)) for s in self.skips}
        self.stride = maps[self.top].stride

        self.score_fr = _score_layer(backbone.channels[self.top], num_classes)
        self.score_skip = nn.ModuleDict()
        self.upsample_skip = nn.ModuleDict()
        self.offsets: dict[str, int] = {}
        cmap, stride = maps[self.top], self.stride
        for name in self.skips:
            up = self._upsampler(stride // maps[name].stride, learnable_upsampling)
            cmap = cmap.then(layer_map(up))
            self.offsets[name] = crop_offset(maps[name], cmap)
            self.upsample_skip[name] = up
            self.score_skip[name] = _score_layer(backbone.channels[name], num_classes)
            stride = maps[name].stride
        self.upsample_out = self._upsampler(stride, learnable_upsampling)
        self.out_offset = crop_offset(cmap.then(layer_map(self.upsample_out)), CoordMap())

    def _upsampler(self, factor: int, learnable: bool) -> BilinearUpsample:
        # Kernel 2 x factor as released (4/2, 16/8, 32/16, 64/32). The release pads nothing and crops afterwards;
        # in aligned mode padding (k - s) / 2 trims the overhang so that the output grid lands on the input's.
        pad = 0 if self.alignment == "caffe" else factor // 2
        return BilinearUpsample(self.num_classes, 2 * factor, factor, padding=pad, learnable=learnable)

    @property
    def crop_offsets(self) -> dict[str, int]:
        """Every crop, named as in the release: skip taps and ``"out"`` for the final one."""
        return {**self.offsets, "out": self.out_offset}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.alignment == "aligned":
            # Pad bottom/right up to a multiple of the stride: the top-left origin, and so the geometry, is kept.
            x = F.pad(x, (0, (-w) % self.stride, 0, (-h) % self.stride))
        feats = self.backbone(x)
        score = self.score_fr(feats[self.top])  # 1/32
        for name in self.skips:  # pool4 (1/16), then pool3 (1/8)
            score = self.upsample_skip[name](score)  # 2x up
            tap = feats[name]
            if self.skip_scales[name] != 1.0:
                tap = tap * self.skip_scales[name]
            skip = self.score_skip[name](tap)
            o = self.offsets[name]
            score = score + skip[:, :, o : o + score.shape[2], o : o + score.shape[3]]
        out = self.upsample_out(score)  # 1/1
        o = self.out_offset
        return out[:, :, o : o + h, o : o + w]

    def predict_proba(self, image: Any, **kwargs: Any) -> np.ndarray:
        """Class probabilities, C x H x W float32, for one image (path, PIL image or H x W x C array).

        Keywords: ``runner`` (an execution path, :func:`fcnseg.runtime.make_runner`), ``tile`` and ``overlap``.
        """
        from ..predict import predict_proba

        return predict_proba(self, image, **kwargs)

    def predict(self, image: Any, **kwargs: Any) -> np.ndarray:
        """Class indices, H x W, at the image's own size (path, PIL image or H x W x C array).

        Keywords: ``runner`` (an execution path, :func:`fcnseg.runtime.make_runner`), ``tile`` and ``overlap``.
        """
        from ..predict import predict_mask

        return predict_mask(self, image, **kwargs)


def _build(
    skips: Sequence[str],
    *,
    num_classes: int,
    alignment: str,
    width: float,
    fc_dim: int,
    batch_norm: bool,
    dropout: float,
    learnable_upsampling: bool,
    backbone_weights: str | None,
    skip_scales: Mapping[str, float] | None = None,
) -> FCN:
    check_alignment(alignment)
    if not 0 <= dropout < 1:
        raise FcnsegError(f"dropout must be in [0, 1), got {dropout}")
    if width <= 0 or fc_dim < 1:
        raise FcnsegError(f"width must be > 0 and fc_dim >= 1, got width={width}, fc_dim={fc_dim}")
    backbone = VGG16Backbone(alignment=alignment, width=width, fc_dim=fc_dim, batch_norm=batch_norm, dropout=dropout)  # type: ignore[arg-type]
    if backbone_weights is not None:
        load_vgg16_imagenet(backbone, backbone_weights)
    return FCN(
        backbone,
        num_classes,
        skips=skips,
        skip_scales=skip_scales,
        learnable_upsampling=learnable_upsampling,
    )


@register_model()
def fcn32s(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
) -> FCN:
    """FCN-32s on VGG16: scores at stride 32, one 64/32 upsampling.

    ``backbone_weights``: torchvision enum name ("IMAGENET1K_V1") or a VGG16 state-dict file; None = random.
    """
    return _build((), **locals())


@register_model()
def fcn16s(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
) -> FCN:
    """FCN-16s on VGG16: stride-32 scores upsampled 2x, plus pool4 scores, upsampled 32/16."""
    return _build(("pool4",), **locals())


@register_model()
def fcn8s(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
) -> FCN:
    """FCN-8s on VGG16 (staged training): FCN-16s plus pool3 scores, upsampled 16/8."""
    return _build(("pool4", "pool3"), **locals())


@register_model()
def fcn8s_atonce(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    batch_norm: bool = False,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
) -> FCN:
    """FCN-8s trained in one stage: pool4 scaled by 0.01 and pool3 by 0.0001 before their score layers."""
    return _build(("pool4", "pool3"), skip_scales={"pool4": 0.01, "pool3": 1e-4}, **locals())
