"""Image and mask I/O: PIL modes, EXIF orientation, unreadable files, masks, encoders, atomic writes."""

from __future__ import annotations

import os
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from fcnseg.errors import FcnsegError, ImageError
from fcnseg.imageio import (
    IMAGE_FORMATS,
    ImageHeader,
    UnsupportedFormatError,
    as_rgb_array,
    colorize,
    encode_mask_png,
    encode_rgb,
    image_to_array,
    load_image,
    overlay,
    probe_image,
    read_mask_png,
    save_mask_png,
    save_rgb,
)
from fcnseg.palette import voc_palette
from tests.helpers import pillow_reads_its_ycbcr_tiff, progressive_jpeg

VOID = (224, 224, 192)


def _saved(img: Image.Image, path: Path, expect_mode: str | None = None, **kw) -> Path:
    """Save ``img`` and check that the file reads back in the mode under test."""
    img.save(path, **kw)
    with Image.open(path) as back:
        assert back.mode == (expect_mode or img.mode)
    return path


def _rgb(*values: int) -> list[list[int]]:
    """Grey values as the RGB triples load_image must return."""
    return [[v, v, v] for v in values]


# -------------------------------------------------------------------------------- one test per mode


def test_mode_1(tmp_path):
    img = Image.new("1", (3, 1), 0)
    img.putpixel((1, 0), 255)
    arr = load_image(_saved(img, tmp_path / "bw.png"))
    assert arr.dtype == np.uint8 and arr.shape == (1, 3, 3)
    assert arr[0].tolist() == _rgb(0, 255, 0)


def test_mode_L(tmp_path):
    img = Image.fromarray(np.array([[0, 17, 128, 255]], dtype=np.uint8))
    assert load_image(_saved(img, tmp_path / "grey.png", "L"))[0].tolist() == _rgb(0, 17, 128, 255)


def test_mode_LA_drops_alpha_keeps_grey(tmp_path):
    la = np.array([[[200, 0], [50, 255], [9, 128]]], dtype=np.uint8)
    img = Image.fromarray(la)
    assert img.mode == "LA"
    assert load_image(_saved(img, tmp_path / "la.png"))[0].tolist() == _rgb(200, 50, 9)


def _palette_image() -> Image.Image:
    img = Image.frombytes("P", (3, 1), bytes([0, 1, 2]))
    img.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90])
    return img


def test_mode_P(tmp_path):
    arr = load_image(_saved(_palette_image(), tmp_path / "pal.png"))
    assert arr[0].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]


def test_mode_P_with_transparent_index(tmp_path):
    path = _saved(_palette_image(), tmp_path / "pal_t.png", transparency=1)
    with Image.open(path) as back:
        assert back.info.get("transparency") == 1
    # The transparent pixel keeps its palette colour: alpha is dropped, not composited over black.
    assert load_image(path)[0].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]


def test_mode_P_with_per_entry_alpha(tmp_path):
    path = _saved(_palette_image(), tmp_path / "pal_a.png", transparency=bytes([255, 0, 100]))
    assert load_image(path)[0].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]


def test_mode_PA_in_memory():
    img = _palette_image().convert("PA")
    assert img.mode == "PA"
    assert image_to_array(img)[0].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]


def test_mode_RGB(tmp_path):
    rgb = np.array([[[1, 2, 3], [250, 128, 0]]], dtype=np.uint8)
    arr = load_image(_saved(Image.fromarray(rgb), tmp_path / "rgb.png", "RGB"))
    np.testing.assert_array_equal(arr, rgb)


def test_mode_RGBA_drops_alpha_keeps_color(tmp_path):
    rgba = np.array([[[200, 100, 50, 0], [1, 2, 3, 255]]], dtype=np.uint8)
    arr = load_image(_saved(Image.fromarray(rgba), tmp_path / "rgba.png", "RGBA"))
    assert arr[0].tolist() == [[200, 100, 50], [1, 2, 3]]


