"""The fully convolutional network of Long, Shelhamer and Darrell, with its skip architecture.

One parametric model serves every variant: FCN-32s scores the coarsest map only; FCN-16s and FCN-8s upsample the
coarse scores 2x at a time and add scores from finer backbone maps (pool4, pool3) before the last upsampling
("combining what and where"). All crop offsets, and the upsampling kernels and paddings, come from the layers'
geometry (``geometry.py``). Backbones: VGG16 as released (``backbones.py``); AlexNet, GoogLeNet, ResNet-50/101 and
MobileNetV3-Large from torchvision (``backbones_tv.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FcnsegError
from ..preprocessing import Preprocessing
from .backbones import Backbone, first_conv
from .base import SegmentationModel
from .geometry import CoordMap, crop_offset, layer_map
from .upsampling import BilinearUpsample


def check_input(x: torch.Tensor, channels: int) -> None:
    """The model's door: an input of another layout is the caller's mistake, said in one line (a wrong channel
    count would otherwise surface deep inside a convolution as torch's own error)."""
    if x.dim() != 4 or x.shape[1] != channels:
        what = "colour" if channels == 3 else "colour first, then depth or HHA"
        raise FcnsegError(
            f"input of shape {tuple(x.shape)}: this model takes N x {channels} x H x W normalised images ({what})"
        )


class ScoreConv(nn.Conv2d):
    """A class-score layer: a 1 x 1 convolution to the classes that trains in fp32 under CPU autocast.

    oneDNN's AMX bf16 weight gradient of a 1 x 1 convolution from 4096 channels (fc7) to fewer than 16 outputs
    corrupts the heap (PyTorch 2.14 on Sapphire Rapids: the process aborts), which every net with a few classes
    would hit when training with ``--amp``. The score layers are a sliver of the work, and the loss reads their
    output in fp32 anyway; inference under autocast and every other device keep the usual path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cpu_amp = x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
        if cpu_amp and self.weight.dtype == torch.float32:
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def _score_layer(in_channels: int, num_classes: int) -> nn.Conv2d:
    # The release starts the class-score layers at zero: the net first outputs all-zero logits and learns from there.
    conv = ScoreConv(in_channels, num_classes, 1)
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
        return self.upsample_out.cropped(score, self.out_offset, h, w)  # 1/1


class FCN(SegmentationModel):
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
        # Class names per head, for models of several heads (the first head's are ``classes``).
        self.head_classes: dict[str, list[str] | None] = {}

    # -- what the heads share or the first head decides ------------------------------------------------------
    @property
    def head(self) -> ScoreHead:
        """The first head, whose layers carry the release's names (``model.head.score_fr``, ``.upsample_out``)."""
        return next(iter(self.score_heads.values()))

    @property
    def heads(self) -> dict[str, int]:
        """Output channels per label set, in the order ``forward`` concatenates them."""
        return {k: h.num_classes for k, h in self.score_heads.items()}

    @property
    def in_channels(self) -> int:
        """Channels of the input: 3, or more where the first layer takes depth or HHA too (early fusion)."""
        return first_conv(self.backbone).in_channels

    @property
    def alignment(self) -> str:
        """``caffe`` or ``aligned``: the backbone's."""
        return self.backbone.alignment

    @property
    def stride(self) -> int:
        """Output stride of the deepest tap (32 for VGG16)."""
        return self.head.stride

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        # The padding step run on a tensor without storage (the geometry, not a copy), then the rows and columns
        # the first convolution adds beyond "same" padding (caffe mode's 100 px a side).
        shape = self.pad(torch.empty(1, self.in_channels, height, width, device="meta")).shape
        conv = first_conv(self.backbone)
        pads = (0, 0) if isinstance(conv.padding, str) else conv.padding
        extra = [max(0, 2 * p - d * (k - 1)) for p, d, k in zip(pads, conv.dilation, conv.kernel_size, strict=True)]
        return int(shape[-2]) + extra[0], int(shape[-1]) + extra[1]

    def float_layers(self) -> list[str]:
        """The convolution fed the image itself (whose few channels, each normalised differently, would share one
        8-bit scale) and every head's class-score layers and upsamplers, where the argmax is decided; the bulk of
        the work (conv1_2 to fc7 for VGG16) runs in int8."""
        keep = [f"score_heads.{name}.{part}" for name in self.score_heads for part in ("score_", "upsample_")]
        return keep + [f"backbone.features.{i}." for i in self._feature_convs()[:1]]

    def rescaled_pairs(self) -> list[tuple[str, str]]:
        """The first convolution of a ``features`` list (VGG16, AlexNet) and the next one, where only ReLUs and max
        poolings lie between them: int8 evens out the first one's output channels (see the base class)."""
        convs = self._feature_convs()[:2]
        if len(convs) < 2:
            return []
        if not all(isinstance(m, nn.ReLU | nn.MaxPool2d) for m in self.backbone.features[convs[0] + 1 : convs[1]]):
            return []  # a batch norm between them would not commute with a per-channel scale
        return [(f"backbone.features.{convs[0]}.", f"backbone.features.{convs[1]}.")]

    def _feature_convs(self) -> list[int]:
        """Indices of the convolutions in the backbone's ``features`` list (VGG16 and AlexNet keep one; the
        torchvision backbones do not, and have none here)."""
        return [i for i, m in enumerate(getattr(self.backbone, "features", [])) if isinstance(m, nn.Conv2d)]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded as ``forward`` pads it: aligned mode up to a multiple of the stride (and margin)."""
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
        feats = self.backbone(self.pad(x))  # one trunk pass for every head
        scores = [head.decode(feats, h, w) for head in self.score_heads.values()]
        return scores[0] if len(scores) == 1 else torch.cat(scores, dim=1)


def split_heads(model: SegmentationModel, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{head: N x classes x H x W}`` from a model's concatenated output (one entry, ``"out"``, for most models)."""
    return dict(zip(model.heads, logits.split(list(model.heads.values()), dim=1), strict=True))
