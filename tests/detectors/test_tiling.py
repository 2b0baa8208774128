import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gaikan.detectors.patchcore import PatchCore
from gaikan.detectors.tiling import score_tiled, tile_boxes, tile_starts
from gaikan.errors import SettingsError


@pytest.mark.parametrize("length, tile, overlap", [(3872, 256, 0.25), (3200, 512, 0.5), (300, 224, 0.0), (100, 224, 0.25)])
def test_tiles_cover_the_axis_with_at_least_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] + t == length
    gaps = np.diff(starts)
    assert (gaps > 0).all() and (t - gaps >= overlap * t - 1).all()


def test_stitching_puts_every_tile_back_in_place():
    rng = np.random.default_rng(0)
    image = rng.random((70, 101)).astype(np.float32)
    seen = []

    def identity(tiles):  # a "detector" whose map is the tile itself, at scale 1
        seen.append(len(tiles))
        maps = torch.from_numpy(np.stack(tiles))
        return maps, maps.amax(dim=(1, 2))

    for reduce in ("max", "mean"):
        scores, maps = score_tiled([image, image[::-1].copy()], identity, tile_size=32, overlap=0.3, work=(32, 32),
                                   batch_size=5, reduce=reduce)
        np.testing.assert_allclose(maps[0], image, rtol=1e-6)
        np.testing.assert_allclose(maps[1], image[::-1], rtol=1e-6)
        np.testing.assert_allclose(scores, [image.max()] * 2)
    assert max(seen) <= 5  # memory is bounded by the tile batch
    assert len(tile_boxes(70, 101, 32, 0.3)) == 3 * 5


def _texture(h, w, rng):
    """A fine periodic texture (period 53 px, not a divisor of the tile stride), pixel noise and a
    smooth random shading (scale 32 px, std 0.05: the part-to-part variation that survives shrinking
    the whole image to the working size), float32."""
    k = np.float32(2 * np.pi / 53)
    y = np.arange(h, dtype=np.float32)[:, None] + rng.uniform(0, 53)
    x = np.arange(w, dtype=np.float32)[None, :] + rng.uniform(0, 53)
    img = 0.5 + 0.2 * np.cos(k * y) * np.cos(k * x) + 0.02 * rng.standard_normal((h, w), dtype=np.float32)
    low = torch.from_numpy(rng.standard_normal((h // 32 + 2, w // 32 + 2)).astype(np.float32))
    field = F.interpolate(low[None, None], scale_factor=32, mode="bilinear")[0, 0, :h, :w].numpy()
    img += 0.05 * field / field.std()
    return img


def test_tiling_finds_a_20_pixel_defect_in_a_3872x3200_image_that_plain_resizing_misses():
    rng = np.random.default_rng(0)
    h, w = 3200, 3872
    good = [_texture(h, w, rng) for _ in range(3)]
    defective = good[2].copy()
    cy, cx = 1700, 2500
    yy, xx = np.ogrid[:h, :w]
    defective[(yy - cy) ** 2 + (xx - cx) ** 2 <= 10 ** 2] -= 0.35  # a dark spot 20 pixels across
    np.clip(defective, 0.0, 1.0, out=defective)  # float images are [0, 1] (values outside are refused)

    # tiled: learns from the tiles of two 1200 x 1200 good crops; the third good image, whole and
    # without the spot, sets the threshold (max-good), the way `fit` calibrates on held-out goods
    tiled = PatchCore(image_size=128, tile_size=512, tile_overlap=0.2, coreset_fraction=0.05, batch_size=16)
    tiled.fit([good[0][:1200, :1200], good[1][1000:2200, 2000:3200]], validation_fraction=0)
    tiled.calibrate(tiled.score([good[2]]).scores)
    result = tiled.score([defective])
    amap = result.maps[0]
    assert amap.shape == (h // 4, w // 4)  # the image at the working scale 128 / 512
    y, x = np.unravel_index(np.argmax(amap), amap.shape)
    assert result.scores[0] > tiled.threshold * 1.3  # found (measured: 26.3 against 14.3)
    assert np.hypot(4 * y - cy, 4 * x - cx) < 40  # and located, in native pixels

    # plain resizing of the whole image to the working size: the spot is lost in the shading
    plain = PatchCore(image_size=128, coreset_fraction=0.5).fit(good[:2], validation_fraction=0)
    plain.calibrate(plain.score([good[2]]).scores)
    missed = plain.score([defective])
    assert missed.scores[0] < plain.threshold * 1.05
    y, x = np.unravel_index(np.argmax(missed.maps[0]), missed.maps[0].shape)
    assert np.hypot(y * h / 128 - cy, x * w / 128 - cx) > 200


def test_bad_tiling_settings_are_refused():
    with pytest.raises(SettingsError, match="tile_size"):
        PatchCore(tile_size=8).fit([np.zeros((64, 64), np.uint8)] * 4)
    with pytest.raises(SettingsError, match="tile_reduce"):
        PatchCore(tile_size=32, tile_reduce="median").fit([np.zeros((64, 64), np.uint8)] * 4)
