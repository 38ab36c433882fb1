"""The registered model builders, each a thin keyword-only function over one creation helper, :func:`_create_fcn`.

``_create_fcn`` checks the options, makes the backbone, loads its ImageNet weights, puts the score heads on it
(:class:`~fcnseg.models.fcn.FCN`) and widens the first layer for extra input channels (the paper's RGBD early
fusion). The builders fix what makes each network of the paper: the backbone (VGG16 as released; AlexNet,
GoogLeNet, ResNet-50/101 and MobileNetV3-Large from torchvision), the skip taps (FCN-32s, -16s, -8s) and, for
FCN-8s at once and FCN-AlexNet, the release's skip scales and upsampling kernel. The late-fusion RGB-HHA nets run
one FCN per input stream (:class:`~fcnseg.models.multi.LateFusionFCN`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import FcnsegError
from .backbones import Backbone, VGG16Backbone, check_alignment, load_vgg16_imagenet, widen_first_conv
from .fcn import FCN
from .multi import LateFusionFCN, TwoHeadFCN
from .registry import register_model


def _torchvision_backbone(class_name: str, *args: Any) -> Callable[..., Backbone]:
    """A maker of :mod:`.backbones_tv`'s ``class_name``: that module, built on torchvision's blocks, is imported at
    the first such build, so that commands using VGG16 alone never import torchvision (over a second)."""

    def make(**options: Any) -> Backbone:
        from . import backbones_tv

        return getattr(backbones_tv, class_name)(*args, **options)

    return make


# The backbones the builders name, each called with ``alignment``, ``width`` and the fc6/fc7 options it has.
BACKBONES: dict[str, Callable[..., Backbone]] = {
    "vgg16": VGG16Backbone,
    "alexnet": _torchvision_backbone("AlexNetBackbone"),
    "googlenet": _torchvision_backbone("GoogLeNetBackbone"),
    "resnet50": _torchvision_backbone("ResNetBackbone", 50),
    "resnet101": _torchvision_backbone("ResNetBackbone", 101),
    "mobilenet_v3_large": _torchvision_backbone("MobileNetV3LargeBackbone"),
}


def _create_fcn(
    backbone: str | Callable[..., Backbone],
    *,
    skips: Sequence[str],
    num_classes: int | Mapping[str, int],
    alignment: str,
    width: float,
    learnable_upsampling: bool,
    backbone_weights: str | None,
    in_channels: int = 3,
    fc_dim: int | None = None,
    dropout: float | None = None,
    batch_norm: bool | None = None,
    skip_scales: Mapping[str, float] | None = None,
    upsample_kernels: Mapping[str, int] | None = None,
) -> FCN:
    """An FCN with these ``skips`` on ``backbone`` (a name of :data:`BACKBONES` or a callable taking
    ``alignment``, ``width`` and the fc6/fc7 options given): options checked, backbone made, ImageNet weights
    loaded, heads added, first layer widened to ``in_channels``.

    ``num_classes``: one head's count, or ``{head: count}`` for several. ``fc_dim``, ``dropout`` (fc6/fc7's) and
    ``batch_norm`` (VGG16's) reach the backbone only when given: networks without them never see them.
    """
    _check_common(alignment, width, in_channels)
    _check_fully_connected(fc_dim, dropout)
    if isinstance(backbone, str) and backbone not in BACKBONES:
        raise FcnsegError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    make = BACKBONES[backbone] if isinstance(backbone, str) else backbone
    options = {"fc_dim": fc_dim, "batch_norm": batch_norm, "dropout": dropout}
    net = make(alignment=alignment, width=width, **{k: v for k, v in options.items() if v is not None})
    if backbone_weights is not None:
        _load_imagenet(net, backbone_weights)
    model = FCN(
        net,
        num_classes,
        skips=skips,
        skip_scales=skip_scales,
        learnable_upsampling=learnable_upsampling,
        upsample_kernels=upsample_kernels,
    )
    return with_input_channels(model, in_channels)


def _load_imagenet(backbone: Backbone, weights: str) -> None:
    """VGG16's loader knows the Caffe VGG16 too; every other backbone reads torchvision's weights."""
    if isinstance(backbone, VGG16Backbone):
        load_vgg16_imagenet(backbone, weights)
        return
    from .backbones_tv import TorchvisionBackbone, load_torchvision_weights  # built on it: imported already

    if isinstance(backbone, TorchvisionBackbone):
        load_torchvision_weights(backbone, weights)
    else:
        raise FcnsegError(f"no ImageNet weights for a {type(backbone).__name__}")


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


def _check_fully_connected(fc_dim: int | None, dropout: float | None) -> None:
    """fc6/fc7's options, for the networks that keep them (VGG16, AlexNet); None where a network has none."""
    if dropout is not None and not 0 <= dropout < 1:
        raise FcnsegError(f"dropout must be in [0, 1), got {dropout}")
    if fc_dim is not None and fc_dim < 1:
        raise FcnsegError(f"fc_dim must be >= 1, got fc_dim={fc_dim}")


# ---------------------------------------------------------------------------------------------------- VGG16


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
    return _create_fcn(
        "vgg16",
        skips=(),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        batch_norm=batch_norm,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "vgg16",
        skips=("pool4",),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        batch_norm=batch_norm,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "vgg16",
        skips=("pool4", "pool3"),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        batch_norm=batch_norm,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "vgg16",
        skips=("pool4", "pool3"),
        skip_scales={"pool4": 0.01, "pool3": 1e-4},  # the release's voc-fcn8s-atonce Scale layers
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        batch_norm=batch_norm,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


# ------------------------------------------------------------------------------ other torchvision backbones


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
    return _create_fcn(
        "alexnet",
        skips=(),
        # 63, not 64: AlexNet's fc7 cells sit on whole input pixels, and only an odd kernel keeps them there.
        upsample_kernels={"out": 63},
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "googlenet",
        skips=(),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "googlenet",
        skips=("inception4e", "inception3b"),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "resnet50",
        skips=("layer3", "layer2"),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "resnet101",
        skips=("layer3", "layer2"),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _create_fcn(
        "mobilenet_v3_large",
        skips=("features12", "features6"),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


# ------------------------------------------------------------------------- several heads, several inputs


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
    return _create_fcn(
        "vgg16",
        skips=("pool4",),
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


def _rgb_hha(
    skips: tuple[str, ...],
    *,
    num_classes: int,
    alignment: str,
    width: float,
    fc_dim: int,
    batch_norm: bool,
    dropout: float,
    learnable_upsampling: bool,
    backbone_weights: str | None,
    in_channels: int,
) -> LateFusionFCN:
    """Two VGG16 FCNs with these ``skips``, one on colour and one on HHA, built alike."""
    if in_channels != 6:
        raise FcnsegError("in_channels: a colour + HHA late-fusion net takes 6 channels (RGB, then HHA)")
    _check_common(alignment, width)
    _check_fully_connected(fc_dim, dropout)

    def stream() -> FCN:
        # The HHA stream starts from the same (ImageNet) weights as the colour one: HHA is read as a 3-channel image.
        return _create_fcn(
            "vgg16",
            skips=skips,
            num_classes=num_classes,
            alignment=alignment,
            width=width,
            fc_dim=fc_dim,
            batch_norm=batch_norm,
            dropout=dropout,
            learnable_upsampling=learnable_upsampling,
            backbone_weights=backbone_weights,
        )

    return LateFusionFCN({"rgb": stream(), "hha": stream()})


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
    return _rgb_hha(
        (),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        batch_norm=batch_norm,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )


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
    return _rgb_hha(
        ("pool4",),
        num_classes=num_classes,
        alignment=alignment,
        width=width,
        fc_dim=fc_dim,
        batch_norm=batch_norm,
        dropout=dropout,
        learnable_upsampling=learnable_upsampling,
        backbone_weights=backbone_weights,
        in_channels=in_channels,
    )
