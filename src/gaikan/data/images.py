"""Image decoding, conversion and resizing (Pillow + numpy).

What :func:`read_image` returns, by the file's Pillow mode:

==========================================  =====================================================
file                                        array
==========================================  =====================================================
``L``, ``1`` (bilevel: 0/255)               uint8 (H, W)
``P`` (palette) with an all-gray palette    uint8 (H, W)
``P`` with a colour palette                 uint8 (H, W, 3) (transparency composited on black)
``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ...  uint8 (H, W, 3)
``RGBA``, ``LA``, ``PA``                    uint8 (H, W, 3) / (H, W): alpha composited on black,
                                            i.e. ``round(colour * alpha / 255)``
``I;16``, ``I;16B``, ``I;16L``, ``I``       float32 (H, W) = value / 65535 (a fixed scale, *not* a
                                            per-image min-max, so intensities stay comparable
                                            between images); an ``I`` image with values outside
                                            0..65535 is refused
``F`` (32-bit float TIFF)                   float32 (H, W) as stored; values must lie in [0, 1]
                                            (a tolerance of 1e-3 is clipped), anything else (or
                                            NaN/inf) is refused: we never guess a scale
==========================================  =====================================================

EXIF orientation is applied. 16-bit *colour* files are decoded by Pillow to 8 bits per channel.
Multi-frame files (TIFF stacks, animated GIF, WebP and PNG) give their first frame. GIF and WebP are
read like any other format (a GIF is a palette image, see ``P`` above).

What a detector can score: :func:`image_problem` says what is wrong with an array (shape, dtype,
smaller than :data:`MIN_IMAGE_SIDE` on a side, NaN/inf, floats outside [0, 1]) or returns None; the
detectors, ``gaikan.edge`` and the per-file accounting of ``gaikan.data.inputs`` all use it.

Conventions of the conversion helpers: float images are float32 in [0, 1]; ``(height, width)`` is
the order of every size argument (numpy's order, not Pillow's).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gaikan.errors import DataError, ImageReadError

__all__ = [
    "IMAGE_SUFFIXES",
    "DEFAULT_MAX_PIXELS",
    "read_image",
    "read_mask",
    "to_float01",
    "to_gray",
    "to_rgb",
    "resize",
    "resize_mask",
    "list_images",
    "MIN_IMAGE_SIDE",
    "image_problem",
]

#: File suffixes (lower case) that :func:`list_images` picks up.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")

#: The smallest height and width a detector scores (its backbone needs at least this much context).
MIN_IMAGE_SIDE = 8

#: Default decompression-bomb guard of :func:`read_image` (width x height).
DEFAULT_MAX_PIXELS = 200_000_000

#: ITU-R BT.601 luma weights, the ones Pillow uses for ``convert("L")``.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS")
_ALPHA_MODES = ("RGBA", "LA")
_PREMULTIPLIED = {"RGBa": "RGB", "La": "L"}
_FLOAT_TOLERANCE = 1e-3

# Pillow's own bomb check reads the global ``Image.MAX_IMAGE_PIXELS``; we replace it by our
# ``max_pixels`` for the duration of ``Image.open`` (header parsing only) under this lock.
_OPEN_LOCK = threading.Lock()


def _fail(path, problem: str) -> ImageReadError:
    problem = " ".join(str(problem).split())  # one line
    return ImageReadError(f"cannot read image {path}: {problem}")


def read_image(path, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> np.ndarray:
    """Decode an image file into a numpy array (see the module docstring for the exact mapping).

    ``data``: the file's bytes, already in memory (an upload): decoded from there, and ``path`` is
    only the name used in messages.

    Returns uint8 (H, W) for grayscale, uint8 (H, W, 3) for colour and float32 (H, W) in [0, 1] for
    16-bit and float files. Raises :class:`~gaikan.errors.ImageReadError`, with a one-line message
    naming the file, for a missing file, a file that is not an image, a truncated or corrupt file
    (the pixel data are decoded here, not lazily) and an image larger than ``max_pixels`` pixels.
    Truncated files are refused as long as ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its
    default ``False`` (this module never changes it). Memory: the pixel buffer is allocated only
    after the header's size passed ``max_pixels``, so a file never costs more than about
    ``max_pixels`` x 16 bytes whatever size it declares; a MemoryError is passed on as such (it is
    not the file's fault).
    """
    path_str = os.fspath(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # pragma: no cover - someone else changed the global
        raise _fail(path_str, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to decode "
                              "possibly truncated files")
    try:
        with _OPEN_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(path_str if data is None else io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except FileNotFoundError:
        raise _fail(path_str, "no such file") from None
    except IsADirectoryError:
        raise _fail(path_str, "it is a directory") from None
    except PermissionError:
        raise _fail(path_str, "permission denied") from None
    except MemoryError:  # not the file's fault: the caller decides (gaikan.data.inputs makes it a row)
        raise
    except UnidentifiedImageError:
        empty = (len(data) == 0) if data is not None else (os.path.isfile(path_str) and os.path.getsize(path_str) == 0)
        raise _fail(path_str, "empty file (0 bytes)" if empty else
                    "not a recognised image file (PNG, JPEG, BMP, TIFF, GIF, WebP, ...)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's problem
        raise _fail(path_str, exc) from None

    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise _fail(
                path_str,
                f"image is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{max_pixels} (max_pixels; a decompression bomb?)",
            )
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_array(img, path_str)
        except (ImageReadError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "truncated" in text.lower() or isinstance(exc, EOFError):
                text = f"truncated file ({text})" if text else "truncated file"
            raise _fail(path_str, text) from None


def _to_array(img: Image.Image, path: str) -> np.ndarray:
    mode = img.mode
    if mode == "L":
        return np.array(img, dtype=np.uint8)
    if mode == "1":
        return np.array(img.convert("L"), dtype=np.uint8)
    if mode in _PREMULTIPLIED:
        return np.array(img.convert(_PREMULTIPLIED[mode]), dtype=np.uint8)
    if mode == "P":
        gray = _palette_is_gray(img)
        has_alpha = "transparency" in img.info or img.palette.mode == "RGBA"
        if has_alpha:
            out = _composite_on_black(np.array(img.convert("RGBA"), dtype=np.uint8))
        else:
            out = np.array(img.convert("RGB"), dtype=np.uint8)
        return np.ascontiguousarray(out[..., 0]) if gray else out
    if mode in _ALPHA_MODES:
        return _composite_on_black(np.array(img, dtype=np.uint8))
    if mode == "PA":  # palette + alpha: the array would hold indices, so convert to colours first
        return _composite_on_black(np.array(img.convert("RGBA"), dtype=np.uint8))
    if mode in _16BIT_MODES or mode.startswith("I"):
        values = np.array(img).astype(np.float64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise _fail(
                path,
                f"integer image (mode {mode}) has values in [{values.min():g}, {values.max():g}], "
                "expected 0..65535",
            )
        return (values / 65535.0).astype(np.float32)
    if mode == "F":
        values = np.array(img, dtype=np.float32)
        if not np.all(np.isfinite(values)):
            raise _fail(path, "float image contains NaN or infinite values")
        if values.size and (values.min() < -_FLOAT_TOLERANCE or values.max() > 1 + _FLOAT_TOLERANCE):
            raise _fail(
                path,
                f"float image has values in [{values.min():g}, {values.max():g}], expected [0, 1]",
            )
        return np.clip(values, 0.0, 1.0)
    # RGB and everything Pillow can convert to it (CMYK, YCbCr, LAB, HSV, ...)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _palette_is_gray(img: Image.Image) -> bool:
    palette = img.getpalette()  # RGB triplets
    if not palette:
        return False
    rgb = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    used = np.unique(np.asarray(img)).astype(np.intp)
    used = used[used < len(rgb)]
    rgb = rgb[used]
    return bool(np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2]))


def _composite_on_black(arr: np.ndarray) -> np.ndarray:
    """(H, W, C+1) uint8 with alpha last -> colour * alpha / 255, rounded; (H, W) for gray+alpha."""
    colour = arr[..., :-1].astype(np.uint16)
    alpha = arr[..., -1:].astype(np.uint16)
    out = ((colour * alpha + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(out[..., 0]) if out.shape[-1] == 1 else out


def read_mask(path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a ground-truth mask: bool (H, W), True wherever the file has a nonzero pixel.

    Colour masks count a pixel as defect when *any* channel is nonzero (after compositing alpha
    on black), which is stricter than a luminance conversion, where a dim pure-blue pixel rounds
    to 0. Errors as in :func:`read_image`.
    """
    img = read_image(path, max_pixels=max_pixels)
    nonzero = img != 0
    return np.any(nonzero, axis=-1) if nonzero.ndim == 3 else nonzero


# ---- conversions ------------------------------------------------------------------------------


def to_float01(img: np.ndarray) -> np.ndarray:
    """float32 copy of ``img`` in [0, 1]: uint8 / 255, uint16 / 65535, bool -> 0/1.

    Float input is kept as is (converted to float32): it is assumed to be in [0, 1] already.
    Other integer types are refused (their scale is ambiguous) with a DataError.
    """
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / np.float32(255.0)
    if img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(65535.0)
    if img.dtype == np.bool_:
        return img.astype(np.float32)
    if np.issubdtype(img.dtype, np.floating):
        return img.astype(np.float32, copy=True)
    raise DataError(
        f"unsupported image dtype {img.dtype}; expected uint8, uint16, bool or float in [0, 1]"
    )


def image_problem(img) -> str | None:
    """What makes ``img`` unscorable, as the end of a sentence ("has shape (2, 3, 5), expected ..."),
    or None for a good image: a numpy array (H, W) or (H, W, 1|3|4) of uint8, uint16, bool or float
    with finite values in [0, 1] (a tolerance of 1e-3, as for float files), at least
    :data:`MIN_IMAGE_SIDE` pixels on each side."""
    if not isinstance(img, np.ndarray):
        return f"is a {type(img).__name__}, expected a numpy array"
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        return f"has shape {img.shape}, expected (H, W) or (H, W, 1|3|4)"
    if img.shape[0] < MIN_IMAGE_SIDE or img.shape[1] < MIN_IMAGE_SIDE:
        return (f"is {img.shape[0]}x{img.shape[1]} pixels (height x width), too small "
                f"(min {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})")
    if img.dtype in (np.uint8, np.uint16, np.bool_):
        return None
    if not np.issubdtype(img.dtype, np.floating):
        return f"has dtype {img.dtype}, expected uint8, uint16, bool or float in [0, 1]"
    if not np.isfinite(img).all():
        return "contains NaN or infinite values"
    low, high = float(img.min()), float(img.max())
    if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
        return f"has float values in [{low:g}, {high:g}], expected [0, 1]"
    return None


def _check_image_shape(img: np.ndarray) -> None:
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4)):
        return
    raise DataError(f"image has shape {img.shape}, expected (H, W) or (H, W, 1|3|4)")


