import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from gaikan.detectors.maps import gaussian_blur, smooth_map, upsample
from gaikan.detectors.padim import PaDiM, embed, mahalanobis, whitening_factors
from gaikan.evaluation.metrics import image_auroc, pixel_auroc


def test_batched_mahalanobis_matches_scipy_on_random_data():
    rng = np.random.default_rng(0)
    n_pos, d, n_train, batch = 5, 6, 40, 3
    train = rng.normal(size=(n_train, n_pos, d)) @ rng.normal(size=(d, d))
    sum_x = torch.from_numpy(train.sum(0))
    sum_xxt = torch.from_numpy(np.einsum("npd,npe->pde", train, train))
    eps = 0.01
    mean, whiten = whitening_factors(sum_x, sum_xxt, n_train, eps)
    x = rng.normal(size=(batch, n_pos, d))
    ours = mahalanobis(torch.from_numpy(x).float(), mean, whiten).numpy()
    for p in range(n_pos):
        cov = np.cov(train[:, p], rowvar=False) + eps * np.eye(d)
        inv = np.linalg.inv(cov)
        for b in range(batch):
            expected = scipy_mahalanobis(x[b, p], train[:, p].mean(0), inv)
            assert ours[b, p] == pytest.approx(expected, rel=1e-4)


def test_gaussian_blur_matches_scipy_inside_the_image():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    m = rng.random((1, 80, 80)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(m), 4.0).numpy()[0]
    ref = gaussian_filter(m[0], 4.0, truncate=4.0)
    np.testing.assert_allclose(ours[20:-20, 20:-20], ref[20:-20, 20:-20], atol=1e-5)


@pytest.mark.parametrize("grid, size, sigma", [((28, 28), (224, 224), 4.0), ((12, 20), (96, 160), 4.0),
                                               ((7, 7), (7, 7), 4.0), ((6, 9), (24, 36), 0.0), ((3, 4), (12, 16), 4.0)])
def test_smooth_map_is_the_upsampling_and_smoothing_as_matrix_products(grid, size, sigma):
    """Same operator as the convolution path, including its edge rules: reflect padding, replicate when
    the map is smaller than the kernel (12 x 16 at sigma 4), no upsampling at equal size, sigma 0."""
    g = torch.from_numpy(np.random.default_rng(2).random((3, *grid), dtype=np.float32))
    expected = gaussian_blur(upsample(g, size), sigma)
    ours = smooth_map(g, size, sigma)
    assert ours.shape == expected.shape == (3, *size)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(smooth_map(g.double(), size, sigma).numpy(), expected.double().numpy(), atol=2e-6)


def test_padim_ranks_injected_defects_above_good_parts_and_localises_them(defect_split):
    det = PaDiM(image_size=96, n_features=60).fit(defect_split.train.images)
    result = det.score(defect_split.test.images)
    assert result.maps.shape == (len(defect_split.test), 96, 96)
    assert image_auroc(defect_split.test.labels, result.scores) >= 0.9
    masks = np.stack(defect_split.test.masks)
    assert pixel_auroc(masks, result.maps) >= 0.9


def test_same_seed_same_model_and_other_seed_other_channels(defect_split):
    imgs = defect_split.train.images[:12]
    a = PaDiM(image_size=64, n_features=20, seed=3).fit(imgs)
    b = PaDiM(image_size=64, n_features=20, seed=3).fit(imgs)
    c = PaDiM(image_size=64, n_features=20, seed=4).fit(imgs)
    assert torch.equal(a.whiten_, b.whiten_)
    assert not torch.equal(a.channel_index_, c.channel_index_)


def test_validation_goods_are_held_out_and_max_good_gives_no_false_alarm(defect_split):
    det = PaDiM(image_size=64, n_features=20).fit(defect_split.train.images, validation_fraction=0.25)
    assert det.fit_info_["n_train"] == 30 and det.fit_info_["n_calibration"] == 10
    assert len(det.calibration_scores_) == 10
    assert (det.calibration_scores_ > det.thresholds.values["max-good"]).sum() == 0
    assert det.threshold == det.thresholds.values["max-good"]


