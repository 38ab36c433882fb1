"""Weights adapted from one layout to another, in one place (as timm keeps its checkpoint filters): pure
functions over tensors and state dicts, or over a model's module names; nothing here builds a model or reads a file.

- :func:`convolutionalise` (and its VGG16 / AlexNet forms): a torchvision classifier's fully connected layers as
  the convolutions of an FCN backbone (fc6 -> k x k, fc7 -> 1 x 1), the paper's Section 3.1;
- :func:`widen_input_weight`: a colour first layer for more input channels (early fusion, RGBD);
- :func:`fit_state_dict`: a coarser net's or one stream's state dict fitted to another model's (staged training,
  32s -> 16s -> 8s, and late fusion started from a one-stream net);
- :func:`caffe_layer_names`: the Caffe release's (and torchfcn's) layer names -> fcnseg module paths, which the
  importers in :mod:`fcnseg.models.convert` follow;
- the checkpoint schema filter is :func:`fcnseg.checkpoint.upgrade_state_dict` (a file-format concern).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import FcnsegError

__all__ = [
    "CAFFE_HEAD_SUFFIX", "CAFFE_STREAM_SUFFIX", "caffe_layer_names", "convolutionalise", "convolutionalise_alexnet",
    "convolutionalise_vgg16", "fit_state_dict", "widen_input_weight",
]  # fmt: skip


# ------------------------------------------------------------------------------------- classifiers -> FCNs


def convolutionalise_vgg16(
    state_dict: Mapping[str, torch.Tensor], *, keep_fc8: bool = False
) -> dict[str, torch.Tensor]:
    """torchvision ``vgg16`` state dict -> :class:`VGG16Backbone` state dict (a pure function).

    The convolutional layers keep their keys; fc6 (4096 x 25088) becomes a 4096 x 512 x 7 x 7 kernel holding the
    same numbers (torchvision flattens pool5 in C, H, W order, the layout of a convolution kernel), fc7 a 1 x 1
    kernel. fc8 (the ImageNet classifier) is dropped unless ``keep_fc8``, when it comes back as ``fc8.weight`` /
    ``fc8.bias`` 1 x 1 kernels.
    """
    return convolutionalise(state_dict, "VGG16", {"fc6": "classifier.0", "fc7": "classifier.3"}, 7, keep_fc8)


def convolutionalise(
    state_dict: Mapping[str, torch.Tensor], arch: str, fc: Mapping[str, str], side: int, keep_fc8: bool
) -> dict[str, torch.Tensor]:
    """A torchvision classifier's state dict with its fully connected layers as convolutions (a pure function).

    ``fc`` maps fc6 / fc7 to their ``classifier.N`` modules; fc6 becomes a ``side`` x ``side`` kernel over the
    pooled map (torchvision flattens it in C, H, W order, a kernel's layout), fc7 and fc8 1 x 1 kernels. fc8 is
    ``classifier.6`` in both AlexNet and VGG16.
    """
    out = {k: v.clone() for k, v in state_dict.items() if k.startswith("features.")}
    if not out:
        raise FcnsegError(f"not a torchvision {arch} state dict: no 'features.*' keys")
    fc = {**fc, **({"fc8": "classifier.6"} if keep_fc8 else {})}
    for name, src in fc.items():
        try:
            w, b = state_dict[f"{src}.weight"], state_dict[f"{src}.bias"]
        except KeyError as e:
            raise FcnsegError(f"not a torchvision {arch} state dict: missing {e.args[0]!r}") from None
        if name == "fc6":
            c_in = w.shape[1] // side**2
            if c_in * side**2 != w.shape[1]:
                raise FcnsegError(f"fc6 weight of shape {tuple(w.shape)} is not over {side} x {side} maps")
            out["fc6.weight"] = w.reshape(w.shape[0], c_in, side, side).clone()
        else:
            out[f"{name}.weight"] = w.reshape(w.shape[0], w.shape[1], 1, 1).clone()
        out[f"{name}.bias"] = b.clone()
    return out


def convolutionalise_alexnet(
    state_dict: Mapping[str, torch.Tensor], *, keep_fc8: bool = False
) -> dict[str, torch.Tensor]:
    """torchvision ``alexnet`` state dict -> :class:`AlexNetBackbone` state dict (a pure function).

    fc6 (4096 x 9216, over the 256 x 6 x 6 pooled map flattened in C, H, W order) becomes a 4096 x 256 x 6 x 6
    kernel holding the same numbers, fc7 a 1 x 1 kernel; fc8 is dropped unless ``keep_fc8``.
    """
    return convolutionalise(state_dict, "AlexNet", {"fc6": "classifier.1", "fc7": "classifier.4"}, 6, keep_fc8)


# ---------------------------------------------------------------------------------------- input channels


def widen_input_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-layer weight (out x 3 x k x k, colour) for ``in_channels`` >= 3 inputs: the colour filters are kept
    as they are and each extra channel (depth, HHA) starts with the mean of the three colour filters.

    Early fusion (the paper's RGBD net) starts from a net trained on colour: with its colour filters untouched the
    widened net computes exactly what the colour net did wherever the extra channels are at their mean (0 after
    normalisation), and the extra channels start out seen as a grey colour pixel would be. A pure function.
    """
    if weight.dim() != 4 or weight.shape[1] != 3 or in_channels < 3:
        raise FcnsegError(f"cannot widen a first layer of shape {tuple(weight.shape)} to {in_channels} input channels")
    extra = weight.mean(dim=1, keepdim=True).expand(-1, in_channels - 3, -1, -1)
    return torch.cat([weight, extra], dim=1).contiguous()


def fit_state_dict(src: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``src`` renamed and reshaped to fit ``own`` (a model's state dict): a one-stream net's tensors go to every
    stream of a late-fusion net (``streams.<name>.``); a colour first layer is widened (:func:`widen_input_weight`)
    where ``own``'s takes more input channels. Tensors that still do not fit are the caller's to leave out."""
    src = dict(src)
    streams = sorted({k.split(".")[1] for k in own if k.startswith("streams.")})
    if streams and not any(k.startswith("streams.") for k in src):
        src = {f"streams.{s}.{k}": v for s in streams for k, v in src.items()}
    for k, v in list(src.items()):
        if k in own and v.dim() == 4 and v.shape[1] == 3 and own[k].shape[1] > 3 and v.shape[2:] == own[k].shape[2:]:
            src[k] = widen_input_weight(v, own[k].shape[1])
    return src


# ------------------------------------------------------------------------------------- Caffe layer names


# Suffixes the release gives the layers of a head or a stream: siftflow-fcn16s names its heads' layers
# ``score_fr_sem`` / ``score_fr_geo`` (and so on), nyud-fcn32s-color-hha its streams' ``conv1_1color`` /
# ``conv1_1hha``. Other head or stream names take ``_<head>`` / ``<stream>``.
CAFFE_HEAD_SUFFIX = {"semantic": "_sem", "geometric": "_geo"}
CAFFE_STREAM_SUFFIX = {"rgb": "color", "hha": "hha"}


def caffe_layer_names(model: nn.Module) -> dict[str, str]:
    """Caffe layer name -> fcnseg module path (``"conv3_2" -> "backbone.features.12"``) for a VGG16 FCN.

    Convolutions are numbered block by block, a block ending at each max pooling; the upsamplers are named as the
    release names them: ``upscore2`` first, ``upscore_<tap>`` after fusing a tap, and ``upscore`` (FCN-32s) or
    ``upscore<stride>`` for the last one. A two-headed net's head layers carry the head's suffix
    (:data:`CAFFE_HEAD_SUFFIX`), a late-fusion net's layers their stream's (:data:`CAFFE_STREAM_SUFFIX`), except the
    upsamplers, which the release shares between streams (it upsamples the fused scores): those name the first
    stream's, and the importer ties the others to them.
    """
    if hasattr(model, "streams"):  # late fusion: every stream's layers, suffixed
        names: dict[str, str] = {}
        for stream, fcn in model.streams.items():
            suffix = CAFFE_STREAM_SUFFIX.get(stream, stream)
            for caffe, ours in caffe_layer_names(fcn).items():
                shared = caffe.startswith("upscore")
                names.setdefault(caffe if shared else caffe + suffix, f"streams.{stream}.{ours}")
        return names
    names = _backbone_names(model.backbone)
    for name, head in model.score_heads.items():
        suffix = CAFFE_HEAD_SUFFIX.get(name, f"_{name}") if len(model.score_heads) > 1 else ""
        names.update({caffe + suffix: f"score_heads.{name}.{ours}" for caffe, ours in _head_names(head).items()})
    return names


def _backbone_names(backbone: nn.Module) -> dict[str, str]:
    # VGG16's layout: 13 convolutions in ``features`` (5 blocks), fc6 and fc7; no batch norm (the release has none).
    features = list(getattr(backbone, "features", []))
    convs = sum(isinstance(m, nn.Conv2d) for m in features)
    if convs != 13 or not hasattr(backbone, "fc7") or any(isinstance(m, nn.BatchNorm2d) for m in features):
        raise FcnsegError("Caffe layer names exist for the VGG16 FCNs without batch norm only")
    names: dict[str, str] = {}
    block, index = 1, 1
    for i, m in enumerate(backbone.features):
        if isinstance(m, nn.Conv2d):
            names[f"conv{block}_{index}"] = f"backbone.features.{i}"
            index += 1
        elif isinstance(m, nn.MaxPool2d):
            block, index = block + 1, 1
    names.update({"fc6": "backbone.fc6", "fc7": "backbone.fc7"})
    return names


def _head_names(head: nn.Module) -> dict[str, str]:
    names = {"score_fr": "score_fr"}
    previous = None
    for tap in head.skips:
        names[f"score_{tap}"] = f"score_skip.{tap}"
        names["upscore2" if previous is None else f"upscore_{previous}"] = f"upsample_skip.{tap}"
        previous = tap
    last = "upscore" if not head.skips else f"upscore{head.upsample_out.stride[0]}"
    names[last] = "upsample_out"
    return names
