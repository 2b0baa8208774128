"""Run by test_fuzz_reader.py in a child process: files whose headers declare huge sizes (up to 2^31 - 1
pixels a side) with almost no data, read under an address-space limit of the start-up size + 400 MiB
with max_pixels = 4,000,000. Each must be refused with an ImageReadError naming the file (over
max_pixels, truncated, corrupt) or decoded, and no allocation may pass the limit (it would raise
MemoryError, which read_image passes on, and fail this script). Exit code 0 when all passed."""

import io
import os
import resource
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_settings import fuzz  # noqa: E402

from gaikan.data.inputs import read_input  # noqa: E402
from gaikan.errors import GaikanError  # noqa: E402

MAX_PIXELS = 4_000_000
HEADROOM = 400 * 2**20

PNG_COLOUR_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(w, h, colour, depth, payload: bytes) -> bytes:
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0))
    if colour == 3:
        out += _chunk(b"PLTE", bytes(range(48)))
    return out + _chunk(b"IDAT", zlib.compress(payload)) + _chunk(b"IEND", b"")


def gif(w, h, fw, fh, payload: bytes) -> bytes:
    head = b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + bytes(range(6))  # 2-colour global table
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, fw, fh, 0) + b"\x02"
    data = payload[:255]
    return head + frame + bytes([len(data)]) + data + b"\x00\x3b"


def bmp(w, h, bpp, payload: bytes) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, bpp, 0, 0, 2835, 2835, 0, 0)
    palette = bytes(4 * (1 << bpp)) if bpp <= 8 else b""
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(payload), 0, 0, offset) + info + palette + payload


def _small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _small_jpeg()


def jpeg(w, h) -> bytes:
    i = JPEG.index(b"\xff\xc0")
    return JPEG[: i + 5] + struct.pack(">HH", h, w) + JPEG[i + 9:]


side = st.one_of(st.integers(1, 64), st.integers(1, 2**16 - 1), st.integers(1, 2**31 - 1))
side16 = st.integers(1, 2**16 - 1)


@st.composite
def declared(draw):
    kind = draw(st.sampled_from(["png", "gif", "bmp", "jpeg"]))
    payload = draw(st.binary(max_size=300))
    if kind == "png":
        colour = draw(st.sampled_from(sorted(PNG_COLOUR_DEPTHS)))
        return "x.png", png(draw(side), draw(side), colour, draw(st.sampled_from(PNG_COLOUR_DEPTHS[colour])), payload)
    if kind == "gif":
        return "x.gif", gif(draw(side16), draw(side16), draw(side16), draw(side16), payload)
    if kind == "bmp":
        w = draw(st.integers(1, 2**31 - 1))
        h = draw(st.integers(-(2**31) + 1, 2**31 - 1).filter(lambda v: v != 0))
        return "x.bmp", bmp(w, h, draw(st.sampled_from([1, 4, 8, 24, 32])), payload)
    return "x.jpg", jpeg(draw(side16), draw(side16))


COUNT = [0, 0]  # examples, refused


def main() -> int:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, vm + HEADROOM))
    folder = Path(tempfile.mkdtemp(prefix="gaikan-declared-"))

    @fuzz(300)
    @given(declared())
    def check(named):
        name, data = named
        path = folder / name
        path.write_bytes(data)
        COUNT[0] += 1
        try:
            read_input(path, max_pixels=MAX_PIXELS)
        except GaikanError as exc:
            assert name in str(exc), exc
            COUNT[1] += 1

    check()
    for p in folder.iterdir():
        p.unlink()
    os.rmdir(folder)
    print(f"{COUNT[0]} declared-size examples passed ({COUNT[1]} refused with an ImageReadError) under "
          f"RLIMIT_AS = start-up + {HEADROOM >> 20} MiB, max_pixels = {MAX_PIXELS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
