"""MATLAB label files (SBD, NYUDv2, SIFT Flow) read with their size checked first.

A compressed ``.mat`` variable inflates by up to a thousand times: a 137 KB file can hold a 144 MB matrix of
zeros. Before ``scipy.io.loadmat`` reads a file, :func:`check_mat_size` walks the headers of every array in it,
the arrays nested in cells and structs included (where loadmat sets aside room for every element before reading
one), inflating compressed variables in small pieces that are counted and dropped: an array of more elements than
the largest legitimate label matrix, or a variable inflating past what such a matrix takes, is refused.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import IO, Any

from ..errors import FcnsegError

__all__ = ["MAX_LABEL_ELEMENTS", "MAX_MAT_BYTES", "check_mat_size", "load_mat"]

MAX_LABEL_SIDE = 4096
MAX_LABEL_ELEMENTS = MAX_LABEL_SIDE * MAX_LABEL_SIDE
"""The most elements one array of a label file may hold: a 4096 x 4096 matrix (the releases' largest is SBD's
500 x 500)."""
MAX_MAT_BYTES = MAX_LABEL_ELEMENTS * 8 + (1 << 20)
"""The most bytes a label file may take once inflated, all its variables together (loadmat reads every one): a
4096 x 4096 matrix of doubles (MATLAB's default type) and room for the small arrays beside it."""
MAX_ARRAYS = 10_000
"""The most arrays a variable may nest (cells, struct fields): SBD's ``GTcls`` holds 24."""
MAX_DEPTH = 16

_MI_MATRIX, _MI_COMPRESSED = 14, 15  # MAT v5 element types: an array; a zlib-compressed array
_MX_CELL, _MX_STRUCT, _MX_OBJECT = 1, 2, 3  # array classes that hold further arrays
_CHUNK = 1 << 16


class _TooLargeError(Exception):
    """Why a file is too large to read, in words."""


class _DamagedError(Exception):
    """A file that ends early or is no MAT file: loadmat reports it in its own words."""


class _Variable:
    """The bytes of one variable, read in order: inflated in small pieces (a compressed variable) or straight from
    the file. Inflated bytes are counted, never past ``limit`` (what is left of the file's ``cap``); ``pos`` is how
    many were handed out or skipped."""

    def __init__(self, f: IO[bytes], size: int, limit: int, *, cap: int, compressed: bool) -> None:
        self.f, self.left, self.limit, self.cap = f, size, limit, cap
        self.inflater = zlib.decompressobj() if compressed else None
        self.pending, self.inflated, self.pos, self.arrays = b"", 0, 0, 0

    def _more(self) -> bytes:
        if self.inflater is None:
            data = self.f.read(min(self.left, _CHUNK))
            self.left -= len(data)
            return data
        tail = self.inflater.unconsumed_tail
        if not tail and self.left > 0:
            tail = self.f.read(min(self.left, _CHUNK))
            self.left -= len(tail)
        try:
            return self.inflater.decompress(tail, _CHUNK) if tail else self.inflater.flush()
        except zlib.error:
            raise _DamagedError from None

    def read(self, n: int, *, keep: bool = True) -> bytes:
        """The next ``n`` bytes, fewer at the end of the variable (``keep=False``: skipped, returns nothing)."""
        parts = []
        while n > 0:
            if not self.pending:
                self.pending = self._more()
                self.inflated += len(self.pending)
                if self.inflated > self.limit:
                    raise _TooLargeError(f"its variables inflate to more than {self.cap:,} bytes")
                if not self.pending:
                    break
            piece, self.pending = self.pending[:n], self.pending[n:]
            n -= len(piece)
            self.pos += len(piece)
            if keep:
                parts.append(piece)
        return b"".join(parts)


def _tag(v: _Variable, order: str) -> tuple[int, int, bytes | None]:
    """The next element's type and byte count, and its bytes when a small element packs them into its tag."""
    tag = v.read(8)
    if len(tag) < 8:
        raise _DamagedError
    kind, size = struct.unpack(f"{order}II", tag)
    if kind >> 16:
        return kind & 0xFFFF, kind >> 16, tag[4 : 4 + (kind >> 16)]
    return kind, size, None


def _data(v: _Variable, order: str) -> bytes:
    """The next data element's bytes: kept when short (array flags, dimensions, names), else skipped."""
    kind, size, small = _tag(v, order)
    if small is not None:
        return small
    padding = (-size) % 8
    if size > _CHUNK:
        v.read(size + padding, keep=False)
        return b""
    data = v.read(size)
    v.read(padding, keep=False)
    return data


def _ints(data: bytes, order: str) -> tuple[int, ...]:
    return struct.unpack(f"{order}{len(data) // 4}i", data[: len(data) // 4 * 4])


def _children(v: _Variable, order: str, mx_class: int, elements: int) -> int:
    """How many arrays follow the header of an array of ``mx_class``: one per element of a cell, one per field of
    every element of a struct or object (whose field names are read here)."""
    if mx_class == _MX_CELL:
        return elements
    if mx_class not in (_MX_STRUCT, _MX_OBJECT):
        return 0
    if mx_class == _MX_OBJECT:
        _data(v, order)  # the class name
    width = (_ints(_data(v, order), order) or (1,))[0]  # the longest field name, with its padding
    return elements * (len(_data(v, order)) // max(width, 1))


def _walk(v: _Variable, order: str, size: int, depth: int, max_elements: int) -> None:
    """Check the array whose miMATRIX tag (of ``size`` bytes) was just read, and every array it holds; the rest of
    its bytes are skipped (and counted)."""
    end = v.pos + size
    v.arrays += 1
    if v.arrays > MAX_ARRAYS or depth > MAX_DEPTH:
        raise _TooLargeError(f"a variable nests more than {MAX_ARRAYS:,} arrays or {MAX_DEPTH} levels")
    flags = _ints(_data(v, order), order)
    dims = _ints(_data(v, order), order)
    elements = 1
    for side in dims:
        elements *= max(side, 0)
    if elements > max_elements:
        shape = " x ".join(str(side) for side in dims)
        raise _TooLargeError(f"an array of {shape} = {elements:,} elements")
    _data(v, order)  # the array's name
    children = _children(v, order, flags[0] & 0xFF if flags else 0, elements)
    if children > MAX_ARRAYS:
        raise _TooLargeError(f"a cell or struct array holds {children:,} arrays")
    for _ in range(children):
        kind, child, small = _tag(v, order)
        if kind != _MI_MATRIX or small is not None:
            raise _DamagedError
        _walk(v, order, child, depth + 1, max_elements)
    v.read(max(end - v.pos, 0), keep=False)


def _byte_order(head: bytes) -> str | None:
    """``<`` or ``>`` for a MAT v5 file (its 128-byte header ends in version 0x0100 and ``IM`` or ``MI``), else None:
    v4 files hold neither compressed nor nested arrays, and loadmat refuses v7.3 (HDF5) files."""
    if head[124:128] == b"\x00\x01IM":
        return "<"
    if head[124:128] == b"\x01\x00MI":
        return ">"
    return None


def _check_variables(f: IO[bytes], max_elements: int, max_bytes: int) -> None:
    """Walk every variable of a MAT v5 file; raises :class:`_TooLargeError` or :class:`_DamagedError`."""
    order = _byte_order(f.read(128))
    if order is None:
        return
    budget = max_bytes  # shared by every variable: four 500 KB variables of zeros could each inflate to 128 MB
    while len(tag := f.read(8)) == 8:
        kind, size = struct.unpack(f"{order}II", tag)
        end = f.tell() + size
        if kind in (_MI_COMPRESSED, _MI_MATRIX):
            v = _Variable(f, size, budget, cap=max_bytes, compressed=kind == _MI_COMPRESSED)
            if kind == _MI_COMPRESSED:
                kind, size, small = _tag(v, order)
                if kind != _MI_MATRIX or small is not None:
                    raise _DamagedError
            _walk(v, order, size, 0, max_elements)
            budget -= v.inflated
        f.seek(end)


def check_mat_size(
    path: str | os.PathLike, *, max_elements: int = MAX_LABEL_ELEMENTS, max_bytes: int = MAX_MAT_BYTES
) -> None:
    """Refuse, naming the file, a ``.mat`` file larger than ``max_bytes``, holding an array (nested ones included)
    of more than ``max_elements`` elements, or variables inflating past ``max_bytes`` together. A file that is
    damaged or no MATLAB file passes: loadmat says what is wrong with it."""
    try:
        if os.path.getsize(path) > max_bytes:
            raise _TooLargeError(f"a file of {os.path.getsize(path):,} bytes")
        with open(path, "rb") as f:
            _check_variables(f, max_elements, max_bytes)
    except OSError as e:
        raise FcnsegError(f"{path}: cannot read ({e.strerror or e})") from None
    except (_DamagedError, struct.error):
        return
    except _TooLargeError as e:
        raise FcnsegError(
            f"{path}: too large for a label file: {e}; expected at most {MAX_LABEL_SIDE} x {MAX_LABEL_SIDE} labels"
        ) from None


def load_mat(path: str | os.PathLike, expected: str, **options: Any) -> dict[str, Any]:
    """``scipy.io.loadmat(path, **options)`` once :func:`check_mat_size` passes. Every failure is an
    :class:`FcnsegError` naming the file; ``expected`` (what the file should be) ends the message."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise FcnsegError(
            f"{path}: reading .mat files needs scipy; expected it installed (pip install scipy)"
        ) from None
    # Checked first: loadmat reports a missing pathlib.Path as a confusing "Reader needs file name" error.
    if not Path(path).is_file():
        raise FcnsegError(f"{path}: mask file not found; {expected}")
    check_mat_size(path)
    try:
        return loadmat(os.fspath(path), **options)
    # scipy raises ValueError, TypeError, MatReadError, NotImplementedError (v7.3 files), ... on files it cannot read.
    except Exception as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise FcnsegError(f"{path}: cannot read .mat file ({reason}); {expected}") from None
