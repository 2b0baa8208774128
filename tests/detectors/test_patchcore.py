import numpy as np
import pytest
import torch

from gaikan.detectors.base import load_detector
from gaikan.detectors.patchcore import (
    MemoryBank,
    PatchCore,
    greedy_coreset,
    kcenter_greedy,
    locally_aware_features,
    nearest_distance,
    reweight_factor,
)
from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import image_auroc, pixel_auroc


def _kcenter_plain_loop(points: np.ndarray, n_select: int, start: int) -> list[int]:
    """The textbook greedy k-center: pick the point farthest from its nearest selected centre."""
    selected = [start]
    while len(selected) < n_select:
        best, best_d = None, -1.0
        for i, p in enumerate(points):
            d = min(float(np.sqrt(((p - points[j]) ** 2).sum())) for j in selected)
            if d > best_d:
                best, best_d = i, d
        selected.append(best)
    return selected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcenter_greedy_matches_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(60, 5)) * rng.uniform(0.5, 3.0, size=5)
    ours = kcenter_greedy(torch.from_numpy(points).float(), 12, start=seed).tolist()
    assert ours == _kcenter_plain_loop(points, 12, start=seed)


def test_greedy_coreset_is_seeded_and_covers_the_data():
    rng = np.random.default_rng(3)
    # 4 tight clusters: a coreset of 4 must take one point of each
    centres = rng.normal(size=(4, 200)) * 10
    x = torch.from_numpy(np.repeat(centres, 50, axis=0) + rng.normal(size=(200, 200)) * 0.1).float()
    a = greedy_coreset(x, 0.02, projection_dim=32, seed=5)
    b = greedy_coreset(x, 0.02, projection_dim=32, seed=5)
    assert torch.equal(a, b)
    assert sorted((a // 50).tolist()) == [0, 1, 2, 3]
    assert greedy_coreset(x, 1.0).tolist() == list(range(200))


def _clustered(seed: int) -> tuple[np.random.Generator, torch.Tensor]:
    """4000 points in 24-d around 40 cluster centres (and the generator, for further draws)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 24)) * 6
    return rng, torch.from_numpy(centres[rng.integers(0, 40, 4000)] + rng.normal(size=(4000, 24))).float()


def _covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(points, points[chosen]).min(1).values.max())


def test_chunked_coreset_selection_keeps_the_size_and_the_cover():
    """The linear-cost selection (chunks of the patches in a seeded order, f of each) returns exactly
    round(f N) distinct patches, equals exact greedy when N <= chunk, and covers the data nearly as well
    as exact greedy: its covering radius (the farthest patch from the bank, what PatchCore's scores
    measure) stays within 1.5x that of the exact selection on clustered data, as long as each chunk's
    share of the bank (here 100) exceeds the number of clusters (40). (With fewer picks per chunk than
    clusters a chunk cannot cover its own clusters: docs/patchcore.md says why the default chunk is large.)"""
    rng, x = _clustered(11)
    exact = greedy_coreset(x, 0.1, projection_dim=0, seed=2)
    assert torch.equal(greedy_coreset(x, 0.1, projection_dim=0, seed=2, chunk=4000), exact)
    chunked = greedy_coreset(x, 0.1, projection_dim=0, seed=2, chunk=1000)
    assert len(chunked) == len(exact) == 400 and len(set(chunked.tolist())) == 400
    assert torch.equal(chunked, greedy_coreset(x, 0.1, projection_dim=0, seed=2, chunk=1000))
    assert _covering_radius(x, chunked) <= 1.5 * _covering_radius(x, exact)
    # a random subset of the same size covers worse than either selection
    random_pick = torch.from_numpy(rng.choice(4000, 400, replace=False))
    assert _covering_radius(x, random_pick) > _covering_radius(x, chunked)


def test_presampled_coreset_selection_keeps_the_size_and_the_cover():
    """The default linear-cost selection (greedy on a seeded random pre-sample of S patches, still
    f N picks): exactly round(f N) distinct indices into the full set, seeded, equal to the exact
    selection when N <= S, and a cover of the *whole* data (not only the sample) close to the exact
    one: within 1.5x its covering radius, and better than a random subset of the same size."""
    rng, x = _clustered(12)
    exact = greedy_coreset(x, 0.1, projection_dim=0, seed=2)
    assert torch.equal(greedy_coreset(x, 0.1, projection_dim=0, seed=2, sample=4000), exact)
    sampled = greedy_coreset(x, 0.1, projection_dim=0, seed=2, sample=1500)
    assert len(sampled) == 400 and len(set(sampled.tolist())) == 400 and int(sampled.max()) < 4000
    assert torch.equal(sampled, greedy_coreset(x, 0.1, projection_dim=0, seed=2, sample=1500))
    assert not torch.equal(sampled, greedy_coreset(x, 0.1, projection_dim=0, seed=3, sample=1500))
    assert _covering_radius(x, sampled) <= 1.5 * _covering_radius(x, exact)
    random_pick = torch.from_numpy(rng.choice(4000, 400, replace=False))
    assert _covering_radius(x, random_pick) > _covering_radius(x, sampled)
    # a fraction larger than the sample can hold: every sampled patch, no more
    assert len(greedy_coreset(x, 0.5, projection_dim=0, seed=2, sample=1500)) == 1500


def test_chunked_nearest_distance_matches_brute_force():
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(300, 16)) + 5.0  # an offset makes the norm expansion work for its precision
    queries = rng.normal(size=(97, 16)) + 5.0
    brute = np.sqrt(((queries[:, None, :] - bank[None]) ** 2).sum(-1))
    # chunk_mb tiny: many chunks of a few rows
    memory = MemoryBank(torch.from_numpy(bank).float())
    dist, idx = memory.nearest(torch.from_numpy(queries).float(), k=3, chunk_mb=0.01)
    np.testing.assert_allclose(dist.numpy(), np.sort(brute, 1)[:, :3], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(idx[:, 0].numpy(), brute.argmin(1))
    nd = nearest_distance(torch.from_numpy(queries).float(), torch.from_numpy(bank).float(), chunk_mb=0.01)
    np.testing.assert_allclose(nd.numpy(), brute.min(1), rtol=1e-4, atol=1e-4)


def test_reweight_factor_matches_the_formula():
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(40, 6))
    q = rng.normal(size=(2, 6))
    d_all = np.sqrt(((q[:, None] - bank[None]) ** 2).sum(-1))
    nn = d_all.argmin(1)
    w = reweight_factor(torch.from_numpy(q).float(), torch.from_numpy(nn), MemoryBank(torch.from_numpy(bank).float()),
                        torch.from_numpy(bank).float(), 4).numpy()
    for i in range(2):
        m_star = bank[nn[i]]
        support = np.argsort(np.sqrt(((bank - m_star) ** 2).sum(-1)))[:4]
        assert support[0] == nn[i]
        e = np.exp(d_all[i, support])
        assert w[i] == pytest.approx(1 - e[0] / e.sum(), rel=1e-4)


def test_locally_aware_features_average_the_neighbourhood_and_upsample():
    fine = torch.zeros(1, 2, 8, 8)
    fine[0, 0, 4, 4] = 9.0
    coarse = torch.ones(1, 3, 4, 4)
    x = locally_aware_features([fine, coarse])
    assert x.shape == (1, 5, 8, 8)
    assert x[0, 0, 3:6, 3:6].eq(1.0).all() and x[0, 0].sum() == pytest.approx(9.0)
    assert torch.allclose(x[0, 2:, 3:5, 3:5], torch.ones(3, 2, 2))
    assert x[0, 2, 0, 0] == pytest.approx(4 / 9)  # zero padding counts in the mean (as the reference)
    assert locally_aware_features([fine, coarse], feature_dim=2).shape == (1, 2, 8, 8)


def test_patchcore_ranks_and_localises_injected_defects(defect_split):
    det = PatchCore(image_size=96, coreset_fraction=0.05).fit(defect_split.train.images)
    n_train = det.fit_info_["n_train"]
    assert det.bank_.shape == (round(0.05 * n_train * 12 * 12), 152)
    result = det.score(defect_split.test.images)
    assert result.maps.shape == (len(defect_split.test), 96, 96)
    assert image_auroc(defect_split.test.labels, result.scores) >= 0.95
    assert pixel_auroc(np.stack(defect_split.test.masks), result.maps) >= 0.9
    # the image score is the maximum of the map, the threshold rule of `predict`
    np.testing.assert_allclose(result.scores, result.maps.max(axis=(1, 2)), rtol=1e-6)


def test_float16_bank_halves_the_model_and_reloads_identically(defect_split, tmp_path):
    imgs = defect_split.train.images[:16]
    # updatable=False: no calibration images in the model, so its size is the bank's
    a = PatchCore(image_size=64, coreset_fraction=0.1, reweight=True, updatable=False).fit(imgs)
    b = PatchCore(image_size=64, coreset_fraction=0.1, reweight=True, storage_dtype="float16",
                  updatable=False).fit(imgs)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    size = lambda p: (p / "tensors.npz").stat().st_size  # noqa: E731
    assert size(tmp_path / "b") < 0.6 * size(tmp_path / "a")
    test = defect_split.test.images
    b2 = load_detector(tmp_path / "b")
    np.testing.assert_array_equal(b.score(test).scores, b2.score(test).scores)
    np.testing.assert_allclose(a.score(test).scores, b.score(test).scores, rtol=2e-3)


def test_same_seed_same_bank_and_bad_settings_are_refused(defect_split):
    imgs = defect_split.train.images[:8]
    a = PatchCore(image_size=64, coreset_fraction=0.05, seed=2).fit(imgs)
    b = PatchCore(image_size=64, coreset_fraction=0.05, seed=2).fit(imgs)
    assert torch.equal(a.bank_, b.bank_)
    with pytest.raises(SettingsError, match="coreset_fraction"):
        PatchCore(image_size=64, coreset_fraction=0.0).fit(imgs)
    with pytest.raises(SettingsError, match="storage_dtype"):
        PatchCore(image_size=64, storage_dtype="int8").fit(imgs)
    with pytest.raises(SettingsError, match="tile_overlap"):
        PatchCore(image_size=64, tile_size=128, tile_overlap=1.5).fit(imgs)
