"""Synthetic defects and textures, for tests and for self-supervised training.

Every function takes a ``numpy.random.Generator`` (so the same seed gives the same images), accepts
an (H, W) or (H, W, C) image as uint8 / uint16 / float (converted with :func:`to_float01`) and
returns float32 images in [0, 1]. A defect function returns ``(defective_image, mask)``: ``mask`` is
bool (H, W) and pixels outside it are exactly the input's pixels.

Defects: :func:`add_scratch` (thin line segment), :func:`add_spot` (disk or irregular blob),
:func:`add_cutpaste` (a patch of the image pasted elsewhere, flipped and jittered: CutPaste, Li et
al., CVPR 2021) and :func:`add_random_defect` (one of them).
:func:`make_textured_images` draws "good parts" (a periodic woven texture with small shifts and
noise) and :func:`make_defect_dataset` turns them into a labelled :class:`DataSplit` with masks.
"""

from __future__ import annotations

import numpy as np

from gaikan.data.datasets import DataSplit, ImageSet
from gaikan.data.images import to_float01
from gaikan.errors import DataError

__all__ = [
    "DEFECT_KINDS",
    "add_scratch",
    "add_spot",
    "add_cutpaste",
    "add_random_defect",
    "make_textured_images",
    "make_defect_dataset",
]

DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "cutpaste")


# ---- helpers ----------------------------------------------------------------------------------


def _prepare(img) -> np.ndarray:
    x = np.asarray(img)
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (1, 3, 4))):
        raise DataError(f"image has shape {x.shape}, expected (H, W) or (H, W, 1|3|4)")
    if min(x.shape[:2]) < 4:
        raise DataError(f"image of {x.shape[0]}x{x.shape[1]} pixels is too small for a defect")
    return np.clip(to_float01(x), 0.0, 1.0)


def _polarity(x: np.ndarray, mask: np.ndarray, polarity: str | None) -> bool:
    """True for a bright defect. ``None`` picks the contrasting one: bright on dark regions."""
    if polarity is None:
        return float(x[mask].mean()) < 0.5
    if polarity not in ("bright", "dark"):
        raise DataError(f"polarity must be 'bright', 'dark' or None, got {polarity!r}")
    return polarity == "bright"


def _blend(x: np.ndarray, mask: np.ndarray, target: float, alpha: np.ndarray | float) -> np.ndarray:
    """out = x + alpha * (target - x) inside ``mask``; x unchanged outside."""
    out = x.copy()
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim:
        a = a[mask]
    region = x[mask]  # (K,) or (K, C)
    if region.ndim == 2 and a.ndim == 1:
        a = a[:, None]
    out[mask] = region + a * (np.float32(target) - region)
    return out


def _target(bright: bool, rng: np.random.Generator) -> float:
    return float(rng.uniform(0.85, 1.0) if bright else rng.uniform(0.0, 0.15))


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return yy.astype(np.float32), xx.astype(np.float32)


# ---- defects ----------------------------------------------------------------------------------


