"""Read Caffe ``.caffemodel`` files without Caffe.

A ``.caffemodel`` is a binary protobuf ``caffe.NetParameter``. Rather than depend on Caffe, ``protoc`` or a
generated ``caffe_pb2``, this module declares the few messages it needs itself, at import time, with the field
numbers of Caffe's ``caffe.proto``, and lets the ``google.protobuf`` runtime parse them. Every field left out of
the schema (``convolution_param``, ``param``, ``include``, ...) is skipped by the parser as an unknown field.

The schema lives in a private descriptor pool under the package ``fcnseg_caffe``, so it never clashes with a real
``caffe_pb2`` loaded in the same process. It is declared twice:

* the *exact* schema, as in ``caffe.proto``: ``BlobProto.data`` is ``repeated float``;
* the *raw* schema, identical except that ``BlobProto.data`` (and ``diff``, ``double_data``, ``double_diff``)
  are ``repeated bytes``: a packed float run arrives as its little-endian payload, which numpy takes whole.

Which one is read first depends on the runtime. The upb runtime decodes packed floats natively and its container
converts to numpy in one copy (``__array__``), so there the exact schema is the fastest and is used alone. Elsewhere
(the pure-Python runtime, old C++ ones) the floats would be decoded and converted one Python float at a time:
minutes for FCN-VGG16's 102.8M-float ``fc6``. There the raw schema is read first, and the exact one only when a blob
has something the raw one cannot account for (floats written unpacked, a length that is not whole floats, data that
does not fill the shape).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from ..errors import FcnsegError

__all__ = ["CaffeLayer", "read_caffemodel"]

# V1LayerParameter.LayerType (caffe.proto): enum value -> (enum name, the type string Caffe's UpgradeV1LayerType
# turns it into). V1 has no Crop, Scale, BatchNorm, ...: those layers only exist as modern `layer` entries.
_V1_LAYER_TYPES: dict[int, tuple[str, str]] = {
    0: ("NONE", ""),
    1: ("ACCURACY", "Accuracy"),
    2: ("BNLL", "BNLL"),
    3: ("CONCAT", "Concat"),
    4: ("CONVOLUTION", "Convolution"),
    5: ("DATA", "Data"),
    6: ("DROPOUT", "Dropout"),
    7: ("EUCLIDEAN_LOSS", "EuclideanLoss"),
    8: ("FLATTEN", "Flatten"),
    9: ("HDF5_DATA", "HDF5Data"),
    10: ("HDF5_OUTPUT", "HDF5Output"),
    11: ("IM2COL", "Im2col"),
    12: ("IMAGE_DATA", "ImageData"),
    13: ("INFOGAIN_LOSS", "InfogainLoss"),
    14: ("INNER_PRODUCT", "InnerProduct"),
    15: ("LRN", "LRN"),
    16: ("MULTINOMIAL_LOGISTIC_LOSS", "MultinomialLogisticLoss"),
    17: ("POOLING", "Pooling"),
    18: ("RELU", "ReLU"),
    19: ("SIGMOID", "Sigmoid"),
    20: ("SOFTMAX", "Softmax"),
    21: ("SOFTMAX_LOSS", "SoftmaxWithLoss"),
    22: ("SPLIT", "Split"),
    23: ("TANH", "TanH"),
    24: ("WINDOW_DATA", "WindowData"),
    25: ("ELTWISE", "Eltwise"),
    26: ("POWER", "Power"),
    27: ("SIGMOID_CROSS_ENTROPY_LOSS", "SigmoidCrossEntropyLoss"),
    28: ("HINGE_LOSS", "HingeLoss"),
    29: ("MEMORY_DATA", "MemoryData"),
    30: ("ARGMAX", "ArgMax"),
    31: ("THRESHOLD", "Threshold"),
    32: ("DUMMY_DATA", "DummyData"),
    33: ("SLICE", "Slice"),
    34: ("MVN", "MVN"),
    35: ("ABSVAL", "AbsVal"),
    36: ("SILENCE", "Silence"),
    37: ("CONTRASTIVE_LOSS", "ContrastiveLoss"),
    38: ("EXP", "Exp"),
    39: ("DECONVOLUTION", "Deconvolution"),
}

_PACKAGE = "fcnseg_caffe"
_RAW_PACKAGE = "fcnseg_caffe.raw"


# ------------------------------------------------------------------------------------------------ the schema


def _add_field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    *,
    repeated: bool = False,
    type_name: str | None = None,
    packed: bool = False,
) -> None:
    f = msg.field.add(name=name, number=number, type=ftype)
    f.label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
    if type_name is not None:
        f.type_name = type_name
    if packed:
        f.options.packed = True


def _add_blob_messages(
    fd: descriptor_pb2.FileDescriptorProto, ref: Callable[[str], str], *, raw_payloads: bool
) -> None:
    """BlobShape and BlobProto: a blob's shape and its float / double payloads."""
    fdp = descriptor_pb2.FieldDescriptorProto
    shape = fd.message_type.add(name="BlobShape")
    _add_field(shape, "dim", 1, fdp.TYPE_INT64, repeated=True, packed=True)

    blob = fd.message_type.add(name="BlobProto")
    _add_field(blob, "shape", 7, fdp.TYPE_MESSAGE, type_name=ref("BlobShape"))
    payloads = (("data", 5, fdp.TYPE_FLOAT), ("diff", 6, fdp.TYPE_FLOAT), ("double_data", 8, fdp.TYPE_DOUBLE))
    for fname, number, scalar in (*payloads, ("double_diff", 9, fdp.TYPE_DOUBLE)):
        if raw_payloads:  # each packed run as its payload bytes; an unpacked element becomes an unknown field
            _add_field(blob, fname, number, fdp.TYPE_BYTES, repeated=True)
        else:
            _add_field(blob, fname, number, scalar, repeated=True, packed=True)
    for fname, number in (("num", 1), ("channels", 2), ("height", 3), ("width", 4)):
        _add_field(blob, fname, number, fdp.TYPE_INT64)


