"""RT-metric images: the vectorised formulas against a plain loop, the maps peak where a defect was
injected, save/reload through state(), bad input refused."""

import numpy as np
import pytest
import torch

from gaikan.data.synthetic import make_defect_dataset
from gaikan.errors import GaikanError, NotFittedError, SettingsError
from gaikan.transforms.rt_metric import RTMetric, rt_features, window_gaussians


def test_beta_and_eta_match_a_plain_loop():
    rng = np.random.default_rng(0)
    x = rng.random((3, 20, 24)).astype(np.float32)
    m = rng.random((20, 24)).astype(np.float32) + 0.1
    k, s = 6, 3
    got = rt_features(torch.from_numpy(x), torch.from_numpy(m), k, s).numpy()
    assert got.shape == (3, 2, (20 - k) // s + 1, (24 - k) // s + 1)
    for i in range(3):
        for a in range(got.shape[2]):
            for b in range(got.shape[3]):
                xw = x[i, a * s:a * s + k, b * s:b * s + k].ravel().astype(np.float64)
                mw = m[a * s:a * s + k, b * s:b * s + k].ravel().astype(np.float64)
                beta = xw @ mw / (mw @ mw)
                eta = np.linalg.norm(xw - beta * mw) / np.sqrt(k * k)
                assert got[i, 0, a, b] == pytest.approx(beta, rel=1e-4)
                assert got[i, 1, a, b] == pytest.approx(eta, rel=1e-3, abs=1e-6)


def test_window_mahalanobis_matches_numpy_on_a_few_windows():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(30, 2, 3, 4)) * np.array([1.0, 0.2])[None, :, None, None]
    mu, inv = window_gaussians(torch.from_numpy(z).float(), shrinkage=0.0)
    for a, b in [(0, 0), (1, 2), (2, 3)]:
        zw = z[:, :, a, b]
        cov = np.cov(zw.T)
        np.testing.assert_allclose(mu[:, a, b].numpy(), zw.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(inv[a, b].numpy(), np.linalg.inv(cov + 1e-8 * np.eye(2)), rtol=1e-3)


@pytest.fixture(scope="module")
def data():
    return make_defect_dataset(30, 6, 12, size=64, seed=11)


@pytest.fixture(scope="module")
def rt(data):
    return RTMetric(window=8, stride=4, image_size=64).fit(data.train.images)


def test_maps_are_highest_where_a_defect_was_injected(rt, data):
    test = data.test
    maps = rt.transform(test.images)
    assert maps.shape == (len(test), 15, 15) and maps.dtype == np.float32
    hits, chance = 0, 0.0
    n_def = 0
    for amap, mask, label in zip(maps, test.masks, test.labels):
        if label == 0:
            continue
        n_def += 1
        # window (a, b) covers pixels [4a, 4a + 8) x [4b, 4b + 8): does the peak window touch the defect?
        a, b = np.unravel_index(np.argmax(amap), amap.shape)
        hits += mask[4 * a:4 * a + 8, 4 * b:4 * b + 8].any()
        touched = np.array([[mask[4 * i:4 * i + 8, 4 * j:4 * j + 8].any() for j in range(15)] for i in range(15)])
        chance += touched.mean()
    assert hits / n_def >= 0.75, (hits, n_def)
    assert hits / n_def > 3 * chance / n_def
    # and defective images reach higher maxima than good ones
    good_max = maps[test.labels == 0].max(axis=(1, 2))
    bad_max = maps[test.labels == 1].max(axis=(1, 2))
    assert np.median(bad_max) > good_max.max()


def test_good_images_give_small_values(rt, data):
    maps = rt.transform(data.train.images[:10])
    # a 2-D Mahalanobis distance on the good images it was fitted on: mean of D^2 is about 2
    assert 1.0 < float(np.mean(maps ** 2)) < 2.5


def test_state_round_trip_gives_identical_maps(rt, data):
    again = RTMetric.from_state(rt.settings(), rt.state())
    alone = RTMetric.from_state(rt.state())  # the settings travel in the state too
    assert alone.settings() == rt.settings()
    expected = rt.transform(data.test.images[:5])
    np.testing.assert_array_equal(expected, again.transform(data.test.images[:5]))
    np.testing.assert_array_equal(expected, alone.transform(data.test.images[:5]))


def test_any_dtype_and_colour_are_accepted(rt, data):
    img = data.test.images[0]
    as_u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, axis=2)
    big = np.kron(img, np.ones((2, 2), np.float32))  # 128 px: resized to the working size
    maps = rt.transform([img, as_u8, rgb, big])
    np.testing.assert_allclose(maps[0], maps[2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(maps[0], maps[1], atol=0.5)
    assert np.isfinite(maps).all()


def test_bad_input_and_bad_state_are_refused(rt, data):
    with pytest.raises(NotFittedError, match="not fitted"):
        RTMetric().transform(data.test.images[:1])
    with pytest.raises(SettingsError, match="at least 2"):
        RTMetric().fit(data.train.images[:1])
    with pytest.raises(SettingsError, match="smaller than the window"):
        RTMetric(window=16, image_size=8)
    state = rt.state()
    state["mu"] = state["mu"][:, :3]
    with pytest.raises(GaikanError, match="inconsistent shapes"):
        RTMetric.from_state(rt.settings(), state)
