"""The fully convolutional network of Long, Shelhamer and Darrell, with its skip architecture.

One parametric model serves every variant: FCN-32s scores the coarsest map only; FCN-16s and FCN-8s upsample the
coarse scores 2x at a time and add scores from finer backbone maps (pool4, pool3) before the last upsampling
("combining what and where"). All crop offsets, and the upsampling kernels and paddings, come from the layers'
geometry (``geometry.py``). Backbones: VGG16 as released (``backbones.py``); AlexNet, GoogLeNet, ResNet-50/101 and
MobileNetV3-Large from torchvision (``backbones_tv.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FcnsegError
from ..preprocessing import Preprocessing
from .backbones import Backbone, VGG16Backbone, check_alignment, first_conv, load_vgg16_imagenet, widen_first_conv
from .backbones_tv import (
    AlexNetBackbone,
    GoogLeNetBackbone,
    MobileNetV3LargeBackbone,
    ResNetBackbone,
    TorchvisionBackbone,
    load_torchvision_weights,
)
from .geometry import CoordMap, crop_offset, layer_map
from .registry import register_model
from .upsampling import BilinearUpsample


def check_input(x: torch.Tensor, channels: int) -> None:
    """The model's door: an input of another layout is the caller's mistake, said in one line (a wrong channel
    count would otherwise surface deep inside a convolution as torch's own error)."""
    if x.dim() != 4 or x.shape[1] != channels:
        what = "colour" if channels == 3 else "colour first, then depth or HHA"
        raise FcnsegError(
            f"input of shape {tuple(x.shape)}: this model takes N x {channels} x H x W normalised images ({what})"
        )


def _score_layer(in_channels: int, num_classes: int) -> nn.Conv2d:
    # The release starts the class-score layers at zero: the net first outputs all-zero logits and learns from there.
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ScoreHead(nn.Module):
    """One label set's decoder: class-score layers on a backbone's taps and the bilinear-initialised transposed
    convolutions that bring them to the input's grid, with the crops derived from the layers' geometry.
    :class:`FCN` runs one per label set on its backbone's taps.

    Args:
        backbone: the backbone whose taps (and their coordinate maps) the head reads.
        num_classes: number of output classes.
        skips: finer taps to fuse, e.g. ``("pool4", "pool3")`` for FCN-8s; ``()`` for FCN-32s.
        skip_scales: factor applied to a tap before its score layer (FCN-8s at once: pool4 0.01, pool3 1e-4).
        learnable_upsampling: train the upsampling kernels (the release keeps them fixed).
        upsample_kernels: kernel size per upsampler, keyed by the tap it upsamples into or ``"out"`` for the last
            one (FCN-AlexNet: ``{"out": 63}``); by default the one whose crops are whole pixels, 2 x factor first.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        skips: Sequence[str] = (),
        skip_scales: Mapping[str, float] | None = None,
        learnable_upsampling: bool = False,
        upsample_kernels: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise FcnsegError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.alignment: str = backbone.alignment
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
        self._build_upsampling(backbone, maps, dict(upsample_kernels or {}), learnable_upsampling)
        self.margin = self._aligned_margin(maps) if self.alignment == "aligned" else 0

    def _build_upsampling(
        self, backbone: Backbone, maps: Mapping[str, CoordMap], kernels: dict[str, int], learnable: bool
    ) -> None:
        """Each skip's upsampler and score layer, then the last upsampler; every crop from the coordinate maps."""
        extra = sorted(set(kernels) - {*self.skips, "out"})
        if extra:
            raise FcnsegError(f"upsample_kernels names {extra}; expected some of {[*self.skips, 'out']}")
        self.offsets: dict[str, int] = {}
        cmap = maps[self.top]
        for name in self.skips:
            up = self._upsampler(cmap, maps[name], kernels.get(name), learnable, final=False)
            cmap = cmap.then(layer_map(up))  # the fused map keeps the upsampled map's grid (the tap is cropped to it)
            self.offsets[name] = crop_offset(maps[name], cmap)
            self.upsample_skip[name] = up
            self.score_skip[name] = _score_layer(backbone.channels[name], self.num_classes)
        self.upsample_out = self._upsampler(cmap, CoordMap(), kernels.get("out"), learnable, final=True)
        self.out_offset = crop_offset(cmap.then(layer_map(self.upsample_out)), CoordMap())

    def _upsampler(
        self, coarse: CoordMap, fine: CoordMap, kernel: int | None, learnable: bool, *, final: bool
    ) -> BilinearUpsample:
        """The bilinear upsampler from the ``coarse`` grid to the ``fine`` one (a finer tap, or the input).

        Kernel 2 x factor as released (4/2, 16/8, 32/16, 64/32) puts each coarse cell between two fine pixels, which
        fits backbones whose cells sit at block centres (VGG16). Where the cells sit on fine pixels (odd kernels with
        "same" padding, the AlexNet release) only an odd kernel lands on whole pixels: 2 x factor - 1 (3/2, 63/32).
        The kernel whose crop is a whole number is taken unless ``kernel`` says which.

        Padding: the release pads nothing and crops afterwards (caffe mode); a skip's upsampler is padded only where
        its output would start before the tap (then crop 0). In aligned mode the padding trims the overhang so that
        the upsampled grid starts exactly on the fine one's first pixel: no crops.
        """
        factor = Fraction(coarse.stride, fine.stride)
        if factor.denominator != 1 or factor < 2:
            raise FcnsegError(f"cannot upsample from stride {coarse.stride} to stride {fine.stride}")
        f = int(factor)
        for k in [kernel] if kernel else [2 * f, 2 * f - 1]:
            # Where the first upsampled pixel lies on the fine grid, in fine pixels, before any padding; each pixel
            # of padding moves it one further.
            probe = coarse.then(layer_map(nn.ConvTranspose2d(1, 1, k, f, device="meta")))
            start = (probe.offset - fine.offset) / fine.scale
            if start.denominator == 1:
                break
        else:
            raise FcnsegError(f"a {k}/{f} upsampling cannot land on whole pixels here (it starts at {start})")
        # Aligned: pad so that the upsampled grid starts on the fine one's first pixel. Caffe: the release pads
        # nothing; only a skip whose upsampled scores would start before the tap gets the padding for crop 0.
        pad = -start if self.alignment == "aligned" else 0 if final else max(0, -start)
        if not 0 <= pad <= k - 1:
            raise FcnsegError(f"the {k}/{f} upsampling would need padding {pad} to align; this backbone cannot")
        return BilinearUpsample(self.num_classes, k, f, padding=int(pad), learnable=learnable)

    def _aligned_margin(self, maps: Mapping[str, CoordMap]) -> int:
        """How much further than the next multiple of the stride the input must be padded (aligned mode) so that
        the output covers it; 0 for VGG16, whose last upsampling reaches the end of the last 32 x 32 block.

        In aligned mode a backbone keeps every cell: an input of n x stride gives n x stride / s cells at stride s.
        Following the sizes through the upsamplers gives the output's size, n x stride + c; the margin is -c where c
        is negative (31 where the cells sit on block corners: the last cell's pixel ends the output)."""

        def up(size: int, layer: nn.ConvTranspose2d) -> int:
            return (size - 1) * layer.stride[0] - 2 * layer.padding[0] + layer.kernel_size[0]

        short = 0
        for n in range(1, 5):
            size = n
            for name in self.skips:  # the upsampled scores are cut to the tap's size where they run past it
                size = min(up(size, self.upsample_skip[name]), n * self.stride // maps[name].stride)
            short = max(short, n * self.stride - up(size, self.upsample_out))
        return short

    @property
    def crop_offsets(self) -> dict[str, int]:
        """Every crop, named as in the release: skip taps and ``"out"`` for the final one."""
        return {**self.offsets, "out": self.out_offset}

    @property
    def upsample_kernels(self) -> dict[str, int]:
        """Kernel size of every upsampler, keyed like :attr:`crop_offsets`."""
        ups = {**self.upsample_skip, "out": self.upsample_out}
        return {k: up.kernel_size[0] for k, up in ups.items()}

    def decode(self, feats: Mapping[str, torch.Tensor], h: int, w: int) -> torch.Tensor:
        """Scores at the input's ``h`` x ``w`` from the backbone's taps."""
        score = self.score_fr(feats[self.top])  # 1/32
        for name in self.skips:  # pool4 (1/16), then pool3 (1/8)
            score = self.upsample_skip[name](score)  # 2x up
            tap = feats[name]
            if self.skip_scales[name] != 1.0:
                tap = tap * self.skip_scales[name]
            skip = self.score_skip[name](tap)
            o = self.offsets[name]
            # The upsampled scores can run past the tap's end (never with VGG16, where this cuts nothing): cut them.
            score = score[:, :, : skip.shape[2] - o, : skip.shape[3] - o]
            score = score + skip[:, :, o : o + score.shape[2], o : o + score.shape[3]]
        out = self.upsample_out(score)  # 1/1
        o = self.out_offset
        return out[:, :, o : o + h, o : o + w]


class FCN(nn.Module):
    """A backbone and one :class:`ScoreHead` per label set on its taps: the paper's fully convolutional network.

    Args:
        backbone: returns ``{tap: map}`` and knows each tap's coordinate map.
        heads: the label sets, in output order: ``{name: ScoreHead}``, ``{name: num_classes}`` (each head built
            with ``head_options``) or one ``num_classes`` (a single head named ``"out"``, the usual case).
        head_options: :class:`ScoreHead`'s keywords (``skips``, ``skip_scales``, ``learnable_upsampling``,
            ``upsample_kernels``) for heads built here.

    ``forward`` maps N x C x H x W normalised images (C = :attr:`in_channels`, 3 unless the first layer was
    widened for extra input channels) to N x K x H x W logits for every H, W >= 1, where K is the sum of the
    heads' classes: the heads' scores concatenated in order (one head: its logits), so that export, the execution
    paths and tiling see one tensor; :func:`split_heads` takes it apart. :meth:`predict` gives one mask, or
    ``{head: mask}`` for several heads.
    """

    def __init__(self, backbone: Backbone, heads: int | Mapping[str, ScoreHead | int], **head_options: Any) -> None:
        super().__init__()  # the backbone is registered first, so its layers come first in the state dict
        self.backbone = backbone
        if isinstance(heads, int):
            heads = {"out": heads}
        self.score_heads = nn.ModuleDict(
            {k: h if isinstance(h, ScoreHead) else ScoreHead(backbone, h, **head_options) for k, h in heads.items()}
        )
        if not self.score_heads:
            raise FcnsegError("an FCN needs at least one head")
        self.preprocessing: Preprocessing = backbone.preprocessing
        self.classes: list[str] | None = None
        self.palette: list[list[int]] | None = None
        # Class names per head, for models of several heads (the first head's are ``classes``).
        self.head_classes: dict[str, list[str] | None] = {}

    # -- what the heads share or the first head decides ------------------------------------------------------
    @property
    def head(self) -> ScoreHead:
        """The first head: its layers carry the release's names (``model.score_fr``, ``model.upsample_out``)."""
        return next(iter(self.score_heads.values()))

    @property
    def heads(self) -> dict[str, int]:
        """Output channels per label set, in the order ``forward`` concatenates them."""
        return {k: h.num_classes for k, h in self.score_heads.items()}

    @property
    def in_channels(self) -> int:
        """Channels of the input: 3, or more where the first layer takes depth or HHA too (early fusion)."""
        return first_conv(self.backbone).in_channels

    num_classes = property(lambda self: self.head.num_classes, doc="The first head's number of classes.")
    alignment = property(lambda self: self.backbone.alignment, doc="``caffe`` or ``aligned``.")
    stride = property(lambda self: self.head.stride, doc="Output stride of the deepest tap (32 for VGG16).")
    skips = property(lambda self: self.head.skips, doc="The first head's skip taps, coarse to fine.")
    top = property(lambda self: self.head.top, doc="The deepest tap, which every head scores (fc7 for VGG16).")
    skip_scales = property(lambda self: self.head.skip_scales)
    crop_offsets = property(lambda self: self.head.crop_offsets)
    upsample_kernels = property(lambda self: self.head.upsample_kernels)
    score_fr = property(lambda self: self.head.score_fr)
    score_skip = property(lambda self: self.head.score_skip)
    upsample_skip = property(lambda self: self.head.upsample_skip)
    upsample_out = property(lambda self: self.head.upsample_out)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.alignment != "aligned":
            return x
        h, w = x.shape[-2:]
        # Pad bottom/right up to a multiple of the stride: the top-left origin, and so the geometry, is kept.
        # Backbones whose cells sit on block corners need a margin beyond that (``ScoreHead._aligned_margin``).
        e = max(head.margin for head in self.score_heads.values())
        if e:
            return F.pad(x, (0, (-(w + e)) % self.stride + e, 0, (-(h + e)) % self.stride + e))
        return F.pad(x, (0, (-w) % self.stride, 0, (-h) % self.stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        h, w = x.shape[-2:]
        feats = self.backbone(self._pad(x))  # one trunk pass for every head
        scores = [head.decode(feats, h, w) for head in self.score_heads.values()]
        return scores[0] if len(scores) == 1 else torch.cat(scores, dim=1)

    def predict_proba(self, image: Any, **kwargs: Any) -> np.ndarray | dict[str, np.ndarray]:
        """Class probabilities, C x H x W float32, for one image (path, PIL image or H x W x C array); a model of
        several heads gives ``{head: probabilities}``.

        Keywords: ``runner`` (an execution path, :func:`fcnseg.runtime.make_runner`), ``tile`` and ``overlap``.
        """
        from ..predict import predict_logits

        logits = predict_logits(self, image, **kwargs)[None]
        probs = {k: v[0].softmax(0).cpu().numpy() for k, v in split_heads(self, logits).items()}
        return probs if len(probs) > 1 else next(iter(probs.values()))

    def predict(self, image: Any, **kwargs: Any) -> np.ndarray | dict[str, np.ndarray]:
        """Class indices, H x W, at the image's own size (path, PIL image or H x W x C array); a model of several
        heads gives ``{head: mask}`` (with ``tile``, the heads' scores are blended window by window, then split).

        Keywords: ``runner`` (an execution path, :func:`fcnseg.runtime.make_runner`), ``tile`` and ``overlap``.
        """
        from ..predict import predict_mask

        if len(self.heads) == 1:
            return predict_mask(self, image, **kwargs)
        from ..predict import predict_logits

        logits = predict_logits(self, image, **kwargs)[None]
        return {k: v[0].argmax(0).to(torch.uint8).cpu().numpy() for k, v in split_heads(self, logits).items()}


def split_heads(model: nn.Module, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{head: N x classes x H x W}`` from a model's concatenated output (one entry, ``"out"``, for most models)."""
    heads: dict[str, int] = getattr(model, "heads", None) or {"out": logits.shape[1]}
    return dict(zip(heads, logits.split(list(heads.values()), dim=1), strict=True))


def _build(
    skips: Sequence[str],
    *,
    num_classes: int | Mapping[str, int],
    alignment: str,
    width: float,
    fc_dim: int,
    batch_norm: bool,
    dropout: float,
    learnable_upsampling: bool,
    backbone_weights: str | None,
    in_channels: int = 3,
    skip_scales: Mapping[str, float] | None = None,
) -> FCN:
    """A VGG16 FCN with these skips; ``num_classes`` is one head's count or ``{head: count}`` for several."""
    _check_common(alignment, width, in_channels)
    _check_fully_connected(fc_dim, dropout)
    backbone = VGG16Backbone(alignment=alignment, width=width, fc_dim=fc_dim, batch_norm=batch_norm, dropout=dropout)  # type: ignore[arg-type]
    if backbone_weights is not None:
        load_vgg16_imagenet(backbone, backbone_weights)
    model = FCN(backbone, num_classes, skips=skips, skip_scales=skip_scales, learnable_upsampling=learnable_upsampling)
    return with_input_channels(model, in_channels)


def with_input_channels(model: FCN, in_channels: int) -> FCN:
    """``model`` taking ``in_channels`` (colour first, then e.g. depth): the first layer widened by
    :func:`~fcnseg.models.backbones.widen_input_weight` (after any ImageNet weights were loaded) and the
    preprocessing extended with channels normalised like the average colour channel until a dataset says better
    (``fcnseg train`` takes NYUDv2's depth and HHA means)."""
    if in_channels == 3:
        return model
    widen_first_conv(model.backbone, in_channels)
    model.preprocessing = model.preprocessing.for_channels(in_channels)
    model.backbone.preprocessing = model.preprocessing
    return model


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
    in_channels: int = 3,
) -> FCN:
    """FCN-32s on VGG16: scores at stride 32, one 64/32 upsampling.

    ``backbone_weights``: torchvision enum name ("IMAGENET1K_V1") or a VGG16 state-dict file; None = random.
    ``in_channels``: 3 for colour; 4 for the paper's RGBD early fusion (colour, then depth).
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
    in_channels: int = 3,
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
    in_channels: int = 3,
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
    in_channels: int = 3,
) -> FCN:
    """FCN-8s trained in one stage: pool4 scaled by 0.01 and pool3 by 0.0001 before their score layers."""
    return _build(("pool4", "pool3"), skip_scales={"pool4": 0.01, "pool3": 1e-4}, **locals())


# ------------------------------------------------------------------------------ other torchvision backbones
#
# Each builder takes its own options. Every one takes num_classes, alignment, width, learnable_upsampling,
# backbone_weights and in_channels (> 3 widens the first layer for colour plus depth: the paper's early fusion,
# :func:`with_input_channels`). fc6/fc7's ``fc_dim`` and ``dropout`` belong to the networks that keep fully
# connected layers (VGG16, AlexNet), and ``batch_norm`` to VGG16 alone: the others refuse them, naming them
# (:func:`~fcnseg.models.registry.get_model`), rather than ignore them.


def _check_common(alignment: str, width: float, in_channels: int = 3) -> None:
    check_alignment(alignment)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 3:
        raise FcnsegError(f"in_channels must be an integer >= 3 (colour first, then depth or HHA), got {in_channels!r}")
    if width <= 0:
        raise FcnsegError(f"width must be > 0, got width={width}")


def _check_fully_connected(fc_dim: int, dropout: float) -> None:
    """fc6/fc7's options, for the networks that keep them (VGG16, AlexNet)."""
    if not 0 <= dropout < 1:
        raise FcnsegError(f"dropout must be in [0, 1), got {dropout}")
    if fc_dim < 1:
        raise FcnsegError(f"fc_dim must be >= 1, got fc_dim={fc_dim}")


def _build_tv(
    backbone: TorchvisionBackbone,
    skips: Sequence[str],
    *,
    num_classes: int,
    learnable_upsampling: bool,
    backbone_weights: str | None,
    in_channels: int = 3,
    upsample_kernels: Mapping[str, int] | None = None,
) -> FCN:
    if backbone_weights is not None:
        load_torchvision_weights(backbone, backbone_weights)
    model = FCN(
        backbone,
        num_classes,
        skips=skips,
        learnable_upsampling=learnable_upsampling,
        upsample_kernels=upsample_kernels,
    )
    return with_input_channels(model, in_channels)


@register_model()
def fcn32s_alexnet(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    fc_dim: int = 4096,
    dropout: float = 0.5,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 3,
) -> FCN:
    """FCN-AlexNet as released: FCN-32s on AlexNet (fc6 a 6 x 6, fc7 a 1 x 1 convolution), one 63/32 upsampling;
    final crop 18 in caffe mode. ``fc_dim`` and ``dropout``: as for VGG16 (no batch-norm variant).

    ``backbone_weights``: ``"IMAGENET1K_V1"`` / ``"DEFAULT"`` or a torchvision ``alexnet`` state-dict file.
    """
    _check_common(alignment, width, in_channels)
    _check_fully_connected(fc_dim, dropout)
    backbone = AlexNetBackbone(alignment=alignment, width=width, fc_dim=fc_dim, dropout=dropout)  # type: ignore[arg-type]
    # 63, not 64: AlexNet's fc7 cells sit on whole input pixels, and only an odd kernel keeps them there.
    return _build_tv(
        backbone,
        (),
        num_classes=num_classes,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
        upsample_kernels={"out": 63},
    )


def _tv_model(
    make_backbone: Callable[[str, float], TorchvisionBackbone],
    skips: Sequence[str],
    *,
    num_classes: int,
    alignment: str,
    width: float,
    learnable_upsampling: bool,
    backbone_weights: str | None,
    in_channels: int,
) -> FCN:
    """A network without fully connected layers, with batch norm by construction."""
    _check_common(alignment, width, in_channels)
    return _build_tv(
        make_backbone(alignment, width),
        skips,
        num_classes=num_classes,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


def _googlenet(alignment: str, width: float) -> GoogLeNetBackbone:
    return GoogLeNetBackbone(alignment=alignment, width=width)  # type: ignore[arg-type]


@register_model()
def fcn32s_googlenet(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 3,
) -> FCN:
    """The paper's FCN-GoogLeNet: FCN-32s on GoogLeNet without its pooling, classifier and auxiliary heads.

    ``backbone_weights``: ``"IMAGENET1K_V1"`` / ``"DEFAULT"`` or a torchvision ``googlenet`` state-dict file.
    """
    return _tv_model(_googlenet, (), **locals())


@register_model()
def fcn8s_googlenet(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 3,
) -> FCN:
    """FCN-8s on GoogLeNet: skips from inception4e (1/16) and inception3b (1/8). Options as ``fcn32s_googlenet``."""
    return _tv_model(_googlenet, ("inception4e", "inception3b"), **locals())


def _resnet(depth: int, alignment: str, width: float) -> ResNetBackbone:
    return ResNetBackbone(depth, alignment=alignment, width=width)  # type: ignore[arg-type]


@register_model()
def fcn8s_resnet50(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 3,
) -> FCN:
    """FCN-8s on ResNet-50: scores on layer4 (1/32) with skips from layer3 (1/16) and layer2 (1/8).

    ``backbone_weights``: ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``, ``"DEFAULT"`` or a torchvision state-dict file.
    """
    return _tv_model(partial(_resnet, 50), ("layer3", "layer2"), **locals())


@register_model()
def fcn8s_resnet101(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 3,
) -> FCN:
    """FCN-8s on ResNet-101: scores on layer4 (1/32) with skips from layer3 (1/16) and layer2 (1/8).
    Options as ``fcn8s_resnet50``."""
    return _tv_model(partial(_resnet, 101), ("layer3", "layer2"), **locals())


def _mobilenet_v3_large(alignment: str, width: float) -> MobileNetV3LargeBackbone:
    return MobileNetV3LargeBackbone(alignment=alignment, width=width)  # type: ignore[arg-type]


@register_model()
def fcn8s_mobilenet_v3_large(
    *,
    num_classes: int = 21,
    alignment: str = "aligned",
    width: float = 1.0,
    learnable_upsampling: bool = False,
    backbone_weights: str | None = None,
    in_channels: int = 3,
) -> FCN:
    """FCN-8s on MobileNetV3-Large: scores on its last 1 x 1 convolution (1/32), skips from the last 112-channel
    (1/16) and 40-channel (1/8) blocks. ``width`` is torchvision's width multiplier (channels rounded to 8).

    ``backbone_weights``: ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``, ``"DEFAULT"`` or a torchvision state-dict file.
    """
    return _tv_model(_mobilenet_v3_large, ("features12", "features6"), **locals())