def test_invalid_settings_are_refused():
    from gaikan.errors import SettingsError

    with pytest.raises(SettingsError, match="n_features"):
        PaDiM(image_size=64, n_features=5000).fit([np.zeros((64, 64), np.uint8)] * 4)
    with pytest.raises(SettingsError, match="has no setting 'nfeatures'"):
        PaDiM.from_options({"nfeatures": "3"})


def test_an_unsupervised_detector_never_learns_from_defective_images(defect_split):
    test = defect_split.test
    images = defect_split.train.images[:16] + test.images
    labels = [0] * 16 + list(test.labels)
    with_labels = PaDiM(image_size=64, n_features=16).fit(images, labels)
    goods_only = PaDiM(image_size=64, n_features=16).fit(images[:16] + [im for im, lab in zip(test.images, test.labels)
                                                                        if lab == 0])
    assert with_labels.fit_info_["n_train_defective"] == 0
    assert torch.equal(with_labels.whiten_, goods_only.whiten_)


def _all_embeddings(det, images):
    """(N, P, d) float64 embeddings of the fitted detector's channels, one image at a time."""
    return np.concatenate([det._embed_batch([img]).double().numpy() for img in images])


def _whitened_distance_loop(x, mean, cov):
    inv = np.linalg.inv(cov)
    return np.sqrt((x - mean) @ inv @ (x - mean))


@pytest.mark.parametrize("accumulate", [1, 5, 64])
def test_streamed_fit_equals_the_covariance_of_all_embeddings(defect_split, accumulate):
    """The chunked float32 products added into float64 totals give each position's sample covariance
    (+ eps I), whatever the chunk size: checked against numpy's covariance of all embeddings."""
    images = defect_split.train.images[:14]
    det = PaDiM(image_size=64, n_features=12, batch_size=3, accumulate=accumulate,
                eps=0.01).fit(images, validation_fraction=0)
    emb = _all_embeddings(det, images)
    np.testing.assert_allclose(det.mean_.numpy(), emb.mean(0), rtol=1e-4, atol=1e-5)
    x = emb[0, :, :] + 0.3
    dist = mahalanobis(torch.from_numpy(x[None]).float(), det.mean_, det.whiten_).numpy()[0]
    for p in range(0, emb.shape[1], 37):
        cov = np.cov(emb[:, p], rowvar=False) + 0.01 * np.eye(12)
        assert dist[p] == pytest.approx(_whitened_distance_loop(x[p], emb[:, p].mean(0), cov), rel=2e-3)


def test_shared_gaussian_is_one_gaussian_over_every_position(defect_split):
    """gaussian="shared": one mean and covariance over the patches of all positions and images; the
    distance of every patch is to that one Gaussian (checked with a loop over a few patches)."""
    images = defect_split.train.images[:10]
    det = PaDiM(image_size=64, n_features=10, gaussian="shared").fit(images, validation_fraction=0)
    assert det.mean_.shape == (1, 10) and det.whiten_.shape == (1, 10, 10)
    emb = _all_embeddings(det, images).reshape(-1, 10)
    cov = np.cov(emb, rowvar=False) + det.eps * np.eye(10)
    probe = _all_embeddings(det, [defect_split.test.images[0]])[0]
    dist = mahalanobis(torch.from_numpy(probe[None]).float(), det.mean_, det.whiten_).numpy()[0]
    for p in (0, 17, 100, len(probe) - 1):
        assert dist[p] == pytest.approx(_whitened_distance_loop(probe[p], emb.mean(0), cov), rel=2e-3)


def test_n_features_zero_keeps_every_channel_and_shared_model_ranks_defects(defect_split):
    det = PaDiM(image_size=96, n_features=0, gaussian="shared").fit(defect_split.train.images)
    assert det.channel_index_.tolist() == list(range(sum(det.extractor.channels)))
    scores = det.score(defect_split.test.images).scores
    assert image_auroc(defect_split.test.labels, scores) >= 0.9
    with pytest.raises(Exception, match="gaussian must be one of"):
        PaDiM(gaussian="global").fit(defect_split.train.images[:4])