def _add_layer_messages(fd: descriptor_pb2.FileDescriptorProto, ref: Callable[[str], str]) -> None:
    """EltwiseParameter, LayerParameter and the legacy V1LayerParameter."""
    fdp = descriptor_pb2.FieldDescriptorProto
    # Eltwise's coefficients: the release's late fusion averages its two score maps with them (coeff 0.5, 0.5).
    eltwise = fd.message_type.add(name="EltwiseParameter")
    _add_field(eltwise, "coeff", 2, fdp.TYPE_FLOAT, repeated=True)

    layer = fd.message_type.add(name="LayerParameter")
    _add_field(layer, "name", 1, fdp.TYPE_STRING)
    _add_field(layer, "type", 2, fdp.TYPE_STRING)
    _add_field(layer, "bottom", 3, fdp.TYPE_STRING, repeated=True)
    _add_field(layer, "top", 4, fdp.TYPE_STRING, repeated=True)
    _add_field(layer, "blobs", 7, fdp.TYPE_MESSAGE, repeated=True, type_name=ref("BlobProto"))
    _add_field(layer, "eltwise_param", 110, fdp.TYPE_MESSAGE, type_name=ref("EltwiseParameter"))

    v1 = fd.message_type.add(name="V1LayerParameter")
    enum = v1.enum_type.add(name="LayerType")
    for value, (enum_name, _) in sorted(_V1_LAYER_TYPES.items()):
        enum.value.add(name=enum_name, number=value)
    _add_field(v1, "bottom", 2, fdp.TYPE_STRING, repeated=True)
    _add_field(v1, "top", 3, fdp.TYPE_STRING, repeated=True)
    _add_field(v1, "name", 4, fdp.TYPE_STRING)
    # Declared int32, not LayerType: same varint on the wire, but a proto2 enum is closed, and a value outside it
    # would vanish into the unknown fields, leaving the layer silently untyped instead of reported.
    _add_field(v1, "type", 5, fdp.TYPE_INT32)
    _add_field(v1, "blobs", 6, fdp.TYPE_MESSAGE, repeated=True, type_name=ref("BlobProto"))
    _add_field(v1, "eltwise_param", 24, fdp.TYPE_MESSAGE, type_name=ref("EltwiseParameter"))


def _schema_file(package: str, *, raw_payloads: bool) -> descriptor_pb2.FileDescriptorProto:
    """The subset of caffe.proto this module reads, as a proto2 file in ``package``."""
    fdp = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name=package.replace(".", "/") + ".proto", package=package)
    fd.syntax = "proto2"

    def ref(msg_name: str) -> str:
        return f".{package}.{msg_name}"

    _add_blob_messages(fd, ref, raw_payloads=raw_payloads)
    _add_layer_messages(fd, ref)
    net = fd.message_type.add(name="NetParameter")
    _add_field(net, "name", 1, fdp.TYPE_STRING)
    _add_field(net, "layers", 2, fdp.TYPE_MESSAGE, repeated=True, type_name=ref("V1LayerParameter"))
    _add_field(net, "input", 3, fdp.TYPE_STRING, repeated=True)
    _add_field(net, "layer", 100, fdp.TYPE_MESSAGE, repeated=True, type_name=ref("LayerParameter"))
    return fd