def test_mode_CMYK_tiff(tmp_path):
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [200, 100, 50, 0], [0, 0, 0, 255]]], np.uint8)
    img = Image.frombytes("CMYK", (4, 1), cmyk.tobytes())
    arr = load_image(_saved(img, tmp_path / "cmyk.tif"))
    # With K = 0 every CMYK -> RGB rule PIL has used gives 255 - C, 255 - M, 255 - Y.
    assert arr[0].tolist() == [[255, 255, 255], [0, 255, 255], [55, 155, 205], [0, 0, 0]]


def test_mode_CMYK_jpeg(tmp_path):
    img = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    img.paste((255, 0, 0, 0), (16, 0, 32, 16))  # right half cyan
    arr = load_image(_saved(img, tmp_path / "cmyk.jpg", quality=95)).astype(int)
    assert arr.shape == (16, 32, 3)
    assert np.abs(arr[8, 4] - [255, 255, 255]).max() <= 4
    assert np.abs(arr[8, 27] - [0, 255, 255]).max() <= 4


def test_mode_YCbCr_tiff(tmp_path):
    ycc = np.array([[[255, 128, 128], [0, 128, 128], [128, 128, 128], [76, 85, 255]]], np.uint8)
    img = Image.frombytes("YCbCr", (4, 1), ycc.tobytes())
    expected = np.array([[255, 255, 255], [0, 0, 0], [128, 128, 128], [254, 0, 0]])
    assert np.abs(image_to_array(img).astype(int)[0] - expected).max() <= 1  # the conversion, in memory
    if not pillow_reads_its_ycbcr_tiff():
        pytest.skip("this Pillow cannot read back the YCbCr TIFF it writes")
    arr = load_image(_saved(img, tmp_path / "ycc.tif")).astype(int)
    assert np.abs(arr[0] - expected).max() <= 1


def test_mode_I16_png(tmp_path):
    values = np.array([[0, 257, 257 * 100, 65535, 1000]], dtype=np.uint16)
    img = Image.frombytes("I;16", (5, 1), values.astype("<u2").tobytes())
    arr = load_image(_saved(img, tmp_path / "deep.png"))
    # 257 * k -> k exactly; 1000 * 255 / 65535 = 3.89 -> 4.
    assert arr[0].tolist() == _rgb(0, 1, 100, 255, 4)


def test_mode_I16B_tiff(tmp_path):
    values = np.array([[65535, 257 * 3, 0]], dtype=np.uint16)
    img = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    arr = load_image(_saved(img, tmp_path / "deep_be.tif"))
    assert arr[0].tolist() == _rgb(255, 3, 0)


def test_mode_I_in_16bit_range_tiff(tmp_path):
    img = Image.fromarray(np.array([[0, 257 * 7, 65535]], dtype=np.int32))
    assert img.mode == "I"
    assert load_image(_saved(img, tmp_path / "int.tif"))[0].tolist() == _rgb(0, 7, 255)


def test_mode_I_outside_16bit_range_is_min_max_scaled(tmp_path):
    img = Image.fromarray(np.array([[-100, 0, 300]], dtype=np.int32))
    # (0 + 100) * 255 / 400 = 63.75 -> 64
    assert load_image(_saved(img, tmp_path / "signed.tif", "I"))[0].tolist() == _rgb(0, 64, 255)


def test_mode_F_unit_range(tmp_path):
    img = Image.fromarray(np.array([[0.0, 0.25, 1.0, 0.5]], dtype=np.float32))
    assert img.mode == "F"
    assert load_image(_saved(img, tmp_path / "unit.tif"))[0].tolist() == _rgb(0, 64, 255, 128)


def test_mode_F_above_one_is_clipped_to_255(tmp_path):
    img = Image.fromarray(np.array([[-5.0, 10.4, 300.0, 254.6]], dtype=np.float32))
    assert load_image(_saved(img, tmp_path / "big.tif", "F"))[0].tolist() == _rgb(0, 10, 255, 255)


def test_mode_F_nan_is_an_image_error(tmp_path):
    img = Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32))
    path = _saved(img, tmp_path / "nan.tif", "F")
    with pytest.raises(ImageError, match="nan.tif.*NaN or inf"):
        load_image(path)


def test_other_modes_convert_in_memory():
    assert image_to_array(Image.new("HSV", (1, 1), (0, 0, 255)))[0, 0].tolist() == [255, 255, 255]
    assert image_to_array(Image.new("RGBX", (1, 1), (7, 8, 9, 0)))[0, 0].tolist() == [7, 8, 9]


