import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from gaikan.detectors.maps import gaussian_blur
from gaikan.detectors.padim import PaDiM, mahalanobis, whitening_factors
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
