"""Pictures the service stores with each inspection: a display thumbnail, the heat map and the
overlay of the heat map on the image. Pure numpy functions plus one PNG encoder; no matplotlib
figures (they cost ~100 ms each, the whole inspection budget).

Heat-map colour scale: ``lo = min(0, map.min())``, ``hi = max(2 * threshold, map.max())``, the
scale of ``gaikan predict``'s figures, so the colour at the threshold is the same on every part
(a good part stays blue, a defect goes to red).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

_JET: np.ndarray | None = None


def _jet_lut() -> np.ndarray:
    global _JET
    if _JET is None:
        from matplotlib import colormaps

        _JET = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    return _JET


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) / (H, W, 1|3|4), uint8 or float in [0, 1] -> uint8 (H, W, 3)."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def fit_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down (never up) so that the longer side is at most ``max_side``."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape == tuple(size):
        return amap
    return np.asarray(Image.fromarray(np.ascontiguousarray(amap), mode="F").resize((size[1], size[0]),
                                                                                   Image.BILINEAR))


def map_range(amap: np.ndarray, threshold: float) -> tuple[float, float]:
    lo = min(0.0, float(np.min(amap)))
    hi = max(2.0 * float(threshold), float(np.max(amap)))
    return lo, (hi if hi > lo else lo + 1e-6)


def heatmap_rgb(amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map values -> jet colours, linear between lo and hi (clipped): uint8 (H, W, 3)."""
    t = (np.asarray(amap, dtype=np.float32) - lo) / max(hi - lo, 1e-12)
    idx = np.clip(np.rint(t * 255), 0, 255).astype(np.uint8)
    return _jet_lut()[idx]


def overlay_rgb(image_rgb: np.ndarray, heat_rgb: np.ndarray, weight: np.ndarray | float = 0.5) -> np.ndarray:
    """Alpha blend of the heat map on the image; ``weight`` may be per pixel (H, W) in [0, 1]."""
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim == 2:
        w = w[..., None]
    out = image_rgb.astype(np.float32) * (1.0 - w) + heat_rgb.astype(np.float32) * w
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def inspection_pictures(image: np.ndarray, amap: np.ndarray | None, threshold: float, *,
                        max_side: int = 512, thumb_side: int = 192) -> dict[str, bytes]:
    """PNG bytes of ``thumb`` (the image, small), and with a map ``heatmap`` and ``overlay``
    (image size capped at ``max_side``). On the overlay the heat map is opaque where the map exceeds
    the threshold and faint elsewhere, so the suspect region stands out."""
    rgb = to_display_rgb(image)
    h, w = fit_size(*rgb.shape[:2], max_side)
    rgb = resize_rgb(rgb, (h, w))
    out = {"thumb": png_bytes(resize_rgb(rgb, fit_size(h, w, thumb_side)))}
    if amap is not None:
        m = resize_map(amap, (h, w))
        lo, hi = map_range(m, threshold)
        heat = heatmap_rgb(m, lo, hi)
        weight = np.where(m > threshold, 0.6, 0.15).astype(np.float32)
        out["heatmap"] = png_bytes(heat)
        out["overlay"] = png_bytes(overlay_rgb(rgb, heat, weight))
    return out


def map_npy_bytes(amap: np.ndarray) -> bytes:
    """An anomaly map as .npy bytes (float16: half the size, ~3 significant digits, enough to draw it)."""
    buf = io.BytesIO()
    np.save(buf, np.clip(np.asarray(amap, dtype=np.float32), -65504, 65504).astype(np.float16), allow_pickle=False)
    return buf.getvalue()


def read_map_npy(data: bytes) -> np.ndarray:
    """The map stored by :func:`map_npy_bytes`, as float32 (H, W); never unpickles."""
    amap = np.load(io.BytesIO(data), allow_pickle=False)
    if amap.ndim != 2 or amap.dtype != np.float16:
        raise ValueError(f"stored anomaly map has shape {amap.shape} and dtype {amap.dtype}, expected 2-D float16")
    return amap.astype(np.float32)
