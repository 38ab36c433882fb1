"""Models: backbones, the parametric FCN, upsampling and the registry."""

from typing import Any

from .backbones import VGG16Backbone, convolutionalise_vgg16
from .builders import (  # importing the builders registers them
    fcn8s,
    fcn8s_atonce,
    fcn8s_googlenet,
    fcn8s_mobilenet_v3_large,
    fcn8s_resnet50,
    fcn8s_resnet101,
    fcn16s,
    fcn16s_rgb_hha,
    fcn16s_twohead,
    fcn32s,
    fcn32s_alexnet,
    fcn32s_googlenet,
    fcn32s_rgb_hha,
)
from .fcn import FCN, ScoreHead
from .multi import LateFusionFCN, TwoHeadFCN, split_heads
from .registry import get_model, list_models, register_model
from .upsampling import BilinearUpsample, bilinear_kernel

# Resolved on first use (PEP 562): backbones_tv is built on torchvision's blocks, and importing torchvision takes over
# a second that a command using VGG16 alone need not spend.
_TORCHVISION_NAMES = {
    "AlexNetBackbone",
    "GoogLeNetBackbone",
    "MobileNetV3LargeBackbone",
    "ResNetBackbone",
    "convolutionalise_alexnet",
    "load_torchvision_weights",
}


def __getattr__(name: str) -> Any:
    if name in _TORCHVISION_NAMES:
        from . import backbones_tv

        return getattr(backbones_tv, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FCN",
    "LateFusionFCN",
    "ScoreHead",
    "TwoHeadFCN",
    "AlexNetBackbone",
    "BilinearUpsample",
    "GoogLeNetBackbone",
    "MobileNetV3LargeBackbone",
    "ResNetBackbone",
    "VGG16Backbone",
    "bilinear_kernel",
    "convolutionalise_alexnet",
    "convolutionalise_vgg16",
    "fcn8s",
    "fcn8s_atonce",
    "fcn8s_googlenet",
    "fcn8s_mobilenet_v3_large",
    "fcn8s_resnet50",
    "fcn8s_resnet101",
    "fcn16s",
    "fcn16s_rgb_hha",
    "fcn16s_twohead",
    "fcn32s",
    "fcn32s_rgb_hha",
    "fcn32s_alexnet",
    "fcn32s_googlenet",
    "get_model",
    "list_models",
    "load_torchvision_weights",
    "register_model",
    "split_heads",
]
