"""Reading images, masks and a fusion net's depth or HHA images as arrays; encoding and writing masks, colourised
masks and RGB images.

Every reader returns plain uint8 arrays whatever the file's PIL mode, and every failure to read a
file is an :class:`~fcnseg.errors.ImageError` whose one-line message names the file. The encoders
(:func:`encode_mask_png`, :func:`encode_rgb`) return the bytes of a file; the writers write those
bytes through :func:`~fcnseg.io.atomic_write`, so an interrupted write never leaves a half-written file.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fcnseg.errors import FcnsegError, ImageError
from fcnseg.io import atomic_write
from fcnseg.palette import full_palette

__all__ = [
    "DEPTH_MAX_MM",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "ImageHeader",
    "PathLike",
    "UnsupportedFormatError",
    "as_rgb_array",
    "colorize",
    "encode_depth",
    "encode_mask_png",
    "encode_rgb",
    "image_to_array",
    "load_image",
    "overlay",
    "probe_image",
    "read_depth",
    "read_depth_or_hha",
    "read_mask_png",
    "save_mask_png",
    "save_rgb",
    "stack_extra_channels",
]

# What a path argument may be: a str or any os.PathLike (pathlib.Path, ...).
PathLike = str | os.PathLike[str]

_EXIF_ORIENTATION = 0x0112

# The formats every reader here accepts (Pillow's names). Pillow knows many more, some of them through outside
# programs (EPS goes to Ghostscript) or rarely exercised decoders; an input in any other format is refused from its
# first bytes, before any plugin parses it. PPM is Netpbm's PBM, PGM and PPM, which IMAGE_EXTENSIONS lists.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
_FORMAT_NAMES = "PNG, JPEG, BMP, TIFF, WebP, GIF or PPM"
MAX_JPEG_SCANS = 100
"""Scans of one JPEG file decoded at most. Each scan of a progressive JPEG refines the whole picture once more, so
a small file of thousands of cheap scans takes minutes to decode, and a decode cannot be interrupted (libjpeg-turbo's
djpeg has ``-maxscans`` against it); encoders write about 10."""
_NONFINITE_MSG = "image array contains NaN or inf values"

# The suffixes (lower case) that mark a file in a folder as an image.
IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
    ".ppm",
    ".pgm",
}


# --------------------------------------------------------------------------------------------------
# Value scaling, shared by PIL images and numpy arrays so that both follow the same rules.


def _scale_uint16(a: np.ndarray) -> np.ndarray:
    """16-bit values to 8 bits: round(v * 255 / 65535), in exact integer arithmetic."""
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _scale_int(a: np.ndarray) -> np.ndarray:
    """Integers: read as 16-bit when they fit in 0..65535, else stretch min..max onto 0..255."""
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 65535:
        return _scale_uint16(a)
    if hi == lo:
        return np.zeros(a.shape, dtype=np.uint8)
    # float64 holds int32 exactly; int64 beyond 2**53 loses only bits far below one 8-bit step.
    scaled = (a.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def _scale_float(a: np.ndarray) -> np.ndarray:
    """Floats: [0, 1] when the maximum is <= 1, else 0..255; out-of-range values are clipped."""
    if not np.isfinite(a).all():
        raise FcnsegError(_NONFINITE_MSG)
    a = a.astype(np.float64)
    if a.max() <= 1.0:
        a = a * 255.0
    return np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale one array of channel values (no alpha) to uint8 by its dtype."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16 or (a.dtype.kind == "u" and a.dtype.itemsize == 2):
        return _scale_uint16(a)
    if a.dtype.kind in "iu":
        return _scale_int(a)
    if a.dtype.kind == "f":
        return _scale_float(a)
    raise FcnsegError(f"unsupported image array dtype {a.dtype}; expected uint8, an integer or a float type")


def _grey_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))


# --------------------------------------------------------------------------------------------------
# PIL images and arrays to RGB arrays.


def image_to_array(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to a uint8 ``H x W x 3`` RGB array (no EXIF handling).

    Alpha is dropped, keeping the colour under it (a transparent pixel is not turned black). 16-bit
    grey is scaled by 255/65535; mode ``"I"`` likewise when its values fit in 0..65535, else min-max
    stretched; mode ``"F"`` is read as [0, 1] when its maximum is <= 1, else clipped to 0..255.
    """
    mode = img.mode
    if img.width == 0 or img.height == 0:
        raise FcnsegError(f"image is empty ({img.width}x{img.height}); expected at least one pixel")
    convert = _MODE_TO_RGB.get("I;16" if mode.startswith("I;16") else mode)
    if convert is not None:
        return convert(img)
    # CMYK, YCbCr, LAB, HSV, RGBa and anything else PIL knows how to turn into RGB.
    try:
        return np.array(img.convert("RGB"))
    except (ValueError, OSError):
        raise FcnsegError(f"unsupported image mode {mode!r}; expected a mode PIL can convert to RGB") from None