def test_result_is_writable_and_contiguous(tmp_path):
    img = Image.fromarray(np.zeros((4, 5, 4), np.uint8))
    arr = load_image(_saved(img, tmp_path / "a.png", "RGBA"))
    assert arr.flags.writeable and arr.flags.c_contiguous


# --------------------------------------------------------------------------------- EXIF orientation


def _corner_image() -> Image.Image:
    """64 wide x 32 high, blue, with a red 16 x 16 block in the stored top-left corner."""
    img = Image.new("RGB", (64, 32), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    return img


def _with_orientation(img: Image.Image, path: Path, orientation: int, **kw) -> Path:
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, **kw)
    with Image.open(path) as back:
        assert back.getexif().get(0x0112) == orientation
    return path


def _is(pixel: np.ndarray, rgb: tuple[int, int, int], tol: int) -> bool:
    return int(np.abs(pixel.astype(int) - rgb).max()) <= tol


@pytest.mark.parametrize("suffix,tol", [(".png", 0), (".jpg", 12)])
def test_exif_orientation_6_rotates_clockwise(tmp_path, suffix, tol):
    # Orientation 6: the stored top row is the viewer's right side, so the top-left corner goes
    # top-right.
    arr = load_image(_with_orientation(_corner_image(), tmp_path / f"o6{suffix}", 6, quality=95))
    assert arr.shape == (64, 32, 3)
    assert _is(arr[4, 27], (255, 0, 0), tol)
    assert _is(arr[4, 4], (0, 0, 255), tol)
    assert _is(arr[59, 27], (0, 0, 255), tol)
    if tol == 0:
        assert (arr[:16, 16:] == [255, 0, 0]).all() and (arr[16:] == [0, 0, 255]).all()


@pytest.mark.parametrize("suffix,tol", [(".png", 0), (".jpg", 12)])
def test_exif_orientation_8_rotates_counter_clockwise(tmp_path, suffix, tol):
    # Orientation 8: the stored top row is the viewer's left side, so the top-left corner goes
    # bottom-left.
    arr = load_image(_with_orientation(_corner_image(), tmp_path / f"o8{suffix}", 8, quality=95))
    assert arr.shape == (64, 32, 3)
    assert _is(arr[59, 4], (255, 0, 0), tol)
    assert _is(arr[4, 4], (0, 0, 255), tol)
    assert _is(arr[59, 27], (0, 0, 255), tol)
    if tol == 0:
        assert (arr[48:, :16] == [255, 0, 0]).all() and (arr[:48] == [0, 0, 255]).all()


def test_exif_orientation_1_is_left_alone(tmp_path):
    arr = load_image(_with_orientation(_corner_image(), tmp_path / "o1.png", 1))
    assert arr.shape == (32, 64, 3) and (arr[:16, :16] == [255, 0, 0]).all()


# --------------------------------------------------------------------------------- unreadable files


def _noise_bytes(fmt: str) -> bytes:
    # Noise does not compress, so cutting the file in half really removes pixel data.
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = Path(tempfile.mkdtemp()) / f"noise.{fmt.lower()}"
    img.save(path, fmt)
    data = path.read_bytes()
    path.unlink()
    path.parent.rmdir()
    return data


def _expect_image_error(path: Path, reason: str, reader=load_image) -> str:
    with pytest.raises(ImageError) as info:
        reader(path)
    msg = str(info.value)
    assert path.name in msg, msg
    assert reason in msg, msg
    assert "\n" not in msg
    assert isinstance(info.value, FcnsegError)
    return msg


def test_missing_file(tmp_path):
    _expect_image_error(tmp_path / "nothere.jpg", "file not found")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    _expect_image_error(path, "empty file")


