"""Synthetic defects and textures (gaikan.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest

from gaikan.data import DataSplit
from gaikan.data.synthetic import (
    DEFECT_KINDS,
    add_cutpaste,
    add_random_defect,
    add_scratch,
    add_spot,
    make_defect_dataset,
    make_textured_images,
)

DEFECTS = [add_scratch, add_spot, add_cutpaste, add_random_defect]


def texture(channels=1, size=64, seed=0):
    return make_textured_images(1, size, np.random.default_rng(seed), channels=channels)[0]


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_defect_changes_pixels_only_inside_mask(defect, channels, seed):
    img = texture(channels, seed=seed)
    out, mask = defect(img, np.random.default_rng(seed))
    assert out.dtype == np.float32 and out.shape == img.shape
    assert mask.dtype == bool and mask.shape == img.shape[:2]
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert mask.any()
    np.testing.assert_array_equal(out[~mask], img[~mask])
    change = np.abs(out - img)
    if change.ndim == 3:
        change = change.max(axis=2)
    assert change[mask].mean() > 0.1  # visible, not a no-op
    assert change[~mask].max() == 0.0


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda f: f.__name__)
def test_defect_is_seeded_and_input_untouched(defect):
    img = texture()
    before = img.copy()
    a, ma = defect(img, np.random.default_rng(3))
    b, mb = defect(img, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(img, before)
    c, _ = defect(img, np.random.default_rng(4))
    assert not np.array_equal(a, c)


def test_uint8_input_and_explicit_sizes():
    img = (texture() * 255).astype(np.uint8)
    out, mask = add_scratch(img, np.random.default_rng(0), width=3, length=40, polarity="bright")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[~mask], img[~mask] / 255.0, rtol=1e-6)
    assert out[mask].mean() > 0.8
    out, mask = add_spot(img, np.random.default_rng(0), radius=6, blob=False, polarity="dark")
    assert abs(int(mask.sum()) - np.pi * 36) < 15  # a disk of radius 6
    assert out[mask].mean() < img[mask].mean() / 255.0
    out, mask = add_cutpaste(img, np.random.default_rng(0), patch_size=(10, 20))
    rows, cols = np.nonzero(mask)
    assert np.ptp(rows) + 1 == 10 and np.ptp(cols) + 1 == 20 and mask.sum() == 200


def test_random_defect_min_area_and_kinds():
    rng = np.random.default_rng(1)
    img = texture(size=96)
    for _ in range(20):
        _, mask = add_random_defect(img, rng, scale=1.5, min_area=0.01)
        assert mask.mean() >= 0.01
    assert DEFECT_KINDS == ("scratch", "spot", "cutpaste")


def test_textures():
    rng = np.random.default_rng(0)
    gray = make_textured_images(4, (40, 50), rng)
    assert len(gray) == 4 and all(g.shape == (40, 50) and g.dtype == np.float32 for g in gray)
    assert all(0 <= g.min() and g.max() <= 1 for g in gray)
    assert not np.array_equal(gray[0], gray[1])  # shifts and noise differ
    # same family: images are much closer to each other than to a shuffled image
    assert np.abs(gray[0] - gray[1]).mean() < np.abs(gray[0] - np.random.default_rng(0).permutation(gray[1].ravel()).reshape(40, 50)).mean()
    rgb = make_textured_images(2, 32, rng, channels=3)
    assert rgb[0].shape == (32, 32, 3)
    again = make_textured_images(4, (40, 50), np.random.default_rng(0))
    np.testing.assert_array_equal(gray[0], again[0])


def test_make_defect_dataset():
    split = make_defect_dataset(6, 4, 10, size=64, seed=5)
    assert isinstance(split, DataSplit) and split.spec == "synthetic"
    assert len(split.train) == 6 and split.train.labels.tolist() == [0] * 6
    test = split.test
    assert len(test) == 14 and test.labels.tolist() == [0] * 4 + [1] * 10
    assert test.has_masks and all(m.shape == (64, 64) and m.dtype == bool for m in test.masks)
    assert not any(m.any() for m in test.masks[:4])
    assert all(m.mean() >= 0.01 for m in test.masks[4:])
    assert set(test.defect_types[4:]) <= set(DEFECT_KINDS) and test.defect_types[:4] == ["good"] * 4
    again = make_defect_dataset(6, 4, 10, size=64, seed=5)
    for a, b in zip(test.images, again.test.images):
        np.testing.assert_array_equal(a, b)
    rgb = make_defect_dataset(2, 1, 2, size=(48, 64), seed=0, channels=3)
    assert rgb.test.images[-1].shape == (48, 64, 3)
