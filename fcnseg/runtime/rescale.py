"""int8's even channel ranges: the float first layer's output channels rescaled before the next layer is quantised.

The int8 paths keep the convolution fed the image in float and quantise the next one (conv1_2 in VGG16), whose
input, the first layer's output after its ReLU, gets one 8-bit scale for all its channels (per-tensor activation
quantisation, as ONNX Runtime and NNCF do it). A channel whose values stay far below the tensor's largest then gets
only a few of the 256 levels. ReLU and max pooling commute with a positive scale per channel, so dividing channel
c of the first layer's weights and bias by s_c and multiplying the next layer's input channel c by s_c leaves the
network's function unchanged (the cross-layer equalisation of Nagel et al., "Data-Free Quantization", ICCV 2019,
here with the scales taken from the calibration images' activation ranges rather than the weights'). With
s_c = range_c / largest range, every channel spans the whole 8-bit range.

It matters where the weights have 7 bits (CPUs without VNNI, :func:`~fcnseg.runtime.onnx.int8_source`): on the
trained demo model with conv1_2 quantised, OpenVINO held to AVX2 kept 99.75% of fp32's labels with it and 99.47%
without, ONNX Runtime 99.65% and 99.35% (8 calibration images).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import FcnsegError

MAX_GAIN = 16.0
"""The most a channel is amplified (s_c >= 1 / MAX_GAIN). A channel nearly silent on the calibration images would
otherwise be blown up to the full range and clipped on an image where it is not; its weights in the next layer,
shrunk by as much, would round to zero."""


class _AllSeenError(Exception):
    """Raised by the last hook: the rest of the forward pass is not needed."""


def channel_maxima(
    model: nn.Module, calibration: Sequence[torch.Tensor], prefixes: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The largest output of each channel of the convolutions ``prefixes`` (parameter-name prefixes, ending in a
    dot) over the ``calibration`` inputs, computed by ``model``'s own forward pass, stopped once they have all
    run."""
    modules = {p: model.get_submodule(p.rstrip(".")) for p in prefixes}
    found: dict[str, torch.Tensor] = {}
    pending: set[str] = set()

    def hook(prefix: str):
        def record(_module: nn.Module, _inputs, out: torch.Tensor) -> None:
            m = out.detach().float().amax(dim=(0, 2, 3)).cpu()
            found[prefix] = torch.maximum(found[prefix], m) if prefix in found else m
            pending.discard(prefix)
            if not pending:
                raise _AllSeenError

        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in modules.items()]
    p = next(model.parameters())
    try:
        with torch.inference_mode():
            for x in calibration:
                pending.update(modules)
                with contextlib.suppress(_AllSeenError):
                    model(x.to(p.device, p.dtype))
    finally:
        for h in handles:
            h.remove()
    return found


def rescale_factors(maxima: torch.Tensor) -> torch.Tensor:
    """s_c = max(range_c / largest range, 1 / :data:`MAX_GAIN`), range_c the channel's largest output after its
    ReLU (a channel never positive has range 0)."""
    ranges = maxima.float().clamp_min(0)
    top = ranges.max()
    if top <= 0:
        return torch.ones_like(ranges)
    return (ranges / top).clamp_min(1 / MAX_GAIN)


def rescaled_onnx(
    source: str | os.PathLike, out: str | os.PathLike, factors: Mapping[tuple[str, str], np.ndarray]
) -> Path:
    """A copy of the ONNX file ``source`` at ``out`` where, for each pair (a, b) of parameter-name prefixes with
    factors s: ``a + "weight"`` (output channels first) and ``a + "bias"`` are divided by s along their output
    channels and ``b + "weight"`` multiplied by s along its input channels (axis 1). A bias the exporter left out
    (an all-zero one) stays zero either way."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(source))
    tensors = {t.name: t for t in proto.graph.initializer}
    for (a, b), s in factors.items():
        s = np.asarray(s, dtype=np.float64)
        edits = ((a + "weight", (-1, 1, 1, 1), 1 / s), (a + "bias", (-1,), 1 / s), (b + "weight", (1, -1, 1, 1), s))
        for name, shape, factor in edits:
            t = tensors.get(name)
            if t is None and name == a + "bias":
                continue
            if t is None:
                raise FcnsegError(f"{source} has no initializer {name}: cannot rescale its channels")
            value = numpy_helper.to_array(t).astype(np.float64) * factor.reshape(shape)
            t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    onnx.save(proto, str(out))
    return Path(out)