def _drop_alpha(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.array(img)[:, :, :3])


_MODE_TO_RGB: dict[str, Callable[[Image.Image], np.ndarray]] = {
    "RGB": np.array,
    "RGBA": _drop_alpha,
    "RGBX": _drop_alpha,
    "L": lambda img: _grey_to_rgb(np.array(img)),
    # np.array of a "1" image is bool; white must become 255, not 1.
    "1": lambda img: _grey_to_rgb(np.array(img.convert("L"))),
    "LA": lambda img: _grey_to_rgb(np.array(img)[:, :, 0]),
    # "La" has premultiplied grey; converting to "LA" undoes that, as far as the alpha allows.
    "La": lambda img: _grey_to_rgb(np.array(img.convert("LA"))[:, :, 0]),
    # Through RGBA rather than RGB: PIL warns on P -> RGB with byte transparency, and RGBA keeps the palette colour
    # of transparent pixels, which we want.
    "P": lambda img: _drop_alpha(img.convert("RGBA")),
    "PA": lambda img: _drop_alpha(img.convert("RGBA")),
    # I;16, I;16L, I;16B and I;16N; numpy handles the byte order of the big-endian variant.
    "I;16": lambda img: _grey_to_rgb(_scale_uint16(np.array(img))),
    "I": lambda img: _grey_to_rgb(_scale_int(np.array(img))),
    "F": lambda img: _grey_to_rgb(_scale_float(np.array(img))),
}
"""PIL mode -> its conversion to a uint8 H x W x 3 RGB array (alpha dropped, the colour under it kept)."""