def add_scratch(
    img,
    rng: np.random.Generator,
    width: float | None = None,
    length: float | None = None,
    *,
    polarity: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A straight bright or dark line segment.

    width, length: in pixels; by default ``U(1.2 %, 2.5 %)`` and ``U(30 %, 60 %)`` of the shorter
    image side (width at least 1 pixel). The segment has a random centre and angle; its pixels
    (distance to the segment <= width / 2) are set close to white or black, whichever contrasts
    with the region (``polarity`` forces one).
    """
    x = _prepare(img)
    h, w = x.shape[:2]
    side = min(h, w)
    width = max(1.0, float(width if width is not None else rng.uniform(0.012, 0.025) * side))
    length = float(length if length is not None else rng.uniform(0.3, 0.6) * side)
    centre = np.array([rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w], dtype=np.float32)
    angle = rng.uniform(0.0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)], dtype=np.float32)
    p0 = centre - 0.5 * length * direction
    yy, xx = _grid((h, w))
    # distance of every pixel centre to the segment p0 + t * direction, t in [0, length]
    t = np.clip((yy - p0[0]) * direction[0] + (xx - p0[1]) * direction[1], 0.0, length)
    dist = np.hypot(yy - (p0[0] + t * direction[0]), xx - (p0[1] + t * direction[1]))
    mask = dist <= width / 2.0
    if not mask.any():
        mask[int(np.clip(centre[0], 0, h - 1)), int(np.clip(centre[1], 0, w - 1))] = True
    bright = _polarity(x, mask, polarity)
    noise = rng.normal(0.0, 0.02, size=(h, w)).astype(np.float32)
    out = _blend(x, mask, _target(bright, rng), 1.0)
    out[mask] = np.clip(out[mask] + (noise[mask][:, None] if out.ndim == 3 else noise[mask]), 0, 1)
    return out, mask


def add_spot(
    img,
    rng: np.random.Generator,
    radius: float | None = None,
    *,
    blob: bool = True,
    polarity: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A dark or bright disk (``blob=False``) or irregular blob (radius modulated by angle).

    radius: in pixels; by default ``U(4 %, 8 %)`` of the shorter side (at least 1.5 pixels). The
    spot is strongest at its centre (blend weight 1) and weaker at its rim (0.6).
    """
    x = _prepare(img)
    h, w = x.shape[:2]
    side = min(h, w)
    radius = max(1.5, float(radius if radius is not None else rng.uniform(0.04, 0.08) * side))
    margin_y, margin_x = min(radius, h / 2), min(radius, w / 2)
    cy, cx = rng.uniform(margin_y, h - margin_y), rng.uniform(margin_x, w - margin_x)
    yy, xx = _grid((h, w))
    dy, dx = yy - cy, xx - cx
    dist = np.hypot(dy, dx)
    r = np.full_like(dist, radius)
    if blob:
        theta = np.arctan2(dy, dx)
        for k in (2, 3, 5):
            r = r * (1.0 + rng.uniform(0.0, 0.15) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)))
    mask = dist <= r
    if not mask.any():
        mask[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))] = True
    bright = _polarity(x, mask, polarity)
    alpha = 1.0 - 0.4 * np.clip(dist / np.maximum(r, 1e-6), 0.0, 1.0) ** 2
    return _blend(x, mask, _target(bright, rng), alpha), mask


