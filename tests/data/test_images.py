"""Image decoding, conversion, resizing and folder listing (gaikan.data.images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gaikan.data.images import (
    IMAGE_SUFFIXES,
    list_images,
    read_image,
    read_mask,
    resize,
    resize_mask,
    to_float01,
    to_gray,
    to_rgb,
)
from gaikan.errors import DataError, ImageReadError


def ramp_gray(h=20, w=30) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


def ramp_rgb(h=20, w=30) -> np.ndarray:
    g = ramp_gray(h, w)
    return np.stack([g, 255 - g, (g // 2) + 10], axis=2).astype(np.uint8)


# ---- read_image: formats and modes --------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_gray_lossless_formats(tmp_path, suffix):
    arr = ramp_gray()
    path = tmp_path / f"a{suffix}"
    Image.fromarray(arr).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff"])
def test_rgb_lossless_formats(tmp_path, suffix):
    arr = ramp_rgb()
    path = tmp_path / f"a{suffix}"
    Image.fromarray(arr).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, arr)


def test_rgba_is_composited_on_black(tmp_path):
    rgb = ramp_rgb(8, 8)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, 2:4] = 255
    alpha[:, 4:6] = 128
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert np.all(out[:, :2] == 0)  # transparent -> black
    np.testing.assert_array_equal(out[:, 2:4], rgb[:, 2:4])  # opaque -> unchanged
    expected = np.round(rgb[:, 4:6].astype(float) * 128 / 255).astype(np.uint8)
    np.testing.assert_array_equal(out[:, 4:6], expected)


def test_gray_alpha_gives_gray(tmp_path):
    g = np.full((8, 8), 200, np.uint8)
    a = np.full((8, 8), 255, np.uint8)
    a[0] = 0
    img = Image.fromarray(np.dstack([g, a]))
    assert img.mode == "LA"
    img.save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out.shape == (8, 8) and out.dtype == np.uint8
    assert np.all(out[0] == 0) and np.all(out[1:] == 200)


def test_palette_colour_and_gray(tmp_path):
    idx = (np.arange(64).reshape(8, 8) % 3).astype(np.uint8)
    colour = Image.new("P", (8, 8))
    colour.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 9))
    colour.putdata(idx.ravel().tolist())
    colour.save(tmp_path / "colour.png")
    out = read_image(tmp_path / "colour.png")
    assert out.shape == (8, 8, 3)
    table = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    np.testing.assert_array_equal(out, table[idx])

    gray = Image.new("P", (8, 8))
    gray.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    gray.putdata(idx.ravel().tolist())
    gray.save(tmp_path / "gray.png")
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (8, 8) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, 255 - idx)


def test_bilevel_gives_0_255(tmp_path):
    arr = np.zeros((8, 16), bool)
    arr[2:5, 3:9] = True
    Image.fromarray(arr).save(tmp_path / "b.png")
    out = read_image(tmp_path / "b.png")
    assert out.dtype == np.uint8 and out.shape == (8, 16)
    np.testing.assert_array_equal(out, arr.astype(np.uint8) * 255)


def test_16bit_png_fixed_scale_not_min_max(tmp_path):
    arr = np.linspace(1000, 2000, 24 * 16).reshape(24, 16).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (24, 16)
    np.testing.assert_allclose(out, arr / 65535.0, rtol=1e-6)
    assert out.max() < 0.05  # no per-image stretching


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_tiff(tmp_path, mode):
    arr = np.array([[0, 1, 256, 65535], [300, 40000, 12345, 7]] * 4, dtype=np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    img = Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.astype(dtype).tobytes())
    img.save(tmp_path / "a.tif")
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == np.float32 and out.shape == arr.shape
    np.testing.assert_allclose(out, arr / 65535.0, rtol=1e-6)


def test_float_tiff_kept_and_out_of_range_refused(tmp_path):
    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(arr).save(tmp_path / "f.tif")
    out = read_image(tmp_path / "f.tif")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)
    Image.fromarray(arr * 4095).save(tmp_path / "big.tif")
    with pytest.raises(ImageReadError, match=r"big\.tif.*expected \[0, 1\]"):
        read_image(tmp_path / "big.tif")


def test_jpeg_gray_and_rgb(tmp_path):
    yy, xx = np.mgrid[0:32, 0:48]
    smooth = (xx * 4 + yy).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "g.jpg", quality=95)
    out = read_image(tmp_path / "g.jpg")
    assert out.shape == (32, 48) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - smooth).mean() < 3
    rgb = np.dstack([smooth, smooth // 2, 255 - smooth])
    Image.fromarray(rgb).save(tmp_path / "c.JPEG", quality=95)
    out = read_image(tmp_path / "c.JPEG")
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20), np.uint8)
    arr[:, :5] = 255  # bright left band
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (20, 10)
    assert out[:5].mean() > 200 and out[10:].mean() < 50  # left band is now on top


def test_cmyk_gives_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    out = read_image(tmp_path / "c.tif")
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


# ---- read_image: failures ------------------------------------------------------------------------


def test_truncated_png_raises_naming_file(tmp_path):
    path = tmp_path / "cut.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "\n" not in message


def test_truncated_jpeg_raises(tmp_path):
    path = tmp_path / "cut.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        read_image(path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "note.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(path) in str(info.value) and "not a recognised image" in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match=r"cannot read image .*nothere\.png: no such file"):
        read_image(tmp_path / "nothere.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    assert issubclass(ImageReadError, DataError)


def test_decompression_bomb_guard(tmp_path):
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match=r"big\.png.*64x32 = 2048 pixels.*1000"):
        read_image(tmp_path / "big.png", max_pixels=1000)
    assert read_image(tmp_path / "big.png", max_pixels=2048).shape == (32, 64)


# ---- masks ---------------------------------------------------------------------------------------


def test_read_mask_any_nonzero(tmp_path):
    m = np.zeros((8, 8), np.uint8)
    m[1, 1], m[2, 2] = 1, 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == bool and out.shape == (8, 8)
    np.testing.assert_array_equal(out, m != 0)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[3, 4] = (0, 0, 1)  # luminance would round this to 0
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = read_mask(tmp_path / "c.png")
    assert out.shape == (8, 8) and out.sum() == 1 and out[3, 4]


# ---- conversions ---------------------------------------------------------------------------------


def test_to_float01():
    np.testing.assert_allclose(to_float01(np.array([0, 51, 255], np.uint8)), [0, 0.2, 1], rtol=1e-6)
    np.testing.assert_allclose(to_float01(np.array([0, 65535], np.uint16)), [0, 1])
    np.testing.assert_array_equal(to_float01(np.array([True, False])), [1, 0])
    f = np.array([0.25, 0.5], np.float64)
    out = to_float01(f)
    assert out.dtype == np.float32 and np.allclose(out, f)
    assert to_float01(np.zeros(2, np.uint8)).dtype == np.float32
    with pytest.raises(DataError, match="int64"):
        to_float01(np.array([1, 2], np.int64))


def test_to_gray_and_to_rgb():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255
    g = to_gray(rgb)
    assert g.shape == (4, 5) and g.dtype == np.float32
    np.testing.assert_allclose(g, 0.299, rtol=1e-5)
    np.testing.assert_allclose(to_gray(np.full((4, 5, 1), 0.5, np.float32)), 0.5)
    np.testing.assert_allclose(to_gray(np.full((4, 5, 4), 255, np.uint8)), 1.0, rtol=1e-5)
    gray = ramp_gray(4, 5)
    out = to_rgb(gray)
    assert out.shape == (4, 5, 3) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[..., c], gray / 255.0, rtol=1e-6)
    assert to_rgb(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(DataError):
        to_gray(np.zeros((4, 5, 2)))


def test_resize():
    const = np.full((40, 60), 0.3, np.float32)
    out = resize(const, (20, 30))
    assert out.shape == (20, 30) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.3, atol=1e-6)
    up = resize(ramp_rgb(10, 12), (25, 31))
    assert up.shape == (25, 31, 3) and up.dtype == np.float32
    assert 0.0 <= up.min() and up.max() <= 1.0
    # a horizontal ramp stays a monotone horizontal ramp (bilinear, float precision)
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (16, 1))
    out = resize(ramp, (8, 16))
    assert np.all(np.diff(out, axis=1) > 0) and np.allclose(out, out[0])
    same = resize(ramp_gray(), (20, 30))
    np.testing.assert_allclose(same, ramp_gray() / 255.0, rtol=1e-6)
    with pytest.raises(DataError, match="height, width"):
        resize(const, (0, 5))


def test_resize_mask_nearest():
    m = np.zeros((10, 10), bool)
    m[:5, :5] = True
    out = resize_mask(m, (20, 20))
    assert out.dtype == bool and out.shape == (20, 20)
    assert out[:10, :10].all() and not out[10:].any() and not out[:, 10:].any()
    small = resize_mask(m.astype(np.uint8) * 7, (5, 5))
    assert small.dtype == bool and small.shape == (5, 5)
    assert small[:2, :2].all() and not small[3:, 3:].any()


# ---- listing -------------------------------------------------------------------------------------


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.tiff", ".hidden.png", "notes.txt", "d.Bmp", "e.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.png").write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.tiff", "d.Bmp", "e.jpeg"]
    assert ".png" in IMAGE_SUFFIXES and ".tif" in IMAGE_SUFFIXES
    with pytest.raises(DataError, match="missing"):
        list_images(tmp_path / "missing")


def test_decompression_bomb_refused_before_decoding(tmp_path):
    """A PNG whose header claims 20000x20000 pixels is refused from the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match=r"bomb\.png: image is 20000x20000 = 400000000 pixels"):
        read_image(path)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global guard is restored
