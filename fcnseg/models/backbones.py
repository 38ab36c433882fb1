"""Classifiers turned into fully convolutional feature extractors.

A backbone returns a dict of named feature maps (``pool3`` at stride 8, ``pool4`` at 16, ``fc7`` at 32) and says
where each map's pixels sit in the input (``coord_maps``), from which the FCN derives its crops.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:  # torchvision is imported where its weights are read: importing it takes over a second
    from torchvision.models import WeightsEnum
    from torchvision.models import vgg as tv_vgg

from ..errors import FcnsegError, shown
from ..preprocessing import CAFFE, IMAGENET, Preprocessing
from .adapt import convolutionalise_vgg16, widen_input_weight
from .geometry import CoordMap, compose

Alignment = Literal["caffe", "aligned"]
ALIGNMENTS: tuple[str, ...] = ("caffe", "aligned")


def check_alignment(alignment: str) -> None:
    if alignment not in ALIGNMENTS:
        raise FcnsegError(f"alignment must be one of {', '.join(ALIGNMENTS)}; got {shown(alignment)}")


class Backbone(nn.Module):
    """Base class: ``forward(x) -> {tap: feature map}``; ``taps`` lists the tap names from fine to coarse."""

    taps: tuple[str, ...]
    channels: dict[str, int]
    preprocessing: Preprocessing = IMAGENET

    def coord_maps(self) -> dict[str, CoordMap]:
        raise NotImplementedError


def first_conv(module: nn.Module) -> nn.Conv2d:
    """The convolution that sees the input: the first one a backbone registers."""
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def widen_first_conv(backbone: nn.Module, in_channels: int) -> None:
    """Give ``backbone``'s first convolution ``in_channels`` inputs (:func:`widen_input_weight`), in place."""
    conv = first_conv(backbone)
    if in_channels == conv.in_channels:
        return
    with torch.no_grad():
        conv.weight = nn.Parameter(widen_input_weight(conv.weight.detach(), in_channels))
    conv.in_channels = in_channels


# VGG's configuration "D" (16 layers), as torchvision's ``vgg.cfgs["D"]`` lists it: the output channels of each
# 3 x 3 convolution, "M" for a 2 x 2 max pooling of stride 2.
VGG16_LAYERS: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)  # fmt: skip


