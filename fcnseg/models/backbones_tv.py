"""More torchvision classifiers as FCN backbones: AlexNet, GoogLeNet, ResNet-50/101 and MobileNetV3-Large.

As for VGG16 (``backbones.py``), each backbone returns named feature maps from fine to coarse, at strides 8, 16
and 32, and knows where their pixels sit in the input (``coord_maps``), from which the FCN derives its crops and
upsampling kernels. Module names follow torchvision's, so its ImageNet state dicts load after dropping the
classifier (and, for AlexNet, reshaping fc6/fc7 into convolutions).

Alignment modes:

* ``"caffe"``: the release's recipe, applied to every backbone: the first convolution is padded by 100 and max
  pooling rounds up, so that every input size can be aligned by cropping; crops are derived from the geometry.
  For AlexNet this is the released FCN-AlexNet (final crop 18 after the 63/32 upsampling). The release ships no
  GoogLeNet, ResNet or MobileNet FCN: for them it is the same recipe, at the same extra compute as for VGG16 (their
  2x upsamplers get the padding that keeps the skip crops at 0, see ``FCN._upsampler``).
* ``"aligned"``: no extra padding and no crops; the FCN pads the input at the bottom/right instead. The networks
  keep torchvision's own padding, except AlexNet, whose unpadded pooling would drop cells: there conv1 is padded by
  5 and the poolings by 1 (ImageNet weights still apply; only the border handling differs from torchvision's).

``width`` scales every channel count (1.0 = the published network), for fast test and demo networks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import partial

import torch
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models.alexnet import AlexNet_Weights
from torchvision.models.googlenet import BasicConv2d, GoogLeNet_Weights, Inception
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig, MobileNet_V3_Large_Weights
from torchvision.models.resnet import Bottleneck, ResNet50_Weights, ResNet101_Weights
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from ..errors import FcnsegError
from ..preprocessing import IMAGENET, Preprocessing
from .adapt import convolutionalise_alexnet
from .backbones import (
    Alignment,
    Backbone,
    _enum_state_dict,
    _read_state_dict,
    check_alignment,
    preprocessing_of,
)
from .geometry import CoordMap, layer_map

CAFFE_PAD = 100  # the release's padding of the first convolution


def _ch(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def block_map(module: nn.Module) -> CoordMap:
    """Coordinate map of a layer or of one of torchvision's building blocks. Parallel paths (Inception branches, a
    residual block's shortcut) must put their pixels in the same place, or they could not be summed/concatenated."""
    if isinstance(module, BasicConv2d):
        return layer_map(module.conv)
    if isinstance(module, Inception):
        return _same_map(module, [module.branch1, module.branch2, module.branch3, module.branch4])
    if isinstance(module, Bottleneck):
        main = chain([module.conv1, module.conv2, module.conv3])
        return _same_map(module, [main] + ([module.downsample] if module.downsample is not None else []))
    if isinstance(module, InvertedResidual):
        return chain(module.block)
    if isinstance(module, SqueezeExcitation):
        return CoordMap()  # rescales channels by a global statistic: moves nothing
    if isinstance(module, nn.Sequential):
        return chain(module)
    return layer_map(module)


def chain(layers: Iterable[nn.Module], start: CoordMap | None = None) -> CoordMap:
    """The map of blocks applied one after the other (``geometry.compose`` for torchvision's blocks too)."""
    cmap = start or CoordMap()
    for layer in layers:
        cmap = cmap.then(block_map(layer))
    return cmap


def _same_map(parent: nn.Module, paths: list[nn.Module | CoordMap]) -> CoordMap:
    maps = {p if isinstance(p, CoordMap) else block_map(p) for p in paths}
    if len(maps) != 1:
        raise ValueError(f"the paths of {type(parent).__name__} are not aligned: {maps}")
    return maps.pop()


def _he_init(module: nn.Module) -> None:
    # For training from scratch: He init and unit batch norm, as torchvision initialises ResNet and MobileNetV3
    # (its GoogLeNet uses a truncated normal of std 0.01, its AlexNet PyTorch's defaults; He init suits all four).
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TorchvisionBackbone(Backbone):
    """A backbone whose ImageNet weights come from a torchvision weights enum (see :func:`load_torchvision_weights`)."""

    arch: str
    weights_enum: type[WeightsEnum]

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchvision classifier state dict -> this backbone's (a pure function: nothing is modified)."""
        raise NotImplementedError

    def input_of(self, preprocessing: Preprocessing) -> Preprocessing:
        """The input this backbone's weights expect, given the classifier's (the same unless the classifier
        transforms its input itself)."""
        return preprocessing


