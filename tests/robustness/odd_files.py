"""The odd folder of issue 13 (every kind of file a user's folder holds): its writer and what the
accounting must say of each file; the fixtures are in conftest.py."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> what the accounting must say: "scored", or (verdict, a fragment of the reason)
EXPECTED = {
    "good1.png": "scored",
    "good2.png": "scored",
    "anim.gif": "scored",          # animated GIF: its first frame
    "palette.gif": "scored",       # palette GIF
    "cell.webp": "scored",
    "cmyk.jpg": "scored",
    "deep16.tif": "scored",        # 16-bit TIFF
    "rgba.png": "scored",
    "jpeg_named.png": "scored",    # a JPEG with a .png name
    "tall.png": ("UNREADABLE", "2x4000 pixels (height x width), too small"),
    "empty.png": ("UNREADABLE", "empty file (0 bytes)"),
    "truncated.jpg": ("UNREADABLE", "truncated"),
    "bomb.png": ("UNREADABLE", "20000x20000 = 400000000 pixels, more than the limit"),
    "notes.txt": ("SKIPPED", "unsupported file type (.txt)"),
    ".DS_Store": ("SKIPPED", "hidden file"),
}
IN_SUB = {"sub/inner.png": "scored", "sub/deeper/inner2.bmp": "scored"}


def texture(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    img = 0.5 + 0.2 * np.sin(x / 3.0) * np.cos(y / 4.0) + 0.03 * rng.standard_normal((size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def gif_frames() -> list[np.ndarray]:
    """The three (distinct) frames of anim.gif."""
    return [texture(10), 255 - texture(11), np.roll(texture(12), 20, axis=1)]


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def write_odd_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    g = texture(0)
    Image.fromarray(g).save(root / "good1.png")
    Image.fromarray(texture(1)).save(root / "good2.png")
    frames = [Image.fromarray(np.stack([f] * 3, axis=-1)) for f in gif_frames()]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(texture(2)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(root / "palette.gif")
    Image.fromarray(np.stack([texture(3), texture(4), texture(5)], axis=-1)).save(root / "cell.webp", lossless=True)
    Image.fromarray(np.stack([texture(6)] * 3, axis=-1)).convert("CMYK").save(root / "cmyk.jpg", quality=95)
    Image.fromarray(texture(7).astype(np.uint16) * 257).save(root / "deep16.tif")
    rgba = np.dstack([np.stack([texture(8)] * 3, axis=-1), np.full((64, 64), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    buf = io.BytesIO()
    Image.fromarray(texture(9)).save(buf, format="JPEG", quality=95)
    (root / "jpeg_named.png").write_bytes(buf.getvalue())
    Image.fromarray(np.full((2, 4000), 128, np.uint8)).save(root / "tall.png")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "bomb.png").write_bytes(bomb_png(20000, 20000))
    (root / "notes.txt").write_text("inspection notes\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(texture(11)).save(root / "sub" / "inner.png")
    Image.fromarray(texture(12)).save(root / "sub" / "deeper" / "inner2.bmp")
    return root