def test_folder_with_image_name(tmp_path):
    path = tmp_path / "folder.png"
    path.mkdir()
    _expect_image_error(path, "is a folder")


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_file(tmp_path, fmt, suffix):
    data = _noise_bytes(fmt)
    path = tmp_path / f"photo{suffix}"
    path.write_bytes(data[: len(data) // 2])
    msg = _expect_image_error(path, "truncated file")
    assert msg == f"{path}: cannot read image (truncated file)"


def test_corrupt_png_data(tmp_path):
    data = bytearray(_noise_bytes("PNG"))
    data[200:400] = bytes(200)  # damage the compressed stream but keep the length
    path = tmp_path / "damaged.png"
    path.write_bytes(bytes(data))
    _expect_image_error(path, "cannot read image (")


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    _expect_image_error(path, "not an image file")


@pytest.mark.parametrize("side", [40, 64])
def test_decompression_bomb(tmp_path, monkeypatch, side):
    # 40 x 40 = 1,600 pixels is in PIL's warning band (limit..2 x limit); 64 x 64 = 4,096 is past
    # its error threshold. Both must be errors naming the size.
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    msg = _expect_image_error(path, "too large")
    assert f"{side * side:,} pixels" in msg and "1,000" in msg
    if side == 40:
        assert "40x40" in msg


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM"])
def test_the_accepted_formats_read_and_probe(tmp_path, fmt):
    path = _saved(Image.new("RGB", (5, 3), (200, 10, 10)), tmp_path / f"red.{fmt.lower()}", "P" if fmt == "GIF" else
                  None, format=fmt)  # fmt: skip
    assert load_image(path).shape == (3, 5, 3)
    assert probe_image(path) == ImageHeader(fmt, 5, 3, "P" if fmt == "GIF" else "RGB")


@pytest.mark.parametrize(("fmt", "named"), [("PCX", "PCX"), ("ICO", "ICO"), ("SGI", "SGI"), ("DDS", "DDS")])
def test_other_formats_are_refused_from_their_first_bytes(tmp_path, monkeypatch, fmt, named):
    """Pillow decodes these; the readers refuse them without running their plugins' parsers."""
    path = tmp_path / f"picture.{fmt.lower()}"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path, format=fmt)
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(k.get("formats")) or _real_open(*a, **k))
    for reader, what in ((load_image, "image"), (read_mask_png, "mask"), (probe_image, "image")):
        with pytest.raises(UnsupportedFormatError) as info:
            reader(path)
        assert str(info.value) == (f"{path}: cannot read {what} (its format, {named} by its first bytes, is not "
                                   "accepted; expected PNG, JPEG, BMP, TIFF, WebP, GIF or PPM)")  # fmt: skip
    assert opened == [IMAGE_FORMATS] * 3  # Pillow was only ever asked for the accepted formats


def test_eps_never_reaches_ghostscript(tmp_path):
    path = tmp_path / "logo.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    msg = _expect_image_error(path, "its format, EPS by its first bytes, is not accepted")
    assert isinstance(_raised(load_image, path), UnsupportedFormatError), msg


def test_a_png_mask_and_a_tiff_image_still_read(tmp_path):
    """Datasets' masks are PNG and read as they were; their images may be TIFF."""
    mask = np.array([[0, 1], [255, 2]], np.uint8)
    save_mask_png(tmp_path / "m.png", mask, voc_palette(3))
    np.testing.assert_array_equal(read_mask_png(tmp_path / "m.png"), mask)
    Image.fromarray(np.full((2, 3), 7, np.uint8)).save(tmp_path / "g.tif")
    assert load_image(tmp_path / "g.tif").tolist() == [[[7, 7, 7]] * 3] * 2


def _raised(reader, path: Path) -> BaseException:
    with pytest.raises(ImageError) as info:
        reader(path)
    return info.value


_real_open = Image.open


def test_each_file_decoded_once(tmp_path, monkeypatch):
    path = tmp_path / "once.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    calls = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        calls.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    assert load_image(path)[0, 0].tolist() == [1, 2, 3]
    assert len(calls) == 1


# ------------------------------------------------------------------------------------- as_rgb_array


