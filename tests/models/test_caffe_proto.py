"""Caffe .caffemodel reading and writing: round trips, hand-encoded files that pin the field numbers, errors.

Every test runs twice: with the exact schema alone (what the upb runtime uses) and with the raw-payload schema
first (what other runtimes use), which falls back to the exact one when a blob needs it.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fcnseg.errors import FcnsegError
from fcnseg.models import caffe_proto
from fcnseg.models.caffe_proto import CaffeLayer, read_caffemodel
from tests.caffe_files import write_caffemodel


@pytest.fixture(autouse=True, params=["exact", "raw-first"])
def strategy(request, monkeypatch):
    monkeypatch.setattr(caffe_proto, "_EXACT_FIRST", request.param == "exact")
    return request.param


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The schemas read_caffemodel parses the file with, in order ("exact" or "raw")."""
    seen: list[str] = []
    original = caffe_proto._parse

    def spy(path, cls, buf):
        seen.append("raw" if cls is caffe_proto._RAW["NetParameter"] else "exact")
        return original(path, cls, buf)

    monkeypatch.setattr(caffe_proto, "_parse", spy)
    return seen


# ---------------------------------------------------------------- protobuf wire format, by hand (no schema)


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 values are sent as their 64-bit two's complement
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def vint(field: int, value: int) -> bytes:
    return key(field, 0) + varint(value)


