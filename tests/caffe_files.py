"""Writing Caffe ``.caffemodel`` files, which only the tests do: they make the random networks that the importer,
the weights registry and the OpenCV oracle read. fcnseg itself only reads them (:mod:`fcnseg.models.caffe_proto`),
and this writer uses that module's schema, so what it writes is what the reader is declared to parse;
``tests/models/test_caffe_proto.py`` decodes its bytes by hand to pin them to Caffe's own field numbers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcnseg.errors import FcnsegError
from fcnseg.io import atomic_write
from fcnseg.models.caffe_proto import _RAW, _V1_LAYER_TYPES, CaffeLayer

# The V1LayerParameter.LayerType value of each modern type string that has one.
_V1_VALUE_OF_TYPE: dict[str, int] = {modern: value for value, (_, modern) in _V1_LAYER_TYPES.items()}


def write_caffemodel(
    path: str | os.PathLike, layers: Sequence[CaffeLayer], *, name: str = "", legacy: bool = False
) -> None:
    """Write ``layers`` as a binary ``NetParameter``, atomically (a failed write leaves ``path`` as it was).

    ``legacy=True`` writes V1 ``layers`` with the enum type and the 4-D legacy num/channels/height/width blob
    dimensions (left-padded with 1s, as old Caffe did); otherwise modern ``layer`` entries with a ``BlobShape``.
    Floats are written packed, as Caffe writes them. Raises :class:`FcnsegError` for a layer a V1 file cannot
    express (a type with no V1 enum value, a blob of more than 4 dimensions) and for a file that cannot be written.
    """
    path = Path(path)
    net = _RAW["NetParameter"]()
    if name:
        net.name = name
    for layer in layers:
        lp = _add_layer(net, layer, path, legacy)
        for j, blob in enumerate(layer.blobs):
            _add_blob(lp, np.asarray(blob, dtype="<f4"), f"{path}: layer {layer.name!r}: blob {j}", legacy)
    payload = net.SerializeToString()
    try:
        with atomic_write(path) as f:
            f.write(payload)
    except OSError as e:
        raise FcnsegError(f"{path}: cannot write: {e.strerror or e}") from None


def _add_layer(net: Any, layer: CaffeLayer, path: Path, legacy: bool) -> Any:
    """A V1 ``layers`` entry (the type as its enum value) or a modern ``layer`` entry, blobs not yet added."""
    if legacy:
        lp = net.layers.add()
        value = _V1_VALUE_OF_TYPE.get(layer.type)
        if value is None:
            raise FcnsegError(
                f"{path}: layer {layer.name!r}: type {layer.type!r} has no V1 LayerType, so a legacy file "
                "cannot express it (write it with legacy=False)"
            )
        lp.type = value
    else:
        lp = net.layer.add()
        lp.type = layer.type
    lp.name = layer.name
    lp.bottom.extend(layer.bottoms)
    lp.top.extend(layer.tops)
    if layer.coeff:
        lp.eltwise_param.coeff.extend(layer.coeff)
    return lp


def _add_blob(lp: Any, a: np.ndarray, where: str, legacy: bool) -> None:
    """``a`` (little-endian float32; asarray, not ascontiguousarray, which makes a 0-d blob 1-D) as a BlobProto."""
    bp = lp.blobs.add()
    if legacy:
        if a.ndim > 4:
            raise FcnsegError(
                f"{where} has shape {a.shape}, more than the 4 dimensions a legacy file can express (write it with "
                "legacy=False)"
            )
        bp.num, bp.channels, bp.height, bp.width = (1,) * (4 - a.ndim) + a.shape
    else:
        bp.shape.SetInParent()  # present even for a 0-d blob: an empty shape is a scalar in Caffe
        bp.shape.dim.extend(a.shape)
    if a.size:
        bp.data.append(a.tobytes(order="C"))  # one packed run: tag, length, then the little-endian floats