def test_as_rgb_array_uint8_shapes():
    grey = np.array([[0, 9], [200, 255]], dtype=np.uint8)
    expected = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(as_rgb_array(grey), expected)
    np.testing.assert_array_equal(as_rgb_array(grey[:, :, None]), expected)
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(as_rgb_array(rgb), rgb)
    rgba = np.concatenate([rgb, np.zeros((2, 2, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(as_rgb_array(rgba), rgb)


def test_as_rgb_array_floats_and_other_dtypes():
    assert as_rgb_array(np.array([[0.0, 0.5, 1.0]]))[0, :, 0].tolist() == [0, 128, 255]
    assert as_rgb_array(np.array([[-1.0, 0.2]], np.float32))[0, :, 0].tolist() == [0, 51]
    assert as_rgb_array(np.array([[2.0, 100.4, 999.0]]))[0, :, 0].tolist() == [2, 100, 255]
    assert as_rgb_array(np.array([[0, 257 * 9, 65535]], np.uint16))[0, :, 0].tolist() == [0, 9, 255]
    assert as_rgb_array(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]
    assert as_rgb_array(np.array([[-100, 0, 300]], np.int64))[0, :, 0].tolist() == [0, 64, 255]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_as_rgb_array_rejects_nonfinite(bad):
    x = np.zeros((2, 2, 3), np.float32)
    x[1, 1, 2] = bad
    with pytest.raises(FcnsegError, match="image array contains NaN or inf values"):
        as_rgb_array(x)


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), (2, 2, 5), (1, 2, 2, 3)])
def test_as_rgb_array_rejects_bad_shapes(shape):
    with pytest.raises(FcnsegError, match=r"expected shape \(H, W\), \(H, W, 1\)"):
        as_rgb_array(np.zeros(shape, np.uint8))


def test_as_rgb_array_hints_at_channels_first():
    with pytest.raises(FcnsegError, match="channels first"):
        as_rgb_array(np.zeros((3, 8, 8), np.float32))


def test_as_rgb_array_rejects_empty_and_other_types():
    with pytest.raises(FcnsegError, match="empty"):
        as_rgb_array(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(FcnsegError, match="expected an image path, a PIL image or a numpy array"):
        as_rgb_array([[1, 2], [3, 4]])


def test_as_rgb_array_path_and_pil(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (3, 2), (5, 6, 7)).save(path)
    assert as_rgb_array(path).shape == (2, 3, 3)
    assert as_rgb_array(str(path))[1, 2].tolist() == [5, 6, 7]
    assert as_rgb_array(Image.new("L", (2, 2), 44))[0, 0].tolist() == [44, 44, 44]


# -------------------------------------------------------------------------------- masks and colours


def test_save_read_mask_round_trip(tmp_path):
    mask = np.array([[0, 1, 2, 20], [15, 255, 0, 7]], dtype=np.int64)
    colors = voc_palette(21)
    path = tmp_path / "mask.png"
    save_mask_png(path, mask, colors)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "P"
        np.testing.assert_array_equal(np.array(img), mask)
        pal = np.array(img.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(pal[:21], colors)
    assert tuple(pal[255]) == VOID
    back = read_mask_png(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)
    # Seen as a picture, the same file shows the colours.
    assert load_image(path)[1, 1].tolist() == list(VOID)
    assert load_image(path)[0, 1].tolist() == [128, 0, 0]


@settings(max_examples=25, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9))))
def test_mask_round_trip_any_values(mask):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.png"
        save_mask_png(path, mask, voc_palette(256))
        np.testing.assert_array_equal(read_mask_png(path), mask)


def test_read_mask_png_greyscale_and_rejects_rgb(tmp_path):
    grey = np.array([[0, 3], [255, 40]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_mask_png(tmp_path / "grey.png"), grey)
    Image.new("RGB", (2, 2)).save(tmp_path / "colour.png")
    _expect_image_error(tmp_path / "colour.png", "expected a palette (P) or greyscale (L)", read_mask_png)
    _expect_image_error(tmp_path / "absent.png", "cannot read mask (file not found)", read_mask_png)


@pytest.mark.parametrize(
    "mask,match",
    [
        (np.array([[0, 256]]), r"0\.\.255"),
        (np.array([[-1, 0]]), r"0\.\.255"),
        (np.array([[0.0, 1.0]]), "integer class indices"),
        (np.zeros((2, 2, 1), np.uint8), r"shape \(H, W\)"),
    ],
)
def test_save_mask_png_rejects_bad_masks(tmp_path, mask, match):
    with pytest.raises(ValueError, match=match):
        save_mask_png(tmp_path / "bad.png", mask, voc_palette(21))
    assert list(tmp_path.iterdir()) == []


def test_colorize():
    colors = np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8)
    out = colorize(np.array([[0, 1], [255, 7]]), colors)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out.tolist() == [[[10, 20, 30], [40, 50, 60]], [list(VOID), [0, 0, 0]]]


