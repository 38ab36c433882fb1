"""Weight conversion: pure functions from other implementations' layouts to fcnseg checkpoints.

The Caffe release and torchfcn name parameters after the Caffe layers (``conv1_1`` ... ``fc7``, ``score_fr``,
``score_pool4``, ``upscore2``, ...). :func:`caffe_layer_names` derives the fcnseg module behind each such name from
the model's own structure; both importers go through it, and every tensor is checked by shape before a checkpoint
dict comes out. The converted models are in ``caffe`` alignment (conv1_1 padded by 100, the release's crops) and
expect the release's input: BGR, 0-255, minus the mean, no std scaling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .._meta import VOC_CLASSES
from ..checkpoint import checkpoint_dict
from ..errors import FcnsegError
from ..preprocessing import CAFFE, Preprocessing
from .adapt import caffe_layer_names
from .fcn import FCN
from .registry import get_model

# torchfcn class name -> fcnseg model. FCN8s and FCN8sAtOnce have the same parameters; only the forward differs
# (pool4 x 0.01, pool3 x 1e-4), so a bare state dict cannot tell them apart.
TORCHFCN_ARCHS = {"FCN32s": "fcn32s", "FCN16s": "fcn16s", "FCN8s": "fcn8s", "FCN8sAtOnce": "fcn8s_atonce"}

# Caffe layer types that carry no weights and compute what the fcnseg forward computes.
_STRUCTURAL = {
    "Input", "Data", "Python", "ImageData", "MemoryData", "DummyData", "HDF5Data", "ReLU", "Dropout", "Pooling",
    "Crop", "Eltwise", "Softmax", "SoftmaxWithLoss", "Accuracy", "Silence", "Split",
}  # fmt: skip
_WEIGHTED = {"Convolution", "Deconvolution", "InnerProduct"}


class CaffeLayerLike(Protocol):
    name: str
    type: str
    blobs: list[np.ndarray]
    bottoms: list[str]


def _meta_model(name: str, num_classes: int, conv1_channels: int, fc_dim: int, **extra: Any) -> nn.Module:
    """The fcnseg model the weights describe, in caffe alignment; width and fc_dim are read off the weights
    (conv1_1's outputs / 64, fc6's outputs), so reduced-width networks convert too."""
    # Shapes only: building the full VGG16 on the meta device takes no memory and no initialisation time.
    with torch.device("meta"):
        return get_model(
            name, num_classes=num_classes, alignment="caffe", width=conv1_channels / 64, fc_dim=fc_dim, **extra
        )


def _checkpoint(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    classes: Sequence[str] | None,
    preprocessing: Preprocessing,
    source: str,
) -> dict[str, Any]:
    if classes is None and model.num_classes == len(VOC_CLASSES):
        classes = VOC_CLASSES
    return checkpoint_dict(
        model, classes=classes, preprocessing=preprocessing, state_dict=state, extra={"converted_from": source}
    )


# --------------------------------------------------------------------------------------------------- torchfcn


def torchfcn_to_fcnseg(
    state_dict: Mapping[str, Any],
    *,
    model: str | None = None,
    classes: Sequence[str] | None = None,
    preprocessing: Preprocessing = CAFFE,
    source: str = "torchfcn",
) -> dict[str, Any]:
    """A torchfcn FCN32s / FCN16s / FCN8s / FCN8sAtOnce state dict -> an fcnseg checkpoint dict (caffe alignment).

    Also takes torchfcn's training checkpoints (``{"model_state_dict": ..., "arch": "FCN8s", ...}``), whose
    ``arch`` names the model. ``model`` (``"fcn8s"``, ``"fcn8s_atonce"``, ...) is needed for a bare FCN-8s state
    dict: FCN8s and FCN8sAtOnce have the same parameters and differ only in their forward.
    """
    model, tensors = _torchfcn_tensors(state_dict, model, source)
    shape = {k: tensors[f"{k}.weight"].shape[0] for k in ("score_fr", "conv1_1", "fc6") if f"{k}.weight" in tensors}
    if len(shape) < 3:
        raise FcnsegError(f"{source}: not a torchfcn VGG16 FCN state dict (no conv1_1 or fc6 weights)")
    target = _meta_model(model, shape["score_fr"], shape["conv1_1"], shape["fc6"])
    names = caffe_layer_names(target)
    own = target.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        layer, _, kind = key.rpartition(".")
        ours = f"{names.get(layer)}.{kind}"
        if ours not in own:
            raise FcnsegError(f"{source}: parameter {key!r} has no counterpart in fcnseg {model}")
        if value.shape != own[ours].shape:
            raise FcnsegError(
                f"{source}: parameter {key!r} has shape {tuple(value.shape)}, fcnseg expects {tuple(own[ours].shape)}"
            )
        state[ours] = value.detach().to(torch.float32).clone()
    by_module = {v: k for k, v in names.items()}
    missing = sorted(f"{by_module[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}" for k in set(own) - set(state))
    if missing:
        raise FcnsegError(f"{source}: missing torchfcn parameter(s) {', '.join(missing)}")
    return _checkpoint(target, state, classes, preprocessing, source)


def _torchfcn_tensors(
    state_dict: Mapping[str, Any], model: str | None, source: str
) -> tuple[str, dict[str, torch.Tensor]]:
    """The fcnseg model a torchfcn state dict (or Trainer checkpoint) holds, and its tensors."""
    if "model_state_dict" in state_dict:  # torchfcn's Trainer checkpoint
        arch = state_dict.get("arch")
        if model is None and arch in TORCHFCN_ARCHS:
            model = TORCHFCN_ARCHS[arch]
        state_dict = state_dict["model_state_dict"]
        if not isinstance(state_dict, Mapping):
            raise FcnsegError(f"{source}: 'model_state_dict' is a {type(state_dict).__name__}, not a state dict")
    tensors = {k: v for k, v in state_dict.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    layers = {k.rsplit(".", 1)[0] for k in tensors}
    if "score_fr" not in layers:
        raise FcnsegError(f"{source}: not a torchfcn FCN state dict (no 'score_fr.weight')")
    found = "fcn8s" if "score_pool3" in layers else "fcn16s" if "score_pool4" in layers else "fcn32s"
    if model is None:
        if found == "fcn8s":
            raise FcnsegError(
                f"{source}: torchfcn FCN8s and FCN8sAtOnce share their parameters; "
                "say which with --model fcn8s or --model fcn8s_atonce"
            )
        model = found
    if {"fcn8s_atonce": "fcn8s"}.get(model, model) != found:
        raise FcnsegError(f"{source}: holds a torchfcn {found} (by its layers), not the requested {model}")
    return model, tensors


# ------------------------------------------------------------------------------------------------------ Caffe


def _detect_caffe_model(layers: Sequence[CaffeLayerLike]) -> str:
    names = {layer.name for layer in layers}
    if "score_fr_sem" in names:  # siftflow-fcn16s: a semantic and a geometric head
        return "fcn16s_twohead"
    if "score_frcolor" in names:  # nyud-fcn32s-color-hha: colour and HHA streams
        return "fcn16s_rgb_hha" if "score_pool4color" in names else "fcn32s_rgb_hha"
    if "score_pool3" in names:
        return "fcn8s_atonce" if any(layer.type == "Scale" for layer in layers) else "fcn8s"
    return "fcn16s" if "score_pool4" in names else "fcn32s"


def _key_outputs(weighted: Sequence[CaffeLayerLike], source: str) -> dict[str, int]:
    """Output channels of score_fr (the classes), conv1_1 and fc6 (the widths)."""
    outputs = {}
    for name in ("score_fr", "conv1_1", "fc6"):
        # The first of that name, or of that name with a head's or a stream's suffix (score_fr_sem, conv1_1color).
        layer = next((x for x in weighted if x.name == name and x.blobs), None) or next(
            (x for x in weighted if x.name.startswith(name) and x.blobs), None
        )
        if layer is None:
            raise FcnsegError(f"{source}: no weighted layer {name!r}: not a VGG16 FCN caffemodel")
        outputs[name] = _outputs(layer)
    return outputs


def caffe_signature(layers: Sequence[CaffeLayerLike], source: str = "caffemodel") -> tuple[str, int]:
    """The fcnseg model a VGG16 FCN ``.caffemodel``'s layers describe, and its number of classes (first head)."""
    weighted = [layer for layer in layers if layer.type in _WEIGHTED]
    return _detect_caffe_model(layers), _key_outputs(weighted, source)["score_fr"]