def _message_class(pool: descriptor_pool.DescriptorPool, full_name: str) -> type[message.Message]:
    desc = pool.FindMessageTypeByName(full_name)
    get_class = getattr(message_factory, "GetMessageClass", None)
    if get_class is not None:
        return get_class(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)  # protobuf < 4.21


def _build_schemas() -> tuple[dict[str, type[message.Message]], dict[str, type[message.Message]]]:
    pool = descriptor_pool.DescriptorPool()  # private: nothing else in the process can collide with it
    names = ("BlobShape", "BlobProto", "LayerParameter", "V1LayerParameter", "NetParameter")
    schemas = []
    for package, raw in ((_PACKAGE, False), (_RAW_PACKAGE, True)):
        pool.AddSerializedFile(_schema_file(package, raw_payloads=raw).SerializeToString())
        schemas.append({n: _message_class(pool, f"{package}.{n}") for n in names})
    return schemas[0], schemas[1]


_EXACT, _RAW = _build_schemas()


def _exact_schema_is_fast() -> bool:
    """Whether the runtime parses packed floats natively and hands them to numpy in one copy (upb does).

    The pure-Python runtime also has ``__array__`` on its containers, but decodes and converts float by float.
    """
    try:
        from google.protobuf.internal import api_implementation

        native = api_implementation.Type() == "upb"
    except (ImportError, AttributeError):
        native = False
    return native and hasattr(type(_EXACT["BlobProto"]().data), "__array__")


_EXACT_FIRST = _exact_schema_is_fast()

try:
    from google.protobuf.unknown_fields import UnknownFieldSet as _UnknownFieldSet
except ImportError:  # protobuf < 4.22
    _UnknownFieldSet = None


def _has_unknown_fields(msg: message.Message) -> bool:
    if _UnknownFieldSet is not None:
        return len(_UnknownFieldSet(msg)) > 0
    try:
        return len(msg.UnknownFields()) > 0
    except (AttributeError, NotImplementedError):
        return False  # cannot tell: the length check against the blob's shape still guards the raw reading


# ------------------------------------------------------------------------------------------------ the API


@dataclass(eq=False)
class CaffeLayer:
    """One layer of a Caffe net: its name, modern type string, parameter blobs and connections.

    Compared by identity (``eq=False``): the blobs are arrays, which have no single truth value.
    """

    name: str
    type: str  # the modern type string ("Convolution", "Deconvolution", "ReLU", ...), also for V1 files
    blobs: list[np.ndarray] = field(default_factory=list)  # float32, shaped as the file says
    bottoms: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)
    coeff: list[float] = field(default_factory=list)  # Eltwise coefficients (``eltwise_param.coeff``), if any


class _NeedExactError(Exception):
    """The raw schema could not account for a blob: parse the file again with the exact one."""