def test_overlay():
    image = np.full((1, 2, 3), 100, np.uint8)
    colors = np.array([[0, 0, 0], [200, 50, 101]], dtype=np.uint8)
    mask = np.array([[0, 1]])
    # A black class (background) leaves its pixels as they are; the others are blended half and half.
    assert overlay(image, mask, colors).tolist() == [[[100, 100, 100], [150, 75, 100]]]
    np.testing.assert_array_equal(overlay(image, mask, colors, alpha=0.0), image)
    assert overlay(image, mask, colors, alpha=1.0).tolist() == [[[100, 100, 100], [200, 50, 101]]]
    nothing_found = np.zeros((1, 2), np.uint8)
    np.testing.assert_array_equal(overlay(image, nothing_found, colors), image)
    with pytest.raises(ValueError, match="same H x W"):
        overlay(image, np.zeros((2, 2), np.uint8), colors)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, mask, colors, alpha=1.5)


def test_save_rgb_png_and_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, 8:] = (200, 30, 60)
    save_rgb(tmp_path / "out.png", rgb)
    save_rgb(tmp_path / "out.jpg", rgb)
    save_rgb(tmp_path / "OUT.JPEG", rgb)
    with Image.open(tmp_path / "out.png") as img:
        assert img.format == "PNG"
    np.testing.assert_array_equal(load_image(tmp_path / "out.png"), rgb)
    for name in ("out.jpg", "OUT.JPEG"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "JPEG"
        back = load_image(tmp_path / name).astype(int)
        assert np.abs(back[8, 2] - [0, 0, 0]).max() <= 6
        assert np.abs(back[8, 13] - [200, 30, 60]).max() <= 6


# ------------------------------------------------------------------------------------ encoders


@pytest.mark.parametrize("classes", [2, 21, 256])
def test_encoded_mask_decodes_to_its_indices_and_palette_and_is_the_file_written(tmp_path, classes):
    rng = np.random.default_rng(classes)
    mask = rng.integers(0, classes, (13, 17)).astype(np.uint8)
    mask[0, :3] = 255
    colors = voc_palette(classes)
    data = encode_mask_png(mask, colors)
    with Image.open(BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "P"
        np.testing.assert_array_equal(np.array(img), mask)
        palette = np.array(img.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:classes], colors)  # 256 colours: the last one wins over void
    assert tuple(palette[255]) == (VOID if classes < 256 else tuple(colors[255]))
    save_mask_png(tmp_path / "m.png", mask.astype(np.int64), colors)
    assert (tmp_path / "m.png").read_bytes() == data
    np.testing.assert_array_equal(read_mask_png(tmp_path / "m.png"), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 700), (375, 500), (900, 3)])