# ---------------------------------------------------------------------------------------------------- AlexNet


class AlexNetBackbone(TorchvisionBackbone):
    """torchvision's AlexNet with fc6 as a 6 x 6 and fc7 as a 1 x 1 convolution; taps pool1 (1/8), pool2 (1/16)
    and fc7 (1/32). The release's FCN-AlexNet (``alignment="caffe"``) uses fc7 only.

    ``fc_dim`` sets fc6/fc7's 4096 channels; ``dropout`` is the rate after fc6 and fc7 (0.5 as in AlexNet).
    Aligned mode pads fc6's input by 2 at the top/left and 3 at the bottom/right: a 6 x 6 kernel has no centre
    pixel, and this keeps one fc7 cell per 32 x 32 block.
    """

    arch = "AlexNet"
    weights_enum = AlexNet_Weights
    taps = ("pool1", "pool2", "fc7")

    def __init__(
        self, *, alignment: Alignment = "aligned", width: float = 1.0, fc_dim: int = 4096, dropout: float = 0.5
    ) -> None:
        super().__init__()
        check_alignment(alignment)
        self.alignment = alignment
        caffe = alignment == "caffe"
        c = [_ch(v, width) for v in (64, 192, 384, 256, 256)]

        def pool() -> nn.MaxPool2d:
            # Caffe: unpadded, rounding up. Aligned: padded by 1, so that pixel y of the output sits on pixel 2y.
            return nn.MaxPool2d(3, 2, padding=0 if caffe else 1, ceil_mode=caffe)

        # Same module indices as torchvision's alexnet().features, so its state dict keys load unchanged.
        layers = [
            nn.Conv2d(3, c[0], 11, stride=4, padding=CAFFE_PAD if caffe else 5),
            nn.ReLU(inplace=True),
            pool(),
            nn.Conv2d(c[0], c[1], 5, padding=2),
            nn.ReLU(inplace=True),
            pool(),
            nn.Conv2d(c[1], c[2], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[2], c[3], 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c[3], c[4], 3, padding=1),
            nn.ReLU(inplace=True),
            pool(),
        ]
        self.features = nn.Sequential(*layers)
        self._pad6 = (0, 0) if caffe else (2, 3)  # (top/left, bottom/right); caffe: fc6 unpadded, as released
        self.pad6 = nn.ZeroPad2d(self._pad6 * 2) if not caffe else nn.Identity()
        self.fc6 = nn.Conv2d(c[4], fc_dim, 6)
        self.fc7 = nn.Conv2d(fc_dim, fc_dim, 1)
        self.relu6, self.drop6 = nn.ReLU(inplace=True), nn.Dropout(dropout)
        self.relu7, self.drop7 = nn.ReLU(inplace=True), nn.Dropout(dropout)
        self.channels = {"pool1": c[0], "pool2": c[1], "fc7": fc_dim}
        _he_init(self.features)
        for m in (self.fc6, self.fc7):  # N(0, 0.01) for the former linear layers, as for VGG16
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

    def coord_maps(self) -> dict[str, CoordMap]:
        pool1 = chain(self.features[:3])
        pool2 = chain(self.features[3:6], pool1)
        pool5 = chain(self.features[6:], pool2)
        padded = pool5.then(CoordMap(offset=-self._pad6[0]))  # padded pixel y is pool5 pixel y - 2
        fc7 = chain([self.fc6, self.relu6, self.drop6, self.fc7, self.relu7, self.drop7], padded)
        return {"pool1": pool1, "pool2": pool2, "fc7": fc7}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pool1 = self.features[:3](x)  # 1/8 (conv1 has stride 4)
        pool2 = self.features[3:6](pool1)  # 1/16
        pool5 = self.features[6:](pool2)  # 1/32
        fc6 = self.drop6(self.relu6(self.fc6(self.pad6(pool5))))  # 1/32, the 6 x 6 convolution that was fc6
        fc7 = self.drop7(self.relu7(self.fc7(fc6)))  # 1/32
        return {"pool1": pool1, "pool2": pool2, "fc7": fc7}

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convolutionalise_alexnet(state_dict)


