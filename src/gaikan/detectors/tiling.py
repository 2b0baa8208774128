"""Large images by tiling: cut an image into overlapping tiles at native resolution, score each tile
at the detector's working size, stitch the tile anomaly maps back into one map of the whole image.

A 3872 x 3200 photo squeezed to 224 px shrinks a 20-pixel defect to about one pixel, below the
stride-8 feature grid; cut into 256-px tiles, each scored at, say, 128 px, the same defect spans ten
working pixels. Used by the patch detectors (PaDiM, PatchCore) through two calls:

* fit:   ``tile_views(images, tile_size, overlap)`` gives every tile of every good image as a numpy
  *view* (no copy), so the detector learns the appearance of tiles, the thing it will score;
* score: ``score_tiled(images, maps_fn, ...)`` runs ``maps_fn`` on batches of at most ``batch_size``
  tiles and writes each tile's map into its image's map, so memory is bounded by the tile batch plus
  the stitched maps (at the working scale), not by the number of tiles.

Geometry (per axis, image length L, tile t = min(tile_size, L), overlap fraction o):
n = ceil((L - t) / (t (1 - o))) + 1 tiles whose starts are spread evenly over [0, L - t]
(start_i = round(i (L - t) / (n - 1))), so the first tile starts at 0, the last ends at L and
neighbours overlap by at least o t pixels. An image no larger than the tile is one tile: plain resizing.

The stitched map is at the working scale s = working size / t (a tile's map lands unresized at
round(start * s)); overlaps are combined by maximum (default) or mean. The image score is the
maximum of its tiles' scores (= the maximum of the stitched map for the ``max`` rule and scores
that are map maxima).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gaikan.errors import SettingsError

REDUCE_RULES = ("max", "mean")


@dataclass(frozen=True)
class Tile:
    """One tile: the image it belongs to and its box (top, left, height, width) in native pixels."""

    image: int
    top: int
    left: int
    height: int
    width: int


def check_tiling(tile_size: int, tile_overlap: float, tile_reduce: str = "max") -> None:
    """Refuse impossible tiling settings with a message (tile_size 0 = tiling off)."""
    if tile_size < 0 or 0 < tile_size < 16:
        raise SettingsError(f"tile_size must be 0 (off) or at least 16 pixels, got {tile_size}")
    if not 0.0 <= tile_overlap < 1.0:
        raise SettingsError(f"tile_overlap is a fraction of the tile in [0, 1), got {tile_overlap}")
    if tile_reduce not in REDUCE_RULES:
        raise SettingsError(f"tile_reduce must be one of {', '.join(REDUCE_RULES)}, got {tile_reduce!r}")


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis (see the module docstring)."""
    tile = min(tile, length)
    if tile >= length:
        return [0]
    step = max(tile * (1.0 - overlap), 1.0)
    n = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_boxes(height: int, width: int, tile_size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(top, left, tile height, tile width) of every tile of a height x width image, row by row."""
    th, tw = min(tile_size, height), min(tile_size, width)
    return [(y, x, th, tw) for y in tile_starts(height, tile_size, overlap)
            for x in tile_starts(width, tile_size, overlap)]


def make_tiles(images: Sequence[np.ndarray], tile_size: int, overlap: float) -> list[Tile]:
    return [Tile(i, *box) for i, img in enumerate(images)
            for box in tile_boxes(img.shape[0], img.shape[1], tile_size, overlap)]


def crop(image: np.ndarray, tile: Tile) -> np.ndarray:
    """The tile's pixels as a view of the image (no copy)."""
    return image[tile.top:tile.top + tile.height, tile.left:tile.left + tile.width]


def tile_views(images: Sequence[np.ndarray], tile_size: int, overlap: float) -> list[np.ndarray]:
    """Every tile of every image, as views (for fitting on tiles of the good images)."""
    return [crop(images[t.image], t) for t in make_tiles(images, tile_size, overlap)]


def stitched_shape(height: int, width: int, tile_size: int, work: tuple[int, int]) -> tuple[int, int]:
    """Size of the stitched map of a height x width image: the image at the working scale."""
    th, tw = min(tile_size, height), min(tile_size, width)
    return round(height * work[0] / th), round(width * work[1] / tw)


def score_tiled(images: Sequence[np.ndarray], maps_fn: Callable[[list[np.ndarray]], tuple[torch.Tensor, torch.Tensor]],
                *, tile_size: int, overlap: float, work: tuple[int, int], batch_size: int,
                reduce: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Score images tile by tile and stitch.

    maps_fn: list of tile images -> (maps (B, work_h, work_w), scores (B,)), the detector's plain
    scoring of images at its working size. Returns (scores (N,), maps (N, H', W')) with H' x W' the
    stitched size of the first image (maps of images of another size are resized bilinearly to it).
    """
    check_tiling(tile_size, overlap, reduce)
    tiles = make_tiles(images, tile_size, overlap)
    shapes = [stitched_shape(img.shape[0], img.shape[1], tile_size, work) for img in images]
    acc = [torch.zeros(s) if reduce == "mean" else torch.full(s, -torch.inf) for s in shapes]
    count = [torch.zeros(s) for s in shapes] if reduce == "mean" else None
    scores = torch.full((len(images),), -torch.inf)
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start:start + batch_size]
        maps, tile_scores = maps_fn([crop(images[t.image], t) for t in batch])
        for t, m, s in zip(batch, maps, tile_scores):
            img = images[t.image]
            th, tw = min(tile_size, img.shape[0]), min(tile_size, img.shape[1])
            y0, x0 = round(t.top * work[0] / th), round(t.left * work[1] / tw)
            target = acc[t.image][y0:y0 + work[0], x0:x0 + work[1]]
            m = m[: target.shape[0], : target.shape[1]]
            if reduce == "max":
                torch.maximum(target, m, out=target)
            else:
                target += m
                count[t.image][y0:y0 + work[0], x0:x0 + work[1]] += 1
            scores[t.image] = torch.maximum(scores[t.image], s)
    if reduce == "mean":
        acc = [a / c.clamp_min(1) for a, c in zip(acc, count)]
    out_shape = shapes[0]
    stitched = [a if tuple(a.shape) == out_shape else
                F.interpolate(a[None, None], size=out_shape, mode="bilinear", align_corners=False)[0, 0]
                for a in acc]
    return scores.numpy(), torch.stack(stitched).numpy()


def score_patch_detector(detector, images: Sequence[np.ndarray], description: str):
    """The ``_score`` of the patch detectors (PaDiM, PatchCore): batches of ``detector._maps`` at the
    working size, or overlapping tiles stitched back when ``detector.tile_size`` is set."""
    from gaikan.detectors.base import ScoreResult
    from gaikan.progress import batches, track

    if detector.tile_size:
        scores, maps = score_tiled(images, detector._maps, tile_size=detector.tile_size,
                                   overlap=detector.tile_overlap, work=detector.input_size,
                                   batch_size=detector.batch_size, reduce=detector.tile_reduce)
        return ScoreResult(scores, maps)
    scores, maps = [], []
    for sl in track(batches(len(images), detector.batch_size), description):
        amap, score = detector._maps(list(images[sl]))
        maps.append(amap.numpy())
        scores.append(score.numpy())
    return ScoreResult(np.concatenate(scores), np.concatenate(maps))