def to_gray(img: np.ndarray) -> np.ndarray:
    """float32 (H, W) in [0, 1]: BT.601 luminance of a colour image (alpha ignored); a gray image
    ((H, W) or (H, W, 1)) is only converted to float."""
    img = np.asarray(img)
    _check_image_shape(img)
    x = to_float01(img)
    if x.ndim == 2:
        return x
    if x.shape[2] == 1:
        return x[..., 0]
    return np.ascontiguousarray(x[..., :3] @ _LUMA, dtype=np.float32)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1]: gray replicated to three channels, alpha dropped."""
    img = np.asarray(img)
    _check_image_shape(img)
    x = to_float01(img)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[2] == 1:
        return np.repeat(x, 3, axis=2)
    return np.ascontiguousarray(x[..., :3])


def _check_size(size) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError):
        raise DataError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise DataError(f"size must be positive (height, width), got {size!r}")
    return height, width


def resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size = (height, width)`` with Pillow's bilinear filter; returns float32.

    The image is first converted with :func:`to_float01` and each channel is resized as a
    Pillow mode-"F" (32-bit float) image, so no precision is lost to 8-bit rounding. Pillow widens
    the filter support when shrinking, so downsizing is anti-aliased (an area-weighted average),
    not plain point sampling. The channel layout is kept: (H, W) -> (h, w), (H, W, C) -> (h, w, C).
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise DataError(f"image has shape {img.shape}, expected (H, W) or (H, W, C)")
    height, width = _check_size(size)
    x = to_float01(img)
    if x.shape[:2] == (height, width):
        return x
    if x.ndim == 2:
        return _resize_channel(x, height, width)
    channels = [_resize_channel(x[..., c], height, width) for c in range(x.shape[2])]
    return np.stack(channels, axis=2)


def _resize_channel(channel: np.ndarray, height: int, width: int) -> np.ndarray:
    pil = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32))  # mode "F"
    out = pil.resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32).copy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a mask to ``size = (height, width)`` by nearest neighbour; returns bool (h, w).

    Any nonzero value of the input counts as True.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise DataError(f"mask has shape {mask.shape}, expected (H, W)")
    height, width = _check_size(size)
    binary = mask != 0
    if binary.shape == (height, width):
        return binary.copy()
    pil = Image.fromarray(binary.astype(np.uint8) * np.uint8(255))  # mode "L"
    out = pil.resize((width, height), resample=Image.Resampling.NEAREST)
    return np.asarray(out) != 0


# ---- folders ----------------------------------------------------------------------------------


def list_images(folder) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name.

    A file counts when its suffix, in any case, is one of :data:`IMAGE_SUFFIXES`; hidden files
    (name starting with ``.``) are skipped. A missing folder is a DataError naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist or is not a directory")
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def prepare_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One image (any dtype, gray or colour) -> float32 (3, H, W) in [0, 1] at ``size``.

    Grayscale is resized once and replicated to the three channels the RGB backbone expects.
    """
    img = to_float01(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if img.shape[:2] != tuple(size):
        img = resize(img, size)
    if img.ndim == 2:
        return np.repeat(img[None], 3, axis=0).astype(np.float32, copy=False)
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
