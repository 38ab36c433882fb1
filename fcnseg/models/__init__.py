"""Models: backbones, the parametric FCN, upsampling and the registry."""

from .backbones import VGG16Backbone, convolutionalise_vgg16
from .fcn import FCN, fcn8s, fcn8s_atonce, fcn16s, fcn32s
from .registry import get_model, list_models, register_model
from .upsampling import BilinearUpsample, bilinear_kernel

__all__ = [
    "FCN",
    "BilinearUpsample",
    "VGG16Backbone",
    "bilinear_kernel",
    "convolutionalise_vgg16",
    "fcn8s",
    "fcn8s_atonce",
    "fcn16s",
    "fcn32s",
    "get_model",
    "list_models",
    "register_model",
]