def test_encoded_mask_is_read_by_libpng_with_its_colours(shape):
    """OpenCV decodes with libpng, which checks every chunk's CRC and the deflate stream, and expands the palette:
    each pixel must come back as its class's colour (BGR)."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(shape[0])
    mask = rng.integers(0, 21, shape).astype(np.uint8)
    mask[: shape[0] // 2, : shape[1] // 3] = 7  # a run longer than a scanline's
    colors = voc_palette(21)
    bgr = cv2.imdecode(np.frombuffer(encode_mask_png(mask, colors), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(bgr[:, :, ::-1], colors[mask])


def test_a_mask_stream_spread_over_several_idat_chunks_reads_back(monkeypatch):
    import fcnseg.imageio

    monkeypatch.setattr(fcnseg.imageio, "_IDAT_BYTES", 100)  # as a mask of gigapixels would be split
    mask = np.random.default_rng(0).integers(0, 21, (120, 90)).astype(np.uint8)
    data = encode_mask_png(mask, voc_palette(21))
    tags, at = [], 8
    while at < len(data):  # walk the chunks: 4-byte length, 4-byte type, data, 4-byte CRC
        length = int.from_bytes(data[at : at + 4], "big")
        tags.append(data[at + 4 : at + 8])
        at += 12 + length
    assert tags[:2] == [b"IHDR", b"PLTE"] and tags[-1] == b"IEND" and len(tags) > 10
    assert set(tags[2:-1]) == {b"IDAT"}
    np.testing.assert_array_equal(np.array(Image.open(BytesIO(data))), mask)


def test_encoded_mask_of_regions_is_compressed():
    """A label map of a few regions (what a trained model predicts) takes about a kilobyte besides the 768-byte
    palette: a stream stored without compression, or coded without repeats, would take 24 KB or more."""
    mask = np.zeros((375, 500), np.uint8)
    mask[100:300, 150:400] = 15
    mask[50:120, 20:90] = 8
    data = encode_mask_png(mask, voc_palette(21))
    with Image.open(BytesIO(data)) as img:
        img.verify()  # every chunk's CRC
    np.testing.assert_array_equal(np.array(Image.open(BytesIO(data))), mask)
    assert len(data) < 3000


def test_encoded_mask_refuses_what_save_mask_png_refuses():
    with pytest.raises(ValueError, match=r"0\.\.255"):
        encode_mask_png(np.array([[0, 256]]), voc_palette(21))


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "png"), (".jpg", "jpeg"), (".JPEG", "JPG"), (".bmp", "PNG")])
def test_encoded_rgb_is_the_file_save_rgb_writes(tmp_path, suffix, fmt):
    rgb = np.random.default_rng(1).integers(0, 256, (9, 14, 3)).astype(np.uint8)
    save_rgb(tmp_path / f"out{suffix}", rgb)
    data = encode_rgb(rgb, fmt)
    assert (tmp_path / f"out{suffix}").read_bytes() == data
    with Image.open(BytesIO(data)) as img:
        assert img.format == ("PNG" if fmt.lower() == "png" else "JPEG") and img.size == (14, 9)
        if img.format == "PNG":
            np.testing.assert_array_equal(np.array(img), rgb)


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as img:
        return np.array(img.convert("RGB"))


def test_encode_rgb_full_chroma_and_unknown_formats():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[::2, ::2] = (255, 0, 0)  # colour detail that 4:2:0 averages away
    halved, full = encode_rgb(rgb, "jpeg"), encode_rgb(rgb, "jpeg", full_chroma=True)
    assert halved != full
    error = [np.abs(_decoded(d).astype(int) - rgb).mean() for d in (halved, full)]
    assert error[1] < error[0]
    with pytest.raises(ValueError, match="expected jpeg or png"):
        encode_rgb(rgb, "gif")


def test_writing_into_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(FcnsegError, match="does not exist"):
        save_rgb(tmp_path / "nope" / "x.png", np.zeros((2, 2, 3), np.uint8))


# ------------------------------------------------------------------------------------ atomic writes


def test_writes_leave_no_temp_files(tmp_path):
    save_mask_png(tmp_path / "a.png", np.zeros((3, 3), np.uint8), voc_palette(21))
    save_mask_png(tmp_path / "a.png", np.ones((3, 3), np.uint8), voc_palette(21))  # overwrite
    save_rgb(tmp_path / "b.jpg", np.zeros((3, 3, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.jpg"]
    assert read_mask_png(tmp_path / "a.png").tolist() == [[1, 1, 1]] * 3


@pytest.mark.parametrize("writer", ["mask", "rgb"])
def test_failed_write_keeps_existing_file(tmp_path, monkeypatch, writer):
    target = tmp_path / "keep.png"
    save_mask_png(target, np.full((2, 2), 3, np.uint8), voc_palette(21))
    before = target.read_bytes()

    def failing_sync(fd):  # the new bytes are in the temporary file; the disk fills before they reach it
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_sync)
    with pytest.raises(OSError, match="disk full"):
        if writer == "mask":
            save_mask_png(target, np.zeros((2, 2), np.uint8), voc_palette(21))
        else:
            save_rgb(target, np.zeros((2, 2, 3), np.uint8))
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.png"]
    assert read_mask_png(target).tolist() == [[3, 3], [3, 3]]


def test_overlay_legend_lists_the_classes_present_largest_first():
    from fcnseg.imageio import add_legend

    rgb = np.full((300, 400, 3), 128, np.uint8)
    mask = np.zeros((300, 400), np.uint8)  # background (black: not listed)
    mask[:, 200:] = 2  # the largest class shown
    mask[:40, :40] = 1
    colors = np.array([[0, 0, 0], [250, 20, 20], [20, 250, 20], [20, 20, 250]], np.uint8)  # class 3 absent
    out = add_legend(rgb, mask, colors, ["background", "cat", "dog", "car"])
    changed = np.argwhere((out != rgb).any(axis=2))
    assert changed[:, 0].min() > 300 * 0.4 and changed[:, 1].max() < 400 * 0.6  # only the lower left corner
    swatches = [tuple(c) for c in colors.tolist()]
    rows = {}  # the first row where each class colour appears exactly, inside the legend
    for y, x in changed:
        rows.setdefault(tuple(out[y, x].tolist()), y)
    assert swatches[2] in rows and swatches[1] in rows and swatches[3] not in rows
    assert rows[swatches[2]] < rows[swatches[1]]  # dog (more pixels) above cat
    tiny = np.full((40, 50, 3), 128, np.uint8)  # too small to hold a legend: left alone
    np.testing.assert_array_equal(add_legend(tiny, mask[:40, :50], colors, ["background", "cat", "dog", "car"]), tiny)


def _sos_markers(data: bytes) -> int:
    """Start-of-scan markers counted by walking the JPEG's segments (an oracle apart from fcnseg's byte count):
    each marker segment is skipped by its length; after SOS the entropy-coded data runs to the next marker that is
    not a stuffed 00 or a restart marker (D0-D7)."""
    assert data[:2] == b"\xff\xd8"
    i, scans = 2, 0
    while i < len(data):
        assert data[i] == 0xFF, i
        marker = data[i + 1]
        if marker == 0xD9:  # end of image
            return scans
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        i += 2 + length
        if marker == 0xDA:
            scans += 1
            while not (data[i] == 0xFF and data[i + 1] not in (0x00, *range(0xD0, 0xD8))):
                i += 1
    return scans


def test_a_jpeg_of_too_many_scans_is_refused_from_its_bytes_before_decoding(tmp_path):
    from fcnseg.imageio import MAX_JPEG_SCANS, _jpeg_scans

    normal = tmp_path / "normal.jpg"
    normal.write_bytes(progressive_jpeg())
    scans = _sos_markers(normal.read_bytes())
    assert 2 < scans <= 12 and _jpeg_scans(normal) == scans  # libjpeg's progression: about 10
    assert load_image(normal).shape == (48, 64, 3)
    edge = tmp_path / "edge.jpg"
    edge.write_bytes(progressive_jpeg(MAX_JPEG_SCANS))  # exactly the limit: still read
    assert _sos_markers(edge.read_bytes()) == MAX_JPEG_SCANS and load_image(edge).shape == (48, 64, 3)
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(progressive_jpeg(MAX_JPEG_SCANS + 1))
    assert _sos_markers(bomb.read_bytes()) == MAX_JPEG_SCANS + 1 and bomb.stat().st_size < 100_000
    for read in (load_image, probe_image):
        with pytest.raises(ImageError) as e:
            read(bomb)
        assert str(e.value) == (
            f"{bomb}: cannot read image (a JPEG of {MAX_JPEG_SCANS + 1} scans, above the {MAX_JPEG_SCANS} decoded: "
            "such a file takes minutes to decode; save it again as a baseline JPEG)"
        )


def test_scan_markers_split_between_two_reads_are_counted_once(tmp_path):
    from fcnseg.imageio import _jpeg_scans

    path = tmp_path / "x"
    # One marker straddling the first 1 MiB read, one inside the second, and an FF ending the first read that
    # starts no marker.
    path.write_bytes(
        b"\0" * ((1 << 20) - 1) + b"\xff\xda" + b"\0" * 5 + b"\xff\xda" + b"\0" * ((1 << 20) - 12) + b"\xff\x00"
    )
    assert path.stat().st_size > 1 << 20 and _jpeg_scans(path) == 2
    path.write_bytes(b"\0" * ((1 << 20) - 1) + b"\xff" + b"\x00\xda")
    assert _jpeg_scans(path) == 0