def _outputs(layer: CaffeLayerLike) -> int:
    """Output channels of a Convolution / InnerProduct layer (legacy blobs: 1 x 1 x out x in for InnerProduct)."""
    shape = tuple(layer.blobs[0].shape)
    if layer.type == "InnerProduct" and len(shape) == 4:
        return int(shape[2])
    return int(shape[0])


def _fit_blob(blob: np.ndarray, shape: torch.Size, layer: CaffeLayerLike, what: str, source: str) -> torch.Tensor:
    """A Caffe blob as a tensor of ``shape``: legacy 4-D blobs carry leading 1s (a bias as 1 x 1 x 1 x N), and an
    InnerProduct layer's matrix is a convolution kernel with the same numbers (convolutionalisation)."""
    squeezed = tuple(blob.shape)
    while len(squeezed) > len(shape) and squeezed[0] == 1:
        squeezed = squeezed[1:]
    fits = squeezed == tuple(shape) or (layer.type == "InnerProduct" and blob.size == shape.numel())
    if not fits:
        raise FcnsegError(
            f"{source}: layer {layer.name!r} ({layer.type}) {what} has shape {tuple(blob.shape)}, "
            f"fcnseg expects {tuple(shape)}"
        )
    return torch.from_numpy(np.ascontiguousarray(blob, dtype=np.float32).reshape(tuple(shape)).copy())