def read_caffemodel(path: str | os.PathLike) -> tuple[str, list[CaffeLayer]]:
    """(net name, layers in file order); reads both the modern ``layer`` (100) and the legacy ``layers`` (2).

    V1 enum types come back as the type strings Caffe upgrades them to (``INNER_PRODUCT`` -> ``"InnerProduct"``).
    Blobs are float32 arrays (``double_data`` is narrowed), shaped by ``BlobProto.shape``, else by the legacy
    (num, channels, height, width), else 1-D. Raises :class:`FcnsegError` naming the file and the problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise FcnsegError(f"{path}: empty file, not a Caffe model")
            try:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # not mappable (a pipe, a special file): read it into memory
                return _read_buffer(path, f.read())
            with mapped, memoryview(mapped) as view:
                return _read_buffer(path, view)
    except FileNotFoundError:
        raise FcnsegError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FcnsegError(f"{path}: is a directory, not a Caffe model file") from None
    except OSError as e:
        raise FcnsegError(f"{path}: cannot read: {e.strerror or e}") from None


# ------------------------------------------------------------------------------------------------ reading


def _read_buffer(path: Path, buf: Any) -> tuple[str, list[CaffeLayer]]:
    if not _EXACT_FIRST:
        net = _parse(path, _RAW["NetParameter"], buf)
        try:
            return _convert(path, net, raw=True)
        except _NeedExactError:
            del net
    return _convert(path, _parse(path, _EXACT["NetParameter"], buf), raw=False)


def _parse(path: Path, cls: type[message.Message], buf: Any) -> Any:
    msg = cls()
    failed = False
    try:
        try:
            msg.ParseFromString(buf)
        except TypeError:  # a runtime that takes only bytes, not a memoryview
            msg.ParseFromString(bytes(buf))
    except message.DecodeError:
        failed = True
    # Raised here, not in the handler: the DecodeError's traceback can hold slices of the mapped file (the
    # pure-Python runtime's frames do), and as the new error's context it would keep the map from closing.
    if failed:
        raise FcnsegError(f"{path}: not a Caffe model (it does not parse as a protobuf NetParameter)")
    return msg


def _convert(path: Path, net: Any, *, raw: bool) -> tuple[str, list[CaffeLayer]]:
    if len(net.layer) and len(net.layers):
        raise FcnsegError(
            f"{path}: has both modern `layer` and legacy V1 `layers` entries; Caffe accepts only one kind per net"
        )
    if not len(net.layer) and not len(net.layers):
        raise FcnsegError(f"{path}: not a Caffe model (no layers in it: not a NetParameter, or an empty net)")
    layers = []
    for i, lp in enumerate(net.layer):
        label = lp.name or f"#{i}"
        blobs = [_blob(path, label, j, bp, raw) for j, bp in enumerate(lp.blobs)]
        layers.append(CaffeLayer(lp.name, lp.type, blobs, list(lp.bottom), list(lp.top), _coeff(lp)))
    for i, lp in enumerate(net.layers):
        label = lp.name or f"#{i}"
        entry = _V1_LAYER_TYPES.get(lp.type)
        if entry is None:
            raise FcnsegError(f"{path}: layer {label!r}: unknown V1 layer type enum value {lp.type}")
        blobs = [_blob(path, label, j, bp, raw) for j, bp in enumerate(lp.blobs)]
        layers.append(CaffeLayer(lp.name, entry[1], blobs, list(lp.bottom), list(lp.top), _coeff(lp)))
    return net.name, layers


def _coeff(lp: Any) -> list[float]:
    return [float(c) for c in lp.eltwise_param.coeff] if lp.HasField("eltwise_param") else []


def _blob(path: Path, label: str, j: int, bp: Any, raw: bool) -> np.ndarray:
    if raw and _has_unknown_fields(bp):
        raise _NeedExactError  # e.g. floats written unpacked: only the exact schema reads them
    shape = _blob_shape(bp)
    if shape is not None and any(d < 0 for d in shape):
        raise FcnsegError(f"{path}: layer {label!r}: blob {j} has a negative dimension in its shape {shape}")
    values = _raw_values(bp) if raw else _exact_values(bp)
    if shape is None:
        return values
    if values.size != math.prod(shape):
        if raw:
            raise _NeedExactError
        kind = "double_data" if len(bp.double_data) else "data"
        raise FcnsegError(
            f"{path}: layer {label!r}: blob {j} has {values.size} {kind} values but its shape {shape} "
            f"needs {math.prod(shape)}"
        )
    return values.reshape(shape)


def _blob_shape(bp: Any) -> tuple[int, ...] | None:
    """The blob's shape (``shape`` or the legacy num / channels / height / width); None when it has none: a flat
    vector of whatever data there is."""
    if bp.HasField("shape"):
        return tuple(int(d) for d in bp.shape.dim)
    if any(bp.HasField(k) for k in ("num", "channels", "height", "width")):
        return (int(bp.num), int(bp.channels), int(bp.height), int(bp.width))
    return None


def _raw_values(bp: Any) -> np.ndarray:
    """float32 values from the raw schema's payload bytes (doubles when there are any, as Caffe reads them)."""
    doubles = b"".join(bp.double_data)
    payload, itemsize = (doubles, 8) if doubles else (b"".join(bp.data), 4)
    if len(payload) % itemsize:
        raise _NeedExactError  # not whole floats: the exact parser says what is wrong
    with np.errstate(over="ignore"):  # a double beyond float32 becomes inf, as Caffe's cast makes it
        return np.frombuffer(payload, dtype="<f8" if doubles else "<f4").astype(np.float32)


def _exact_values(bp: Any) -> np.ndarray:
    if len(bp.double_data):  # Caffe reads double_data when there is any, else data
        with np.errstate(over="ignore"):
            return np.asarray(bp.double_data, dtype=np.float64).astype(np.float32)
    values = np.asarray(bp.data, dtype=np.float32)
    return values if values.flags.writeable and values.flags.owndata else values.copy()