def as_rgb_array(x: PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """Turn a path, a PIL image or a numpy array into a uint8 ``H x W x 3`` RGB array.

    Arrays may be ``H x W``, ``H x W x 1``, ``H x W x 3`` or ``H x W x 4`` (alpha dropped); uint8 is
    taken as is, floats as [0, 1] (or 0..255 when the maximum exceeds 1), uint16 and other integers
    are scaled as in :func:`image_to_array`. A uint8 ``H x W x 3`` array is returned as is, not
    copied.
    """
    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    if isinstance(x, Image.Image):
        return image_to_array(x)
    if not isinstance(x, np.ndarray):
        raise FcnsegError(f"expected an image path, a PIL image or a numpy array, got {type(x).__name__}")
    expected = "expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
    if x.ndim == 3 and x.shape[2] in (1, 3, 4):
        channels = x[:, :, :3] if x.shape[2] == 4 else x
    elif x.ndim == 2:
        channels = x[:, :, None]
    else:
        hint = ""
        if x.ndim == 3 and x.shape[0] in (1, 3, 4):
            hint = " (channels first? move the channel axis last)"
        raise FcnsegError(f"image array has shape {x.shape}; {expected}{hint}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise FcnsegError(f"image array is empty (shape {x.shape}); expected at least one pixel")
    out = _to_uint8(channels)
    if out.shape[2] == 1:
        return _grey_to_rgb(out[:, :, 0])
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------------
# Reading files.


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _decode_error(name: str, what: str, exc: BaseException) -> ImageError:
    """Map whatever PIL raised while decoding to one ImageError line."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else _one_line(exc)
        reason = f"too large: {size}, above PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
    elif isinstance(exc, UnidentifiedImageError):
        reason = f"not an image file in a format read here; expected {_FORMAT_NAMES}"
    elif isinstance(exc, FileNotFoundError):
        reason = "file not found"
    elif isinstance(exc, PermissionError):
        reason = "permission denied"
    elif "truncated" in str(exc):
        reason = "truncated file"
    else:
        reason = f"corrupt image data: {_one_line(exc)}"
    return ImageError(f"{name}: cannot read {what} ({reason})")


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation so the array is as a viewer shows the picture."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        # Damaged metadata should not cost an otherwise readable picture; read it as stored.
        return img
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return img  # the common case: no rotation, and no copy of the pixels
    return ImageOps.exif_transpose(img)


class UnsupportedFormatError(ImageError):
    """An image file in a format outside :data:`IMAGE_FORMATS` (its one-line message names the format)."""


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says: Pillow's format name, width, height and mode (no pixel decoded)."""

    format: str
    width: int
    height: int
    mode: str


def _other_format(path: PathLike) -> str | None:
    """The format outside :data:`IMAGE_FORMATS` whose signature the file's first bytes carry, if any: only each
    plugin's cheap signature test runs, never its parser."""
    Image.init()
    try:
        with open(path, "rb") as f:
            prefix = f.read(16)
    except OSError:
        return None
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name in IMAGE_FORMATS or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # a plugin's test may choke on a short prefix: then it is not that format
            continue
    return None


def _open(path: PathLike, what: str) -> Image.Image:
    """The file opened by Pillow in one of :data:`IMAGE_FORMATS`, its header read and its size checked against
    PIL's decompression-bomb limit; no pixel is decoded yet (the caller closes it)."""
    name = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _decode_error(name, what, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: cannot read {what} (is a folder; expected an image file)")
    if st.st_size == 0:
        raise ImageError(f"{name}: cannot read {what} (empty file)")
    try:
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; the size check below makes that an
        # error with the picture's dimensions in it, so the warning itself is not needed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=IMAGE_FORMATS)
    # PIL raises many exception types on malformed headers (SyntaxError, struct.error, ...).
    except Exception as exc:
        other = _other_format(path) if isinstance(exc, UnidentifiedImageError) else None
        if other:
            raise UnsupportedFormatError(
                f"{name}: cannot read {what} (its format, {other} by its first bytes, is not accepted; expected "
                f"{_FORMAT_NAMES})"
            ) from None
        raise _decode_error(name, what, exc) from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        img.close()
        raise ImageError(
            f"{name}: cannot read {what} (too large: {img.width}x{img.height} = "
            f"{img.width * img.height:,} pixels, above PIL's limit of {limit:,} pixels)"
        )
    if img.format == "JPEG":
        scans = _jpeg_scans(path)
        if scans > MAX_JPEG_SCANS:
            img.close()
            raise ImageError(
                f"{name}: cannot read {what} (a JPEG of {scans:,} scans, above the {MAX_JPEG_SCANS} decoded: such a "
                "file takes minutes to decode; save it again as a baseline JPEG)"
            )
    return img


def _jpeg_scans(path: PathLike) -> int:
    """How many start-of-scan markers (FF DA) the file holds. Entropy-coded data never holds that pair (an FF
    there is followed by 00 or a restart marker), so each is a scan; an embedded thumbnail's count too."""
    count, tail = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            data = tail + chunk
            count += data.count(b"\xff\xda")
            tail = b"\xff" if data.endswith(b"\xff") else b""  # a marker split between two reads
    return count


def probe_image(path: PathLike, what: str = "image") -> ImageHeader:
    """Format, size and mode from the file's header, without decoding its pixels: what a caller checks before it
    commits the memory a decode takes. Raises :class:`ImageError` as :func:`load_image` would for a missing, empty,
    unreadable or oversized file (:class:`UnsupportedFormatError` for a format outside :data:`IMAGE_FORMATS`)."""
    with _open(path, what) as img:
        return ImageHeader(img.format or "", img.width, img.height, img.mode)


def _read(path: PathLike, what: str, convert: Callable[[Image.Image], np.ndarray], upright: bool) -> np.ndarray:
    """Open, fully decode and convert one file, decoding it exactly once."""
    name = os.fspath(path)
    with _open(path, what) as img:
        try:
            # Image.open only reads the header; load() decodes the pixels now, inside the try, so
            # that a truncated or corrupt file fails here rather than later in a conversion.
            img.load()
        except Exception as exc:
            raise _decode_error(name, what, exc) from None
        try:
            return convert(_upright(img) if upright else img)
        except FcnsegError as exc:
            raise ImageError(f"{name}: cannot read {what} ({exc})") from None


def load_image(path: PathLike) -> np.ndarray:
    """Read an image file as a uint8 ``H x W x 3`` RGB array, upright per its EXIF orientation.

    Raises :class:`ImageError` for a missing, empty, truncated, corrupt, non-image or oversized
    file, and :class:`UnsupportedFormatError` for one outside :data:`IMAGE_FORMATS`.
    """
    return _read(path, "image", image_to_array, upright=True)


def _mask_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("P", "L"):
        return np.array(img)
    if img.mode in ("PA", "LA"):
        return np.ascontiguousarray(np.array(img)[:, :, 0])
    if img.mode == "1":
        return np.array(img).astype(np.uint8)
    if img.mode.startswith("I"):
        values = np.array(img)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise FcnsegError(
                f"mask values {values.min()}..{values.max()} do not fit in 0..255; expected class indices 0..255"
            )
        return values.astype(np.uint8)
    raise FcnsegError(f"mask has image mode {img.mode!r}; expected a palette (P) or greyscale (L) PNG of class indices")


def read_mask_png(path: PathLike) -> np.ndarray:
    """Read a mask as a uint8 ``H x W`` array of class indices.

    A palette PNG gives its indices (not the colours), a greyscale PNG its values. EXIF orientation
    is not applied: a label map is stored in the orientation of the pixels it labels.
    """
    return _read(path, "mask", _mask_to_array, upright=False)


# --------------------------------------------------------------------------------------------------
# Depth and HHA images: NYUDv2's, and a fusion net's extra inputs beside its colour images.

DEPTH_MAX_MM = 10_000
"""Depth that the uint8 depth channel's 255 stands for (10 m, beyond the Kinect's range); deeper is clipped."""


def encode_depth(depth_mm: np.ndarray) -> np.ndarray:
    """Millimetres -> uint8: ``round(min(d, DEPTH_MAX_MM) * 255 / DEPTH_MAX_MM)`` (one step is about 39 mm).

    0 (no depth measured) stays 0. Exact integer arithmetic, so the encoding is reproducible bit for bit.
    """
    d = np.clip(np.asarray(depth_mm).astype(np.int64), 0, DEPTH_MAX_MM)
    return ((d * 255 + DEPTH_MAX_MM // 2) // DEPTH_MAX_MM).astype(np.uint8)


def _depth_to_uint8(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode == "I":
        d = np.array(img)
        if d.size and (int(d.min()) < 0 or int(d.max()) > 65535):
            raise FcnsegError(f"depth values {d.min()}..{d.max()} do not fit 16 bits; expected millimetres")
        return encode_depth(d)
    if img.mode == "L":
        return np.array(img)  # 8 bits: taken as encoded already
    raise FcnsegError(f"depth has image mode {img.mode!r}; expected a 16-bit greyscale PNG of millimetres")


def read_depth(path: str | Path) -> np.ndarray:
    """A depth PNG as uint8 H x W: 16-bit millimetres through :func:`encode_depth`; an 8-bit PNG as it is."""
    return _read(path, "depth", _depth_to_uint8, upright=False)


def _find_beside(image: Path, folder: str | Path) -> Path:
    """``folder``'s file of ``image``'s name, else the first of its stem with any suffix."""
    same = Path(folder) / image.name
    found = [same] if same.is_file() else sorted(Path(folder).glob(f"{glob.escape(image.stem)}.*"))
    if not found:
        raise FcnsegError(f"{image}: --extra {folder} holds no {image.stem}.*; expected its depth or HHA image there")
    return found[0]


def read_depth_or_hha(path: str | Path) -> np.ndarray:
    """A fusion net's extra input, H x W x 1 or H x W x 3 uint8: a one-channel image is depth (16-bit millimetres
    through :func:`encode_depth`, 8 bits taken as encoded, as :func:`read_depth`), a colour one is HHA."""
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            depth = im.mode in ("I", "L") or im.mode.startswith("I;16")
    except Exception:
        raise FcnsegError(f"{path}: cannot read it as an image; expected a depth or HHA PNG") from None
    return read_depth(path)[:, :, None] if depth else load_image(path)


def stack_extra_channels(rgb: np.ndarray, image: Path, folders: Sequence[str | Path], channels: int) -> np.ndarray:
    """``rgb`` (H x W x 3, read from ``image``) followed by the same-named depth or HHA image of each of ``folders``
    (:func:`read_depth_or_hha`), as the ``channels`` a fusion net takes. Every problem is an FcnsegError naming the
    file (in ``fcnseg predict --extra``'s words)."""
    parts = [rgb]
    for folder in folders:
        path = _find_beside(image, folder)
        extra = read_depth_or_hha(path)
        if extra.shape[:2] != rgb.shape[:2]:
            raise FcnsegError(f"{path}: is {extra.shape[1]}x{extra.shape[0]} but {image.name} is "
                              f"{rgb.shape[1]}x{rgb.shape[0]}; expected the same size")  # fmt: skip
        parts.append(extra)
    x = np.concatenate(parts, axis=2)
    if x.shape[2] != channels:
        raise FcnsegError(f"{image}: colour and --extra give {x.shape[2]} channels; the model takes {channels}")
    return x


# --------------------------------------------------------------------------------------------------
# Masks, colours and writing files.


def _check_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a mask of shape (H, W), got shape {m.shape}")
    if m.shape[0] == 0 or m.shape[1] == 0:
        raise ValueError(f"mask is empty (shape {m.shape}); expected at least one pixel")
    if m.dtype == np.bool_:
        return m.astype(np.uint8)
    if m.dtype.kind not in "iu":
        raise ValueError(f"expected integer class indices, got a mask of dtype {m.dtype}")
    lo, hi = int(m.min()), int(m.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"mask values must lie in 0..255 (class indices, 255 = void), got {lo}..{hi}")
    return m.astype(np.uint8, copy=False)


def _check_parent(path: PathLike) -> None:
    # atomic_write creates its temporary file beside the target, so a missing folder would otherwise
    # surface as a bare FileNotFoundError from tempfile.
    parent = Path(path).parent
    if not parent.is_dir():
        raise FcnsegError(f"{os.fspath(path)}: cannot write (folder {parent} does not exist)")


def colorize(mask: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """Colour a ``H x W`` class-index mask: uint8 ``H x W x 3``; 255 (void) is 224,224,192."""
    m = _check_mask(mask)
    table = np.asarray(full_palette(colors), dtype=np.uint8).reshape(256, 3)
    return table[m]


def overlay(image_rgb: np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised mask over the image: ``(1 - alpha) * image + alpha * colours``, except where the class
    colour is black (background, :func:`~fcnseg.palette.palette_for`): those pixels keep the image as it is, so an
    image where nothing was found is shown unchanged rather than darkened or washed in a colour."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    img = as_rgb_array(image_rgb)
    col = colorize(mask, colors)
    if img.shape[:2] != col.shape[:2]:
        raise ValueError(f"image is {img.shape[:2]} but mask is {col.shape[:2]}; expected the same H x W")
    tinted = (col != 0).any(axis=2, keepdims=True)
    blend = img.astype(np.float32) * (1.0 - alpha) + col.astype(np.float32) * alpha
    return np.where(tinted, np.rint(blend), img).astype(np.uint8)


def add_legend(rgb: np.ndarray, mask: np.ndarray, colors: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``rgb`` (an overlay) with a legend in its lower left corner: a swatch and the name of each class present in
    ``mask``, largest first, leaving out classes drawn black (background). The text scales with the image; an image
    too small to hold the legend without hiding most of it is returned as it is."""
    from PIL import ImageDraw, ImageFont

    counts = np.bincount(np.asarray(mask, np.int64).ravel(), minlength=len(colors))[: len(colors)]
    shown = [c for c in np.argsort(-counts, kind="stable") if counts[c] and np.any(colors[c] != 0)][:12]
    h, w = rgb.shape[:2]
    size = max(10, round(min(h, w) / 28))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font, no sizes
        font, size = ImageFont.load_default(), 11
    line, pad = round(size * 1.35), max(2, size // 3)
    labels = [names[c] if c < len(names) else f"class {c}" for c in shown]
    width = pad * 3 + size + max((font.getlength(t) for t in labels), default=0)
    height = pad * 2 + line * len(shown)
    if not shown or width > 0.6 * w or height > 0.6 * h:
        return rgb
    img = Image.fromarray(np.ascontiguousarray(rgb[:, :, :3]))
    draw = ImageDraw.Draw(img, "RGBA")
    top = h - height - pad
    draw.rectangle((pad, top, pad + width, top + height), fill=(0, 0, 0, 150))
    for i, (c, label) in enumerate(zip(shown, labels, strict=True)):
        y = top + pad + i * line
        draw.rectangle((2 * pad, y, 2 * pad + size, y + size), fill=tuple(int(v) for v in colors[c]), outline="white")
        draw.text((3 * pad + size, y - size // 8), label, fill="white", font=font)
    return np.asarray(img)


def encode_mask_png(mask: np.ndarray, colors: np.ndarray) -> bytes:
    """A ``H x W`` class-index mask as the bytes of a palette PNG whose pixel values are the indices.

    The palette is :func:`~fcnseg.palette.full_palette` of ``colors`` (void 255 = 224,224,192), so
    the file reads back as indices and shows in colour, like VOC's ``SegmentationClass`` PNGs.
    :func:`save_mask_png` writes these bytes.

    The file is written here rather than by Pillow so that its deflate stream can use zlib's run-length strategy
    (``Z_RLE``, which zlib's manual describes as almost as fast as Huffman coding alone yet better for PNG data):
    label maps are long runs of one index. At 375 x 500 it encoded 2-4x faster than Pillow's default settings, to a
    smaller file for a map of a few regions and a fifth larger for a map of scattered small ones.
    """
    m = _check_mask(mask)
    h, w = m.shape
    rows = np.zeros((h, w + 1), dtype=np.uint8)  # each scanline starts with its filter type: 0, none
    rows[:, 1:] = m
    packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    pixels = packer.compress(rows) + packer.flush()
    # Width, height, 8 bits per index, colour type 3 (palette), deflate, adaptive filters, no interlacing.
    header = struct.pack(">II", w, h) + bytes((8, 3, 0, 0, 0))
    # The stream may span several IDAT chunks; a chunk holds at most 2^31 - 1 bytes (PNG specification, 5.3).
    stream = [(b"IDAT", pixels[i : i + _IDAT_BYTES]) for i in range(0, len(pixels), _IDAT_BYTES)]
    chunks = [(b"IHDR", header), (b"PLTE", bytes(full_palette(colors))), *stream, (b"IEND", b"")]
    return _PNG_SIGNATURE + b"".join(_png_chunk(tag, data) for tag, data in chunks)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IDAT_BYTES = 1 << 20


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, and the CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


_RGB_FORMATS = {"jpeg": "JPEG", "jpg": "JPEG", "png": "PNG"}


def encode_rgb(rgb: PathLike | Image.Image | np.ndarray, format: str, *, full_chroma: bool = False) -> bytes:
    """An RGB image (anything :func:`as_rgb_array` takes) as the bytes of a ``"jpeg"`` (quality 90) or ``"png"``
    file, any case; :func:`save_rgb` writes these bytes. ``full_chroma`` keeps a JPEG's colour at full resolution
    (4:4:4) rather than Pillow's default 4:2:0."""
    name = _RGB_FORMATS.get(format.lower())
    if name is None:
        raise ValueError(f"format {format!r}: expected jpeg or png")
    img = Image.fromarray(as_rgb_array(rgb))
    buf = BytesIO()
    if name == "JPEG":
        img.save(buf, format="JPEG", quality=90, subsampling=0 if full_chroma else -1)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def save_mask_png(path: PathLike, mask: np.ndarray, colors: np.ndarray) -> None:
    """Write a ``H x W`` class-index mask atomically as the palette PNG of :func:`encode_mask_png`."""
    data = encode_mask_png(mask, colors)
    _check_parent(path)
    with atomic_write(path) as f:
        f.write(data)


def save_rgb(path: PathLike, array: np.ndarray) -> None:
    """Write an RGB image atomically: JPEG (quality 90) for ``.jpg``/``.jpeg``, else PNG (:func:`encode_rgb`)."""
    data = encode_rgb(array, "jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "png")
    _check_parent(path)
    with atomic_write(path) as f:
        f.write(data)