def _caffe_scales(layers: Sequence[CaffeLayerLike], source: str) -> dict[str, np.ndarray]:
    """Scale layers (FCN-8s at once: pool4 x 0.01, pool3 x 1e-4): the blob they scale -> per-channel factor.

    Caffe's net saves the Split layers it inserts where a blob feeds several layers (pool4 feeds conv5_1 and
    scale_pool4), so a Scale's bottom may be a split output such as ``pool4_pool4_0_split_1``: followed back to
    ``pool4``.
    """
    split_source = {
        top: layer.bottoms[0] for layer in layers if layer.type == "Split" and layer.bottoms for top in layer.tops
    }
    scales = {}
    for layer in layers:
        if layer.type != "Scale":
            continue
        if len(layer.blobs) != 1:
            raise FcnsegError(f"{source}: Scale layer {layer.name!r} has a bias or no factor; expected one blob")
        tap = layer.bottoms[0] if layer.bottoms else layer.name.removeprefix("scale_")
        while tap in split_source:
            tap = split_source[tap]
        scales[tap] = np.asarray(layer.blobs[0], np.float64).reshape(-1)
    return scales


def caffe_to_fcnseg(
    layers: Sequence[CaffeLayerLike],
    *,
    model: str | None = None,
    classes: Sequence[str] | None = None,
    preprocessing: Preprocessing = CAFFE,
    source: str = "caffemodel",
    head_classes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Layers of a VGG16 FCN ``.caffemodel`` (see :func:`fcnseg.models.caffe_proto.read_caffemodel`) -> an fcnseg
    checkpoint dict (caffe alignment). The variant is found from the layer names unless ``model`` is given: the
    VOC nets, the two-headed SIFT Flow net (``*_sem`` / ``*_geo`` layers) and the NYUDv2 colour-HHA late fusion
    (``*color`` / ``*hha`` layers, their scores averaged by Eltwise coefficients, folded in). ``head_classes``
    names a two-headed net's classes per head.

    Layers of a type fcnseg does not compute, weighted layers without an fcnseg counterpart, missing layers and
    blobs of the wrong shape are refused, naming the layer.
    """
    for layer in layers:
        if layer.type not in _STRUCTURAL | _WEIGHTED | {"Scale"}:
            raise FcnsegError(f"{source}: layer {layer.name!r} has type {layer.type!r}, which fcnseg cannot import")
    weighted = [layer for layer in layers if layer.type in _WEIGHTED]
    outputs = _key_outputs(weighted, source)
    model = model or _detect_caffe_model(layers)
    extra = {}
    geo = next((x for x in weighted if x.name == "score_fr_geo" and x.blobs), None)
    if model == "fcn16s_twohead" and geo is not None:
        extra["second_classes"] = _outputs(geo)
    target = _meta_model(model, outputs["score_fr"], outputs["conv1_1"], outputs["fc6"], **extra)
    names = caffe_layer_names(target)
    own = target.state_dict()
    state = _caffe_state(weighted, names, own, source=source, model=model)
    _tie_shared_upsamplers(state, own)
    missing = sorted({k.rsplit(".", 1)[0] for k in set(own) - set(state)})
    if missing:
        by_module = {v: k for k, v in names.items()}
        raise FcnsegError(f"{source}: no weights for layer(s) {', '.join(by_module.get(m, m) for m in missing)}")
    _fold_scales(target, state, _caffe_scales(layers, source), source)
    _fold_coefficients(layers, names, state, source)
    if head_classes:
        target.head_classes = {k: list(v) for k, v in head_classes.items()}
    # A colour input given for a net of more channels (late fusion) is widened, never recorded short.
    preprocessing = preprocessing.for_channels(target.preprocessing.channels)
    return _checkpoint(target, state, classes, preprocessing, source)


def _caffe_state(
    weighted: Sequence[CaffeLayerLike],
    names: Mapping[str, str],
    own: Mapping[str, torch.Tensor],
    *,
    source: str,
    model: str,
) -> dict[str, torch.Tensor]:
    """Each weighted layer's blobs at its fcnseg name, fitted to the shapes in ``own`` (model ``model``)."""
    state: dict[str, torch.Tensor] = {}
    for layer in weighted:
        if layer.name not in names:
            raise FcnsegError(f"{source}: layer {layer.name!r} ({layer.type}) has no counterpart in fcnseg {model}")
        prefix = names[layer.name]
        kinds = ["weight", "bias"][: len(layer.blobs)]
        if len(layer.blobs) > 2 or any(f"{prefix}.{k}" not in own for k in kinds):
            raise FcnsegError(
                f"{source}: layer {layer.name!r} has {len(layer.blobs)} blobs; fcnseg {model} expects "
                f"{sum(f'{prefix}.{k}' in own for k in ('weight', 'bias'))}"
            )
        for kind, blob in zip(kinds, layer.blobs, strict=False):
            state[f"{prefix}.{kind}"] = _fit_blob(blob, own[f"{prefix}.{kind}"].shape, layer, kind, source)
    return state


def _tie_shared_upsamplers(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> None:
    """The release's late fusion upsamples the summed scores once; fcnseg upsamples each stream's (the same linear
    map, so the sum is the same): every stream's upsampler gets the first stream's kernel."""
    for key in own:
        if key.startswith("streams.") and ".upsample_" in key and key not in state:
            first = next((k for k in state if k.split(".", 2)[2] == key.split(".", 2)[2]), None)
            if first is not None:
                state[key] = state[first].clone()


def _fold_coefficients(
    layers: Sequence[CaffeLayerLike], names: Mapping[str, str], state: dict[str, torch.Tensor], source: str
) -> None:
    """Eltwise coefficients on summed score layers (the release's colour-HHA net averages its streams' scores:
    coeff 0.5, 0.5) folded into those layers' weights and biases: c * (W x + b) = (c W) x + c b, exact. Any other
    weighted sum is refused."""
    by_top = {top: x.name for x in layers if x.type in _WEIGHTED for top in (x.tops or [x.name])}
    for layer in layers:
        coeff = list(getattr(layer, "coeff", None) or [])
        if layer.type != "Eltwise" or not coeff or all(c == 1.0 for c in coeff):
            continue
        for bottom, c in zip(layer.bottoms, coeff, strict=False):
            ours = names.get(by_top.get(bottom, bottom), "")
            if not ours.endswith("score_fr"):
                raise FcnsegError(f"{source}: Eltwise layer {layer.name!r} weighs {bottom!r} by {c}; fcnseg can fold "
                                  "coefficients on score layers only")  # fmt: skip
            for kind in ("weight", "bias"):
                state[f"{ours}.{kind}"] = state[f"{ours}.{kind}"] * c


def _fold_scales(model: nn.Module, state: dict[str, torch.Tensor], scales: dict[str, np.ndarray], source: str) -> None:
    """score(s * x) = (W diag(s / s0)) (s0 * x): the Caffe net's factor s on a tap (1 where it has no Scale layer)
    becomes the model's fixed factor s0 with the rest folded into the score layer's input columns, which is exact.
    So an FCN-8s-at-once file imported as staged FCN-8s, or the reverse, still computes what the file computes."""
    # FCN-8s at once scales its skips; a late-fusion net's streams have no Scale layers to fold.
    skip_scales = model.head.skip_scales if isinstance(model, FCN) else {}
    unknown = sorted(set(scales) - set(skip_scales))
    if unknown:
        raise FcnsegError(f"{source}: Scale layer on {unknown[0]!r}, which fcnseg {model.build_config['name']} lacks")
    for tap, s0 in skip_scales.items():
        key = f"score_heads.{next(iter(model.heads))}.score_skip.{tap}.weight"  # the one head of an FCN-8s
        w = state[key]
        s = scales.get(tap, np.ones(1))
        if s.size not in (1, w.shape[1]):
            raise FcnsegError(f"{source}: Scale on {tap!r} has {s.size} factors, expected 1 or {w.shape[1]}")
        ratio = s / s0
        if np.allclose(ratio, 1.0, rtol=1e-6, atol=0):
            continue  # the released factors, stored in float32: nothing to fold
        ratio_t = torch.as_tensor(np.broadcast_to(ratio, (w.shape[1],)).copy(), dtype=torch.float64)
        state[key] = (w.double() * ratio_t.view(1, -1, 1, 1)).float()