def ld(field: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode()
    return key(field, 2) + varint(len(payload)) + payload


def packed_floats(field: int, values) -> bytes:
    return ld(field, np.asarray(values, dtype="<f4").tobytes())


def unpacked_floats(field: int, values) -> bytes:
    return b"".join(key(field, 5) + struct.pack("<f", v) for v in values)


def decode(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field, wire type, value) for each field of one message: varints as ints, the rest as raw bytes."""
    out, pos = [], 0

    def read_varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while pos < len(buf):
        k = read_varint()
        field, wt = k >> 3, k & 7
        if wt == 0:
            out.append((field, wt, read_varint()))
        elif wt == 2:
            n = read_varint()
            out.append((field, wt, buf[pos : pos + n]))
            pos += n
        elif wt == 5:
            out.append((field, wt, buf[pos : pos + 4]))
            pos += 4
        elif wt == 1:
            out.append((field, wt, buf[pos : pos + 8]))
            pos += 8
        else:
            raise AssertionError(f"unexpected wire type {wt}")
    return out


def packed_varints(payload: bytes) -> list[int]:
    values, value, shift = [], 0, 0
    for b in payload:
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            values.append(value)
            value = shift = 0
    return values


def write_bytes(tmp_path, data: bytes, name: str = "net.caffemodel"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ---------------------------------------------------------------- round trips


SHAPES = [(), (7,), (3, 5), (4, 3, 2, 2), (2, 1, 3, 1, 2), (0, 3)]


def random_layers(rng: np.random.Generator, shapes) -> list[CaffeLayer]:
    blobs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    special = np.array([np.inf, -np.inf, -0.0, np.float32(1e-45), np.finfo(np.float32).max, np.nan], np.float32)
    blobs[1][:6] = special  # SHAPES[1] is (7,)
    return [
        CaffeLayer("conv1_1", "Convolution", blobs[:3], ["data"], ["conv1_1"]),
        CaffeLayer("relu1_1", "ReLU", [], ["conv1_1"], ["conv1_1"]),
        CaffeLayer("upscore_ü", "Deconvolution", blobs[3:], ["score", "extra"], ["upscore", "aux"]),
        CaffeLayer("loss", "SoftmaxWithLoss", [], ["upscore", "label"], ["loss"]),
    ]


def assert_same_layers(got: list[CaffeLayer], want: list[CaffeLayer], legacy: bool = False) -> None:
    assert [(lay.name, lay.type, lay.bottoms, lay.tops) for lay in got] == [
        (lay.name, lay.type, lay.bottoms, lay.tops) for lay in want
    ]
    for g, w in zip(got, want, strict=True):
        assert len(g.blobs) == len(w.blobs)
        for a, b in zip(g.blobs, w.blobs, strict=True):
            shape = (1,) * (4 - b.ndim) + b.shape if legacy else b.shape
            assert a.shape == shape
            assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
            np.testing.assert_array_equal(bits(a), bits(b.reshape(shape)))  # bit for bit, NaN and -0.0 included


def test_round_trip_modern(tmp_path, parses):
    layers = random_layers(np.random.default_rng(0), SHAPES)
    path = tmp_path / "modern.caffemodel"
    write_caffemodel(path, layers, name="FCN-8s")
    name, got = read_caffemodel(str(path))
    assert name == "FCN-8s"
    assert_same_layers(got, layers)
    assert len(parses) == 1  # one parse, whichever the schema: no fallback for packed floats, as Caffe writes


def test_round_trip_legacy(tmp_path, parses):
    layers = random_layers(np.random.default_rng(1), [s for s in SHAPES if len(s) <= 4] + [(2, 3, 4, 5)])
    path = tmp_path / "legacy.caffemodel"
    write_caffemodel(path, layers, legacy=True)
    name, got = read_caffemodel(path)
    assert name == ""
    assert_same_layers(got, layers, legacy=True)
    assert len(parses) == 1


def test_legacy_round_trip_of_every_v1_type(tmp_path):
    modern_types = [modern for _, modern in caffe_proto._V1_LAYER_TYPES.values()]
    assert len(modern_types) == len(set(modern_types)) == 40
    layers = [CaffeLayer(f"l{i}", t) for i, t in enumerate(modern_types)]
    path = tmp_path / "types.caffemodel"
    write_caffemodel(path, layers, legacy=True)
    assert [lay.type for lay in read_caffemodel(path)[1]] == modern_types


def test_blobs_are_independent_writable_copies(tmp_path):
    a = np.arange(6, dtype=np.float64).reshape(2, 3)  # float64 in: written as float32
    path = tmp_path / "m.caffemodel"
    write_caffemodel(path, [CaffeLayer("fc", "InnerProduct", [a, a[0]])])
    (layer,) = read_caffemodel(path)[1]
    w, b = layer.blobs
    assert w.dtype == np.float32 and np.array_equal(w, a)
    w += 1
    assert np.array_equal(b, [0, 1, 2])


def test_non_contiguous_blob_is_written_in_c_order(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1)[:, ::-1]
    path = tmp_path / "t.caffemodel"
    write_caffemodel(path, [CaffeLayer("t", "Scale", [a])])
    np.testing.assert_array_equal(read_caffemodel(path)[1][0].blobs[0], a)


# ---------------------------------------------------------------- written bytes, decoded by hand


def test_modern_writer_uses_caffe_field_numbers(tmp_path):
    path = tmp_path / "m.caffemodel"
    w = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    write_caffemodel(path, [CaffeLayer("score", "Scale", [w], ["x"], ["y"])], name="n")
    net = decode(path.read_bytes())
    assert net[0] == (1, 2, b"n")
    ((field, wt, layer),) = net[1:]
    assert (field, wt) == (100, 2)
    fields = decode(layer)
    assert sorted(f for f in fields if f[0] != 7) == [(1, 2, b"score"), (2, 2, b"Scale"), (3, 2, b"x"), (4, 2, b"y")]
    (blob,) = [v for f, _, v in fields if f == 7]
    blob_fields = {f: (wt, v) for f, wt, v in decode(blob)}
    assert set(blob_fields) == {5, 7}
    assert blob_fields[5] == (2, w.tobytes())  # packed floats, little-endian
    ((dim_field, dim_wt, dims),) = decode(blob_fields[7][1])
    assert (dim_field, dim_wt) == (1, 2) and packed_varints(dims) == [1, 2, 3]  # packed int64 dims


def test_legacy_writer_uses_v1_field_numbers(tmp_path):
    path = tmp_path / "l.caffemodel"
    b = np.array([1.5, -2.0], np.float32)
    write_caffemodel(path, [CaffeLayer("up", "Deconvolution", [b], ["score"], ["up"])], legacy=True)
    ((field, wt, layer),) = decode(path.read_bytes())
    assert (field, wt) == (2, 2)
    fields = sorted(f for f in decode(layer) if f[0] != 6)
    assert fields == [(2, 2, b"score"), (3, 2, b"up"), (4, 2, b"up"), (5, 0, 39)]  # DECONVOLUTION = 39
    (blob,) = [v for f, _, v in decode(layer) if f == 6]
    assert sorted(decode(blob)) == [(1, 0, 1), (2, 0, 1), (3, 0, 1), (4, 0, 2), (5, 2, b.tobytes())]


# ---------------------------------------------------------------- hand-encoded files, read


def test_hand_encoded_modern_file(tmp_path):
    w = np.array([[[[0.5, -1.25]]], [[[3.0, 1e-3]]]], np.float32)  # (2, 1, 1, 2)
    blob = ld(7, ld(1, bytes([2, 1, 1, 2]))) + packed_floats(5, w.ravel())
    layer = (
        ld(1, "conv")
        + ld(2, "Convolution")
        + ld(3, "data")
        + ld(4, "conv")
        + ld(6, ld(1, "conv_w") + key(2, 5) + struct.pack("<f", 1.0))  # param { name, lr_mult }: unknown here
        + ld(106, vint(1, 2) + vint(4, 3))  # convolution_param { num_output, kernel_size }: unknown here
        + ld(7, blob)
        + ld(7, ld(7, ld(1, bytes([2]))) + packed_floats(5, [7.0, 8.0]))
    )
    net = ld(1, "tiny") + ld(3, "data") + vint(4, 1) + vint(4, 3) + key(100, 2) + varint(len(layer)) + layer
    assert key(100, 2) == b"\xa2\x06"
    name, layers = read_caffemodel(write_bytes(tmp_path, net))
    assert name == "tiny"
    (got,) = layers
    assert (got.name, got.type, got.bottoms, got.tops) == ("conv", "Convolution", ["data"], ["conv"])
    assert [b.shape for b in got.blobs] == [(2, 1, 1, 2), (2,)]
    np.testing.assert_array_equal(got.blobs[0], w)
    np.testing.assert_array_equal(got.blobs[1], [7.0, 8.0])


def v1_layer(name: str, type_value: int, *blobs: bytes, bottoms=(), tops=()) -> bytes:
    body = b"".join(ld(2, b) for b in bottoms) + b"".join(ld(3, t) for t in tops) + ld(4, name)
    body += vint(5, type_value) + b"".join(ld(6, b) for b in blobs)
    body += key(7, 5) + struct.pack("<f", 1.0) + ld(10, vint(1, 21))  # blobs_lr, convolution_param: unknown here
    return ld(2, body)


def legacy_blob(dims, values) -> bytes:
    return b"".join(vint(f, d) for f, d in zip((1, 2, 3, 4), dims, strict=True)) + packed_floats(5, values)


def test_hand_encoded_legacy_file(tmp_path):
    k = np.arange(8, dtype=np.float32)
    net = ld(1, "fcn32s") + v1_layer("upscore", 39, legacy_blob((2, 1, 2, 2), k), bottoms=["score"], tops=["upscore"])
    net += v1_layer("fc6", 14, legacy_blob((1, 1, 3, 1), [1, 2, 3]), legacy_blob((1, 1, 1, 2), [4, 5]))
    net += v1_layer("relu", 18)
    name, layers = read_caffemodel(write_bytes(tmp_path, net))
    assert name == "fcn32s"
    assert [(lay.name, lay.type) for lay in layers] == [
        ("upscore", "Deconvolution"),
        ("fc6", "InnerProduct"),
        ("relu", "ReLU"),
    ]
    assert (layers[0].bottoms, layers[0].tops) == (["score"], ["upscore"])
    np.testing.assert_array_equal(layers[0].blobs[0], k.reshape(2, 1, 2, 2))
    assert [b.shape for b in layers[1].blobs] == [(1, 1, 3, 1), (1, 1, 1, 2)]
    assert layers[2].blobs == []


@pytest.mark.parametrize(
    "value, modern",
    [
        (3, "Concat"),
        (4, "Convolution"),
        (6, "Dropout"),
        (14, "InnerProduct"),
        (17, "Pooling"),
        (18, "ReLU"),
        (20, "Softmax"),
        (21, "SoftmaxWithLoss"),
        (22, "Split"),
        (25, "Eltwise"),
        (5, "Data"),
        (39, "Deconvolution"),
        (0, ""),
    ],
)
def test_v1_enum_values(tmp_path, value, modern):
    (layer,) = read_caffemodel(write_bytes(tmp_path, v1_layer("x", value)))[1]
    assert layer.type == modern


def test_double_data_reads_as_float32(tmp_path):
    d = np.array([0.1, -2.5, 1e300, 3.0], np.float64)
    blob = ld(7, ld(1, bytes([2, 2]))) + ld(8, d.astype("<f8").tobytes())
    net = ld(100, ld(1, "d") + ld(2, "Scale") + ld(7, blob))
    (layer,) = read_caffemodel(write_bytes(tmp_path, net))[1]
    (got,) = layer.blobs
    assert got.dtype == np.float32 and got.shape == (2, 2)
    np.testing.assert_array_equal(got, np.array([[0.1, -2.5], [np.inf, 3.0]], np.float32))


@pytest.mark.parametrize(
    "encoding",
    ["unpacked", "split-packed", "mixed"],
)
def test_unpacked_and_split_data(tmp_path, parses, strategy, encoding):
    v = np.array([1.0, -2.0, 3.5, 4.25, 0.0, -0.0], np.float32)
    if encoding == "unpacked":
        data = unpacked_floats(5, v)
    elif encoding == "split-packed":
        data = packed_floats(5, v[:2]) + packed_floats(5, v[2:5]) + packed_floats(5, v[5:])
    else:
        data = packed_floats(5, v[:2]) + unpacked_floats(5, v[2:4]) + packed_floats(5, v[4:])
    blob = ld(7, ld(1, bytes([3, 2]))) + data
    net = ld(100, ld(1, "u") + ld(2, "Convolution") + ld(7, blob))
    (layer,) = read_caffemodel(write_bytes(tmp_path, net))[1]
    np.testing.assert_array_equal(bits(layer.blobs[0]), bits(v.reshape(3, 2)))
    if strategy == "exact":
        assert parses == ["exact"]
    elif encoding == "split-packed":
        assert parses == ["raw"]  # packed runs concatenate: no need for the exact schema
    else:
        assert parses == ["raw", "exact"]  # unpacked floats: the raw schema hands over to the exact one


def test_unpacked_legacy_blob(tmp_path):
    v = [1.0, 2.0, 3.0]
    blob = b"".join(vint(f, d) for f, d in zip((1, 2, 3, 4), (1, 1, 1, 3), strict=True)) + unpacked_floats(5, v)
    (layer,) = read_caffemodel(write_bytes(tmp_path, v1_layer("ip", 14, blob)))[1]
    np.testing.assert_array_equal(layer.blobs[0], np.reshape(v, (1, 1, 1, 3)))


def test_blob_without_any_shape_is_flat(tmp_path):
    net = ld(100, ld(1, "b") + ld(2, "Bias") + ld(7, packed_floats(5, [1, 2, 3])))
    (layer,) = read_caffemodel(write_bytes(tmp_path, net))[1]
    assert layer.blobs[0].shape == (3,)


# ---------------------------------------------------------------- errors


def assert_error(path, *needles: str) -> str:
    with pytest.raises(FcnsegError) as info:
        read_caffemodel(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    for needle in needles:
        assert needle in msg
    return msg


@pytest.mark.parametrize(
    "data",
    [
        b"\x00",  # field number 0
        b"\xff\xff\xff\xff",  # truncated varint
        b'name: "FCN32s"\nlayer { name: "data" type: "Input" }\n',  # a prototxt, not a caffemodel
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        ld(100, ld(7, ld(5, b"\x00\x00\x80"))),  # packed floats that are not whole floats
    ],
    ids=["field-0", "truncated-varint", "prototxt", "random", "partial-float"],
)
def test_garbage_is_not_a_caffe_model(tmp_path, data):
    assert_error(write_bytes(tmp_path, data), "not a Caffe model")


def test_protobuf_without_layers(tmp_path):
    assert_error(write_bytes(tmp_path, ld(1, "just a name") + vint(5, 1)), "no layers")


def test_empty_file(tmp_path):
    assert_error(write_bytes(tmp_path, b""), "empty")


def test_missing_file(tmp_path):
    assert_error(tmp_path / "nope.caffemodel", "no such file")


def test_directory(tmp_path):
    assert_error(tmp_path, "directory")


def test_shape_data_mismatch(tmp_path):
    blob = ld(7, ld(1, bytes([2, 3]))) + packed_floats(5, range(5))
    net = ld(100, ld(1, "fc7") + ld(2, "Convolution") + ld(7, packed_floats(5, [0])) + ld(7, blob))
    msg = assert_error(write_bytes(tmp_path, net), "'fc7'", "blob 1", "5", "(2, 3)")
    assert "needs 6" in msg


def test_legacy_shape_data_mismatch(tmp_path):
    net = v1_layer("conv1", 4, legacy_blob((2, 3, 1, 1), range(4)))
    assert_error(write_bytes(tmp_path, net), "'conv1'", "blob 0")


def test_unknown_v1_enum(tmp_path):
    net = v1_layer("relu1", 18) + v1_layer("mystery", 99)
    assert_error(write_bytes(tmp_path, net), "'mystery'", "99")


def test_both_layer_kinds(tmp_path):
    net = v1_layer("a", 18) + ld(100, ld(1, "b") + ld(2, "ReLU"))
    assert_error(write_bytes(tmp_path, net), "legacy")


def test_negative_dimension(tmp_path):
    blob = ld(7, ld(1, varint(-1)))
    net = ld(100, ld(1, "neg") + ld(2, "Scale") + ld(7, blob))
    assert_error(write_bytes(tmp_path, net), "'neg'", "negative")


def test_legacy_write_of_a_modern_only_type(tmp_path):
    path = tmp_path / "out.caffemodel"
    layers = [CaffeLayer("conv", "Convolution"), CaffeLayer("score_pool4c", "Crop", [], ["a", "b"], ["c"])]
    with pytest.raises(FcnsegError, match="score_pool4c") as info:
        write_caffemodel(path, layers, legacy=True)
    assert str(path) in str(info.value) and "'Crop'" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left behind
    write_caffemodel(path, layers)  # the modern format takes any type string
    assert [lay.type for lay in read_caffemodel(path)[1]] == ["Convolution", "Crop"]


def test_legacy_write_of_a_5d_blob(tmp_path):
    path = tmp_path / "out.caffemodel"
    with pytest.raises(FcnsegError, match="conv3d"):
        write_caffemodel(
            path, [CaffeLayer("conv3d", "Convolution", [np.zeros((1, 1, 1, 1, 2), np.float32)])], legacy=True
        )
    assert not path.exists()


def test_write_into_a_missing_folder(tmp_path):
    path = tmp_path / "no" / "such" / "m.caffemodel"
    with pytest.raises(FcnsegError, match="cannot write"):
        write_caffemodel(path, [CaffeLayer("r", "ReLU")])