def add_cutpaste(
    img,
    rng: np.random.Generator,
    patch_size: tuple[int, int] | None = None,
    *,
    area: tuple[float, float] = (0.01, 0.04),
    aspect: tuple[float, float] = (0.5, 2.0),
    jitter: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste (Li et al., CVPR 2021): copy a rectangle of the image and paste it elsewhere.

    patch_size: (height, width) in pixels; by default its area is ``U(area)`` of the image and its
    aspect ratio (width / height) log-uniform in ``aspect``. The destination is moved by at least
    half the patch size from the source. With ``jitter`` (as in the paper) the patch is also
    flipped at random and its brightness shifted by +-(0.08..0.2) and contrast scaled by
    0.7..1.3, so the paste differs from a periodic texture shifted by one period. The mask is the
    destination rectangle.
    """
    x = _prepare(img)
    h, w = x.shape[:2]
    if patch_size is None:
        a = rng.uniform(*area) * h * w
        ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        ph, pw = int(round(np.sqrt(a / ratio))), int(round(np.sqrt(a * ratio)))
    else:
        ph, pw = (int(s) for s in patch_size)
    ph, pw = int(np.clip(ph, 1, h - 1)), int(np.clip(pw, 1, w - 1))
    src = (int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1)))
    dst = src
    for _ in range(50):
        dst = (int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1)))
        if abs(dst[0] - src[0]) >= ph / 2 or abs(dst[1] - src[1]) >= pw / 2:
            break
    patch = x[src[0] : src[0] + ph, src[1] : src[1] + pw].copy()
    if jitter:
        if rng.random() < 0.5:
            patch = patch[::-1]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        mean = patch.mean()
        shift = rng.uniform(0.08, 0.2) * rng.choice([-1.0, 1.0])
        patch = np.clip((patch - mean) * rng.uniform(0.7, 1.3) + mean + shift, 0.0, 1.0)
    out = x.copy()
    out[dst[0] : dst[0] + ph, dst[1] : dst[1] + pw] = patch
    mask = np.zeros((h, w), dtype=bool)
    mask[dst[0] : dst[0] + ph, dst[1] : dst[1] + pw] = True
    return out, mask


def _random_defect(img, rng: np.random.Generator, scale: float, min_area: float):
    x = _prepare(img)
    h, w = x.shape[:2]
    side = min(h, w)
    out = mask = kind = None
    for _ in range(20):
        kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
        if kind == "scratch":
            out, mask = add_scratch(
                x, rng,
                width=scale * rng.uniform(0.012, 0.025) * side,
                length=min(0.95, scale * rng.uniform(0.3, 0.6)) * side,
            )
        elif kind == "spot":
            out, mask = add_spot(x, rng, radius=scale * rng.uniform(0.04, 0.08) * side)
        else:
            lo, hi = 0.01 * scale**2, 0.04 * scale**2
            out, mask = add_cutpaste(x, rng, area=(min(lo, 0.5), min(hi, 0.5)))
        if mask.mean() >= min_area:
            break
    return out, mask, kind


def add_random_defect(
    img, rng: np.random.Generator, *, scale: float = 1.0, min_area: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """One of scratch / spot / cutpaste, chosen uniformly.

    scale: multiplies the default defect sizes (lengths; a cut-paste area grows with scale**2).
    min_area: redraw (up to 20 times) while the mask covers less than this share of the image.
    """
    out, mask, _ = _random_defect(img, rng, scale, min_area)
    return out, mask


# ---- textures and data sets -------------------------------------------------------------------


def _size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    h, w = (int(s) for s in size)
    if h < 8 or w < 8:
        raise DataError(f"synthetic images need at least 8x8 pixels, got {h}x{w}")
    return h, w


def make_textured_images(n: int, size, rng: np.random.Generator, channels: int = 1) -> list[np.ndarray]:
    """``n`` "good part" images of one family: a periodic woven texture.

    The pattern (period ~1/7 of the shorter side: a checkered cosine weave with a finer diagonal
    ripple) is fixed; each image gets a small random shift (+-1/8 period), a gain of 0.95..1.05 and
    Gaussian noise (sigma 0.015). size: int or (height, width). channels: 1 -> float32 (H, W);
    3 -> float32 (H, W, 3) with a fixed warm tint.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    h, w = _size(size)
    period = max(4.0, min(h, w) / 7.0)
    yy, xx = _grid((h, w))
    shifts = rng.uniform(-period / 8, period / 8, size=(n, 2)).astype(np.float32)
    gains = rng.uniform(0.95, 1.05, size=n).astype(np.float32)
    ys = yy[None] + shifts[:, 0, None, None]
    xs = xx[None] + shifts[:, 1, None, None]
    k = np.float32(2 * np.pi / period)
    pattern = (
        0.5
        + 0.22 * np.cos(k * xs) * np.cos(k * ys)
        + 0.08 * np.cos(2 * k * (xs + ys))
    )
    images = pattern * gains[:, None, None] + rng.normal(0.0, 0.015, size=(n, h, w))
    images = np.clip(images, 0.0, 1.0).astype(np.float32)
    if channels == 3:
        tint = np.array([1.0, 0.9, 0.75], dtype=np.float32)
        images = images[..., None] * tint
    return [np.ascontiguousarray(im) for im in images]


def make_defect_dataset(
    n_good_train: int,
    n_good_test: int,
    n_defect_test: int,
    size=64,
    seed: int = 0,
    *,
    channels: int = 1,
    scale: float = 1.5,
    min_area: float = 0.01,
) -> DataSplit:
    """A small labelled data set for tests: textured good parts, some with synthetic defects.

    train: ``n_good_train`` good images (label 0, no masks). test: ``n_good_test`` good images
    (all-False masks) then ``n_defect_test`` defective ones (label 1, defect type = scratch / spot /
    cutpaste, their masks), each defect covering at least ``min_area`` (1 %) of the image at
    ``scale`` 1.5 times the default defect size, so a pretrained-CNN detector can find them.
    The same seed gives the same data set.
    """
    rng = np.random.default_rng(seed)
    h, w = _size(size)
    train_images = make_textured_images(n_good_train, (h, w), rng, channels)
    good_test = make_textured_images(n_good_test, (h, w), rng, channels)
    base = make_textured_images(n_defect_test, (h, w), rng, channels)
    defects = [_random_defect(img, rng, scale, min_area) for img in base]

    train = ImageSet(
        images=train_images,
        labels=np.zeros(n_good_train, dtype=np.int64),
        paths=[f"synthetic/train/good/{i:04d}" for i in range(n_good_train)],
        defect_types=["good"] * n_good_train,
    )
    test = ImageSet(
        images=good_test + [d[0] for d in defects],
        labels=np.r_[np.zeros(n_good_test, np.int64), np.ones(n_defect_test, np.int64)],
        paths=[f"synthetic/test/good/{i:04d}" for i in range(n_good_test)]
        + [f"synthetic/test/{d[2]}/{i:04d}" for i, d in enumerate(defects)],
        defect_types=["good"] * n_good_test + [d[2] for d in defects],
        masks=[np.zeros((h, w), dtype=bool) for _ in range(n_good_test)] + [d[1] for d in defects],
    )
    return DataSplit(spec="synthetic", train=train, test=test)
