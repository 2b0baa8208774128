"""Property tests of the image reader (hypothesis): random bytes, valid files of every mode and format
we read, the same files corrupted (truncated, bytes flipped, junk inserted), and headers declaring
huge sizes. read_image / read_input either return an array of the documented kind or raise a
GaikanError (ImageReadError) naming the file, never another exception; memory stays bounded by
max_pixels whatever a header declares (checked in a child process under an address-space limit)."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fuzz_settings import fuzz
from gaikan.data.images import IMAGE_SUFFIXES, image_problem, read_image
from gaikan.data.inputs import read_input
from gaikan.errors import GaikanError, ImageReadError

HERE = Path(__file__).parent

# the formats and modes Pillow writes that we read
WRITABLE = {
    "PNG": ["1", "L", "P", "PA", "RGB", "RGBA", "LA", "I;16", "I"],
    "JPEG": ["L", "RGB", "CMYK"],
    "BMP": ["1", "L", "P", "RGB"],
    "TIFF": ["1", "L", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"],
    "GIF": ["L", "P"],
    "WEBP": ["RGB", "RGBA"],
}
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"BM", b"II*\x00", b"MM\x00*",
         b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"RIFF\x00\x00\x00\x00WEBPVP8L", b"P5\n", b"\x00\x00\x01\x00"]


def check_contract(img) -> None:
    """What read_image promises: uint8 (H, W) or (H, W, 3), or float32 (H, W) in [0, 1]."""
    assert isinstance(img, np.ndarray)
    assert img.shape[0] >= 1 and img.shape[1] >= 1
    if img.dtype == np.uint8:
        assert img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3), img.shape
    else:
        assert img.dtype == np.float32 and img.ndim == 2, (img.dtype, img.shape)
        assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


def read_both(path: Path) -> None:
    """read_image and read_input: a result of the documented kind, or an ImageReadError naming the file.
    The same bytes given in memory (``data=``, the service's uploads) give the same array or error."""
    in_memory = _outcome(lambda: read_input(path.name, data=path.read_bytes()))
    try:
        img = read_image(path)
    except GaikanError as exc:
        assert isinstance(exc, ImageReadError) and path.name in str(exc) and "\n" not in str(exc)
        assert isinstance(in_memory, ImageReadError), in_memory
        assert str(in_memory) == str(exc).replace(str(path), path.name)
        return
    check_contract(img)
    try:
        usable = read_input(path)
    except GaikanError as exc:
        assert path.name in str(exc) and image_problem(img) is not None
        assert str(in_memory) == str(exc).replace(str(path), path.name)
        return
    assert image_problem(usable) is None
    np.testing.assert_array_equal(in_memory, usable)


def _outcome(read):
    try:
        return read()
    except GaikanError as exc:
        return exc


@st.composite
def pillow_images(draw):
    fmt = draw(st.sampled_from(sorted(WRITABLE)))
    mode = draw(st.sampled_from(WRITABLE[fmt]))
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    u8 = lambda *shape: rng.integers(0, 256, (h, w, *shape), dtype=np.uint8)  # noqa: E731
    if mode == "1":
        img = Image.fromarray(rng.random((h, w)) > 0.5)
    elif mode in ("L", "RGB", "RGBA", "CMYK", "LA"):
        channels = {"L": (), "RGB": (3,), "RGBA": (4,), "CMYK": (4,), "LA": (2,)}[mode]
        img = Image.fromarray(u8(*channels), mode=mode) if channels else Image.fromarray(u8())
    elif mode in ("P", "PA"):
        img = Image.fromarray(u8(), mode="L").convert("P")
        palette = rng.integers(0, 256, 768, dtype=np.uint8)
        if draw(st.booleans()):
            palette = np.repeat(palette[:256], 3)  # an all-gray palette
        img.putpalette(palette.tobytes())
        if mode == "PA":
            img = img.convert("PA")
        elif draw(st.booleans()):
            img.info["transparency"] = int(rng.integers(0, 256))
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(-(2**20), 2**20, (h, w)).astype(np.int32))
    else:  # F: values in and out of [0, 1], NaN and inf sometimes
        values = rng.random((h, w), dtype=np.float32) * draw(st.sampled_from([1.0, 1.0005, 3.0]))
        if draw(st.booleans()) and values.size > 1:
            values.flat[0] = draw(st.sampled_from([np.nan, np.inf, -1.0, 0.5]))
        img = Image.fromarray(values)
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt, **({"transparency": img.info["transparency"]} if "transparency" in img.info else {}))
    except (OSError, ValueError, KeyError):  # a combination this Pillow cannot write: write it as PNG
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
    return fmt, buf.getvalue()


@st.composite
def corrupted(draw, data: bytes):
    data = bytearray(data)
    op = draw(st.sampled_from(["none", "truncate", "flip", "insert", "zero"]))
    if op == "truncate" and len(data) > 1:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif op == "flip" and data:
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif op == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif op == "zero" and data:
        i = draw(st.integers(0, len(data) - 1))
        j = draw(st.integers(i, min(len(data), i + 256)))
        data[i:j] = bytes(j - i)
    return bytes(data)


suffixes = st.sampled_from(list(IMAGE_SUFFIXES) + [".bin", ""])


@fuzz(300)
@given(st.sampled_from(MAGIC), st.binary(max_size=2048), suffixes)
def test_random_bytes_give_an_array_or_an_image_read_error(tmp_path_factory, magic, body, suffix):
    path = tmp_path_factory.mktemp("rb", numbered=True) / f"random{suffix}"
    path.write_bytes(magic + body)
    read_both(path)


@fuzz(400)
@given(pillow_images().flatmap(lambda fi: st.tuples(st.just(fi[0]), corrupted(fi[1]))), suffixes)
def test_valid_and_corrupted_files_of_every_mode_give_an_array_or_an_image_read_error(tmp_path_factory,
                                                                                   fmt_data, suffix):
    fmt, data = fmt_data
    path = tmp_path_factory.mktemp("img", numbered=True) / f"{fmt.lower()}{suffix}"
    path.write_bytes(data)
    read_both(path)


def test_huge_declared_sizes_stay_within_memory_bounds():
    """A child process under RLIMIT_AS (its start-up size + 400 MiB) reads hypothesis-made PNG, GIF, BMP
    and JPEG headers that declare up to 2^31 pixels a side with a few bytes of data: each is refused
    from its header (over max_pixels) or decoded within the limit; any larger allocation would be a
    MemoryError and fail the child."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, str(HERE / "fuzz_declared_sizes.py")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "declared-size examples passed" in result.stdout, result.stdout