# -------------------------------------------------------------------------------------------------- GoogLeNet

# Inception modules: 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection (Szegedy et al., Table 1).
# torchvision's "5x5" branch is a 3 x 3 convolution (kept for its weights); the channel counts are the paper's.
_INCEPTION = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}
# torchvision's GoogLeNet maps ImageNet-normalised input to the [-1, 1] input its (TensorFlow-ported) weights
# were trained on ("transform_input"), with these constants.
_TRANSFORM_INPUT_MEAN = (0.485, 0.456, 0.406)
_TRANSFORM_INPUT_STD = (0.229, 0.224, 0.225)


class GoogLeNetBackbone(TorchvisionBackbone):
    """torchvision's GoogLeNet without its head: the final average pooling, dropout, classifier and the two
    auxiliary classifiers are dropped (as in the paper). Taps inception3b (1/8), inception4e (1/16) and
    inception5b (1/32). Nothing is fully connected, so nothing is convolutionalised.

    torchvision's ``transform_input`` is folded into the recorded preprocessing instead of being computed: with
    its weights the network sees RGB in [0, 1] minus 0.5, over 0.5 (see :meth:`input_of`).
    """

    arch = "GoogLeNet"
    weights_enum = GoogLeNet_Weights
    taps = ("inception3b", "inception4e", "inception5b")

    def __init__(self, *, alignment: Alignment = "aligned", width: float = 1.0) -> None:
        super().__init__()
        check_alignment(alignment)
        self.alignment = alignment
        caffe = alignment == "caffe"
        c64, c192 = _ch(64, width), _ch(192, width)
        self.conv1 = BasicConv2d(3, c64, kernel_size=7, stride=2, padding=CAFFE_PAD if caffe else 3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # GoogLeNet rounds up already, as Caffe does
        self.conv2 = BasicConv2d(c64, c64, kernel_size=1)
        self.conv3 = BasicConv2d(c64, c192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        channels, c_in = {}, c192
        for name, cfg in _INCEPTION.items():
            c1, c3r, c3, c5r, c5, cp = (_ch(v, width) for v in cfg)
            block = Inception(c_in, ch1x1=c1, ch3x3red=c3r, ch3x3=c3, ch5x5red=c5r, ch5x5=c5, pool_proj=cp)
            setattr(self, name, block)
            c_in = channels[name] = c1 + c3 + c5 + cp
            if name == "inception3b":
                self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
            elif name == "inception4e":
                self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.channels = {t: channels[t] for t in self.taps}
        _he_init(self)

    def _stages(self) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        s8 = [self.conv1, self.maxpool1, self.conv2, self.conv3, self.maxpool2, self.inception3a, self.inception3b]
        s16 = [self.maxpool3, self.inception4a, self.inception4b, self.inception4c, self.inception4d, self.inception4e]
        return s8, s16, [self.maxpool4, self.inception5a, self.inception5b]

    def coord_maps(self) -> dict[str, CoordMap]:
        s8, s16, s32 = self._stages()
        m8 = chain(s8)
        m16 = chain(s16, m8)
        return {"inception3b": m8, "inception4e": m16, "inception5b": chain(s32, m16)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for tap, stage in zip(self.taps, self._stages(), strict=True):  # 1/8, 1/16, 1/32
            for m in stage:
                x = m(x)
            out[tap] = x
        return out

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "conv1.conv.weight" not in state_dict:
            raise FcnsegError("not a torchvision GoogLeNet state dict: no 'conv1.conv.weight'")
        return {k: v.clone() for k, v in state_dict.items() if not k.startswith(("aux1.", "aux2.", "fc."))}

    def input_of(self, preprocessing: Preprocessing) -> Preprocessing:
        """torchvision runs its GoogLeNet weights with ``transform_input``: x' = x * s0 / 0.5 + (m0 - 0.5) / 0.5
        on the normalised input x = (p - m) / s. Folded into one normalisation: x' = (p - M) / S with
        S = 0.5 s / s0 and M = m - s (m0 - 0.5) / s0, which is mean 0.5, std 0.5 for the ImageNet m, s."""
        m, s = preprocessing.mean, preprocessing.std
        scale = tuple(round(0.5 * si / s0, 6) for si, s0 in zip(s, _TRANSFORM_INPUT_STD, strict=True))
        mean = tuple(
            round(mi - si * (m0 - 0.5) / s0, 6)
            for mi, si, m0, s0 in zip(m, s, _TRANSFORM_INPUT_MEAN, _TRANSFORM_INPUT_STD, strict=True)
        )
        return Preprocessing(mean=mean, std=scale, channel_order=preprocessing.channel_order)


# ----------------------------------------------------------------------------------------------------- ResNet

_RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_RESNET_ENUMS: dict[int, type[WeightsEnum]] = {50: ResNet50_Weights, 101: ResNet101_Weights}


class ResNetBackbone(TorchvisionBackbone):
    """torchvision's ResNet-50/101 (bottleneck blocks, stride on the 3 x 3 convolution) without its average pooling
    and classifier. Taps layer2 (1/8), layer3 (1/16) and layer4 (1/32)."""

    taps = ("layer2", "layer3", "layer4")

    def __init__(self, depth: int = 50, *, alignment: Alignment = "aligned", width: float = 1.0) -> None:
        super().__init__()
        check_alignment(alignment)
        if depth not in _RESNET_BLOCKS:
            raise FcnsegError(f"ResNet depth must be one of {sorted(_RESNET_BLOCKS)}, got {depth}")
        self.alignment = alignment
        self.arch = f"ResNet-{depth}"
        self.weights_enum = _RESNET_ENUMS[depth]
        caffe = alignment == "caffe"
        stem = _ch(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=CAFFE_PAD if caffe else 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=caffe)
        c_in = stem
        for i, blocks in enumerate(_RESNET_BLOCKS[depth]):
            planes = _ch(64 * 2**i, width)
            c_out = planes * Bottleneck.expansion
            stride = 1 if i == 0 else 2
            shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            layer = [Bottleneck(c_in, planes, stride, shortcut)]
            layer += [Bottleneck(c_out, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            c_in = c_out
        self.channels = {f"layer{i}": self.get_submodule(f"layer{i}")[-1].conv3.out_channels for i in (2, 3, 4)}
        _he_init(self)

    def coord_maps(self) -> dict[str, CoordMap]:
        m4 = chain([self.conv1, self.bn1, self.relu, self.maxpool, self.layer1])
        m8 = chain(self.layer2, m4)
        m16 = chain(self.layer3, m8)
        return {"layer2": m8, "layer3": m16, "layer4": chain(self.layer4, m16)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # 1/4
        x = self.layer1(x)  # 1/4
        layer2 = self.layer2(x)  # 1/8
        layer3 = self.layer3(layer2)  # 1/16
        layer4 = self.layer4(layer3)  # 1/32
        return {"layer2": layer2, "layer3": layer3, "layer4": layer4}

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "layer4.0.conv1.weight" not in state_dict:
            raise FcnsegError(f"not a torchvision {self.arch} state dict: no 'layer4.0.conv1.weight'")
        return {k: v.clone() for k, v in state_dict.items() if not k.startswith("fc.")}


# ------------------------------------------------------------------------------------------- MobileNetV3-Large

# input, kernel, expanded, output, squeeze-excitation, activation, stride (Howard et al. 2019, Table 1).
_MOBILENET_V3_LARGE = [
    (16, 3, 16, 16, False, "RE", 1),
    (16, 3, 64, 24, False, "RE", 2),  # 1/4
    (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2),  # 1/8
    (40, 5, 120, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2),  # 1/16
    (80, 3, 200, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 480, 112, True, "HS", 1),
    (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2),  # 1/32
    (160, 5, 960, 160, True, "HS", 1),
    (160, 5, 960, 160, True, "HS", 1),
]


class MobileNetV3LargeBackbone(TorchvisionBackbone):
    """torchvision's MobileNetV3-Large features (inverted residual blocks, squeeze-excitation, hard-swish).

    Taps features6 (1/8, the last 40-channel block), features12 (1/16, the last 112-channel block) and features16
    (1/32, the final 1 x 1 convolution). The classifier is dropped whole: its first linear layer (960 -> 1280)
    acts on the globally pooled vector, so a 1 x 1 convolution before the pooling would not compute it.
    """

    arch = "MobileNetV3-Large"
    weights_enum = MobileNet_V3_Large_Weights
    taps = ("features6", "features12", "features16")
    _ends = {"features6": 7, "features12": 13, "features16": 17}

    def __init__(self, *, alignment: Alignment = "aligned", width: float = 1.0) -> None:
        super().__init__()
        check_alignment(alignment)
        self.alignment = alignment
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)  # torchvision's settings for these weights
        cfgs = [InvertedResidualConfig(*row, dilation=1, width_mult=width) for row in _MOBILENET_V3_LARGE]
        c_first, c_last = cfgs[0].input_channels, cfgs[-1].out_channels
        stem = Conv2dNormActivation(3, c_first, 3, stride=2, norm_layer=norm, activation_layer=nn.Hardswish)
        if alignment == "caffe":
            stem[0].padding = (CAFFE_PAD, CAFFE_PAD)
        last = Conv2dNormActivation(c_last, 6 * c_last, 1, norm_layer=norm, activation_layer=nn.Hardswish)
        # Same indices as torchvision's mobilenet_v3_large().features, so its state dict keys load unchanged.
        self.features = nn.Sequential(stem, *(InvertedResidual(cfg, norm) for cfg in cfgs), last)
        self.channels = {
            "features6": cfgs[5].out_channels,
            "features12": cfgs[11].out_channels,
            "features16": 6 * c_last,
        }
        _he_init(self)

    def coord_maps(self) -> dict[str, CoordMap]:
        maps, cmap, start = {}, CoordMap(), 0
        for tap in self.taps:
            cmap = chain(self.features[start : self._ends[tap]], cmap)
            maps[tap], start = cmap, self._ends[tap]
        return maps

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for tap in self.taps:  # 1/8, 1/16, 1/32
            x = self.features[start : self._ends[tap]](x)
            out[tap], start = x, self._ends[tap]
        return out

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "features.16.0.weight" not in state_dict:
            raise FcnsegError("not a torchvision MobileNetV3-Large state dict: no 'features.16.0.weight'")
        return {k: v.clone() for k, v in state_dict.items() if not k.startswith("classifier.")}


# ---------------------------------------------------------------------------------------------------- weights


def load_torchvision_weights(backbone: TorchvisionBackbone, weights: str | os.PathLike | WeightsEnum) -> None:
    """Fill ``backbone`` with torchvision ImageNet weights and record the input they expect in
    ``backbone.preprocessing``.

    ``weights``: a member of the backbone's torchvision weights enum or its name (``"IMAGENET1K_V1"``,
    ``"DEFAULT"``, ...; the input is read off the entry's transforms), or a local file holding the torchvision
    classifier's state dict (taken to expect ImageNet RGB mean/std, like torchvision's published weights).
    """
    enum_cls = backbone.weights_enum
    label = str(weights)
    if isinstance(weights, enum_cls) or label in enum_cls.__members__:
        enum = weights if isinstance(weights, enum_cls) else enum_cls[label]
        sd, preprocessing = _enum_state_dict(enum, backbone.arch), preprocessing_of(enum)
    elif isinstance(weights, WeightsEnum):
        raise FcnsegError(f"backbone weights {label} are not {backbone.arch} weights ({enum_cls.__name__})")
    elif os.path.exists(label):
        sd, preprocessing = _read_state_dict(label, backbone.arch), IMAGENET
    else:
        choices = ", ".join(enum_cls.__members__)
        raise FcnsegError(f"backbone weights {label!r}: expected a file or one of {choices} ({backbone.arch})")
    sd = backbone.convert_state_dict(sd)
    own = backbone.state_dict()
    mismatched = [k for k, v in sd.items() if k not in own or own[k].shape != v.shape]
    missing = sorted(set(own) - set(sd))
    if mismatched or missing:
        key = mismatched[0] if mismatched else f"{missing[0]} (missing)"
        raise FcnsegError(f"backbone weights {label!r} do not fit this {backbone.arch} (width/fc_dim differ): {key}")
    backbone.load_state_dict(sd)
    backbone.preprocessing = backbone.input_of(preprocessing)