def vgg_features(layers: Sequence[int | str], batch_norm: bool = False) -> nn.Sequential:
    """VGG's convolutional body in torchvision's module order (``vgg.make_layers``): each 3 x 3 convolution
    (padding 1) followed by its batch norm where asked and a ReLU, each "M" a 2 x 2 max pooling of stride 2. The
    same indices make torchvision's state dict keys load unchanged; the modules are created, and so initialised
    from torch's generator, in the same order."""
    modules: list[nn.Module] = []
    in_channels = 3
    for layer in layers:
        if layer == "M":
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        modules.append(nn.Conv2d(in_channels, int(layer), kernel_size=3, padding=1))
        modules += [nn.BatchNorm2d(int(layer)), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
        in_channels = int(layer)
    return nn.Sequential(*modules)


class VGG16Backbone(Backbone):
    """VGG16 (torchvision's configuration "D") with fc6 as a 7x7 and fc7 as a 1x1 convolution.

    ``alignment="caffe"`` reproduces the release: conv1_1 padded by 100, max pooling rounding up, fc6 unpadded.
    ``alignment="aligned"`` keeps VGG's own padding and pads fc6 by 3, so every stride-32 cell is centred on its
    32 x 32 block of a (padded) input. ``width`` scales every channel count (1.0 = the published network) and
    ``fc_dim`` sets fc6/fc7's 4096 channels; smaller ones give fast test and demo networks. ``batch_norm`` gives
    torchvision's ``vgg16_bn`` body (a modern option that trains quickly from scratch; not in the paper);
    ``dropout`` is the rate after fc6 and fc7 (0.5 as released).
    """

    taps = ("pool3", "pool4", "fc7")

    def __init__(
        self,
        *,
        alignment: Alignment = "aligned",
        width: float = 1.0,
        fc_dim: int = 4096,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        check_alignment(alignment)
        self.alignment = alignment
        cfg = [v if v == "M" else max(1, round(int(v) * width)) for v in VGG16_LAYERS]
        # Same module indices as torchvision's vgg16().features, so its state dict keys load unchanged.
        self.features = vgg_features(cfg, batch_norm=batch_norm)
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        if alignment == "caffe":
            # Pad 100 lets the output be cropped into alignment with any input size (conv1_1 pad=100 in the Caffe
            # release's voc-fcn32s/net.py; its README, "Why pad the input?"); Caffe pools round up.
            self.features[0].padding = (100, 100)
            for i in pools:
                self.features[i].ceil_mode = True
        # pool3 / pool4 / pool5 end after these indices.
        self._ends = {"pool3": pools[2] + 1, "pool4": pools[3] + 1, "pool5": pools[4] + 1}
        self.fc6 = nn.Conv2d(cfg[-2], fc_dim, 7, padding=0 if alignment == "caffe" else 3)
        self.fc7 = nn.Conv2d(fc_dim, fc_dim, 1)
        self.relu6, self.drop6 = nn.ReLU(inplace=True), nn.Dropout(dropout)
        self.relu7, self.drop7 = nn.ReLU(inplace=True), nn.Dropout(dropout)
        convs = [v for v in cfg if v != "M"]
        self.channels = {"pool3": convs[6], "pool4": convs[9], "fc7": fc_dim}
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation: He init for convolutions, N(0, 0.01) for the (former) linear layers.
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        for m in (self.fc6, self.fc7):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

    def _head(self) -> list[nn.Module]:
        return [self.fc6, self.relu6, self.drop6, self.fc7, self.relu7, self.drop7]

    def coord_maps(self) -> dict[str, CoordMap]:
        pool3 = compose(self.features[: self._ends["pool3"]])
        pool4 = compose(self.features[self._ends["pool3"] : self._ends["pool4"]], pool3)
        pool5 = compose(self.features[self._ends["pool4"] : self._ends["pool5"]], pool4)
        return {"pool3": pool3, "pool4": pool4, "fc7": compose(self._head(), pool5)}

    def _run(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        for i in range(start, end):
            x = self.features[i](x)
        return x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = self._ends
        pool3 = self._run(x, 0, e["pool3"])  # 1/8
        pool4 = self._run(pool3, e["pool3"], e["pool4"])  # 1/16
        pool5 = self._run(pool4, e["pool4"], e["pool5"])  # 1/32
        fc6 = self.drop6(self.relu6(self.fc6(pool5)))  # 1/32, the 7x7 convolution that was fc6
        fc7 = self.drop7(self.relu7(self.fc7(fc6)))  # 1/32
        return {"pool3": pool3, "pool4": pool4, "fc7": fc7}


def preprocessing_of(weights: WeightsEnum) -> Preprocessing:
    """The input a torchvision weights entry expects, read off its own transforms (mean and std on [0, 1])."""
    t = weights.transforms()
    return Preprocessing(mean=tuple(t.mean), std=tuple(t.std))


def _read_state_dict(path: str, arch: str = "VGG16") -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FcnsegError(f"{path}: cannot read {arch} weights ({e.__class__.__name__})") from None
    if not isinstance(sd, Mapping):
        raise FcnsegError(f"{path}: holds a {type(sd).__name__}, expected a torchvision {arch} state dict")
    return dict(sd)


def _enum_state_dict(weights: WeightsEnum, arch: str = "VGG16") -> dict[str, torch.Tensor]:
    try:
        # torch.hub reads its cache with weights_only=False unless told otherwise: a file put there in place of
        # the download would run its pickled code.
        # check_hash: the download must have the SHA-256 prefix its file name carries (vgg16-397923af.pth).
        return weights.get_state_dict(progress=True, weights_only=True, check_hash=True)
    except OSError as e:  # URLError included: no network, proxy, dead link
        raise FcnsegError(
            f"backbone weights {weights}: cannot download {weights.url} ({getattr(e, 'reason', e)}); "
            f"pass a local {arch} state dict with --backbone-weights FILE"
        ) from None
    except Exception as e:  # a damaged file in torch.hub's cache
        if "invalid hash value" in str(e):  # torch.hub kept nothing of the download
            raise FcnsegError(
                f"backbone weights {weights}: the download of {weights.url} is not the published file ({e}); "
                "nothing was kept"
            ) from None
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise FcnsegError(
            f"backbone weights {weights}: cannot read {cached} ({e.__class__.__name__}); delete it to download again"
        ) from None


def load_vgg16_imagenet(backbone: VGG16Backbone, weights: str | os.PathLike | tv_vgg.VGG16_Weights) -> None:
    """Fill ``backbone`` with ImageNet weights and record the input they expect in ``backbone.preprocessing``.

    ``weights``: a torchvision ``VGG16_Weights`` member or its name ("IMAGENET1K_V1", "IMAGENET1K_FEATURES",
    "DEFAULT"; ImageNet RGB mean/std as the entry's transforms say), ``"CAFFE"`` (the Caffe VGG16 the FCN release
    started from, as torchfcn publishes it: BGR, 0-255, mean subtraction; ``"caffe:FILE"`` for a local copy of it)
    or a torchvision-layout VGG16 state-dict file (taken to expect ImageNet RGB mean/std). ``IMAGENET1K_FEATURES``
    has no classifier, so fc6/fc7 keep their random initialisation.
    """
    from torchvision.models import vgg as tv_vgg

    label = str(weights)
    features_only = False
    if isinstance(weights, tv_vgg.VGG16_Weights) or label in tv_vgg.VGG16_Weights.__members__ or label == "DEFAULT":
        enum = weights if isinstance(weights, tv_vgg.VGG16_Weights) else tv_vgg.VGG16_Weights[label]
        sd, preprocessing = _enum_state_dict(enum), preprocessing_of(enum)
        features_only = enum is tv_vgg.VGG16_Weights.IMAGENET1K_FEATURES
    elif label.upper() == "CAFFE" and not os.path.exists(label):
        from .weights import vgg16_caffe_state_dict

        sd, preprocessing = vgg16_caffe_state_dict(), CAFFE
    elif label[:6].lower() == "caffe:":  # a local copy of the Caffe VGG16: md5-checked, Caffe input
        from .weights import VGG16_CAFFE, verify_hash

        path = os.path.expanduser(label[6:])
        if not os.path.isfile(path):
            raise FcnsegError(f"backbone weights {shown(label)}: no such file {path}")
        verify_hash(path, md5=VGG16_CAFFE.md5)
        sd, preprocessing = _read_state_dict(path), CAFFE
    elif os.path.exists(label):
        sd, preprocessing = _read_state_dict(label), IMAGENET
    else:
        choices = ", ".join([*tv_vgg.VGG16_Weights.__members__, "DEFAULT", "CAFFE", "caffe:FILE"])
        raise FcnsegError(f"backbone weights {shown(label)}: expected a file or one of {choices}")
    sd = {k: v for k, v in sd.items() if k.startswith("features.")} if features_only else convolutionalise_vgg16(sd)
    own = backbone.state_dict()
    mismatched = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    if mismatched:
        raise FcnsegError(
            f"backbone weights {shown(label)} do not fit this VGG16 (width/fc_dim differ): {mismatched[0]}"
        )
    backbone.load_state_dict(sd, strict=not features_only)
    backbone.preprocessing = preprocessing
