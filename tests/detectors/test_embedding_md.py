"""Scoring on embeddings (Mahalanobis to the unit space with shrinkage, kNN) against plain loops; the
embedding detectors' fit protocol (defects as classes, good-only, calibration on goods), IDX data
through the pipeline, and RT-metric input."""

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from gaikan import pipeline
from gaikan.data.datasets import DataSplit, ImageSet
from gaikan.detectors.base import load_detector
from gaikan.detectors.embedding_md import knn_scores, mahalanobis_scores, shrunk_covariance, unit_space
from gaikan.detectors.triplet import TripletDetector
from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import image_auroc

from digits_task import FAST_DIGITS, digits_task


def test_mahalanobis_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(30, 5)) @ rng.normal(size=(5, 5))
    queries = rng.normal(size=(6, 5)) * 2
    mean, whiten, _ = unit_space(good, 0.1)
    _, cov, _ = shrunk_covariance(good, 0.1)
    inv = np.linalg.inv(cov)
    loop = [scipy_mahalanobis(q, good.mean(0), inv) ** 2 / 5 for q in queries]
    np.testing.assert_allclose(mahalanobis_scores(queries, mean, whiten), loop, rtol=1e-4)


def test_shrinkage_formulas():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 4))
    s = np.cov(x, rowvar=False, bias=True)
    _, cov, a = shrunk_covariance(x, 0.3)
    np.testing.assert_allclose(cov, 0.7 * s + 0.3 * np.trace(s) / 4 * np.eye(4))
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    _, cov_lw, a_lw = shrunk_covariance(x, "ledoit-wolf")
    np.testing.assert_allclose(cov_lw, lw.covariance_)
    assert a_lw == pytest.approx(lw.shrinkage_)
    with pytest.raises(SettingsError, match="shrinkage"):
        shrunk_covariance(x, 1.5)


def test_unit_space_survives_more_dimensions_than_samples():
    rng = np.random.default_rng(2)
    good = rng.normal(size=(10, 64))
    mean, whiten, _ = unit_space(good)
    scores = mahalanobis_scores(np.r_[good[:3], good[:3] + 5.0], mean, whiten)
    assert np.isfinite(scores).all() and scores[3:].min() > scores[:3].max()


def test_knn_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    bank, q = rng.normal(size=(25, 6)), rng.normal(size=(7, 6))
    loop = [np.sort(np.linalg.norm(bank - v, axis=1))[:3].mean() for v in q]
    np.testing.assert_allclose(knn_scores(q, bank, 3, chunk=4), loop, rtol=1e-5)


def test_defects_train_the_net_but_calibration_uses_held_out_goods_only():
    train_x, train_y, _, _ = digits_task(n_good_train=60, n_defect_train=20)
    det = TripletDetector(**{**FAST_DIGITS, "epochs": 2}).fit(train_x, train_y, validation_fraction=0.2)
    assert det.fit_info_["n_calibration"] == 12 and det.fit_info_["n_train"] == 48 + 20
    assert det.fit_info_["n_train_defective"] == 20
    assert det.train_info_ == {"negatives": "real", "n_good": 48, "n_negative": 20, "classes": [0, 1]}
    both = TripletDetector(**{**FAST_DIGITS, "epochs": 1}, negatives="both").fit(train_x, train_y)
    assert both.train_info_["negatives"] == "both" and both.train_info_["n_negative"] == 20 + 54
    assert both.train_info_["classes"] == [0, 1, 2, 3, 4]  # good, the digit, three synthetic kinds
    good = [x for x, y in zip(train_x, train_y) if y == 0]
    with pytest.raises(SettingsError, match="needs defective training images"):
        TripletDetector(**{**FAST_DIGITS, "epochs": 1}, negatives="real").fit(good)


def test_pipeline_gives_each_defect_type_its_own_class():
    train_x, train_y, test_x, test_y = digits_task(n_good_train=60, n_defect_train=20)
    types = ["good" if y == 0 else ("crack" if i % 2 else "spot") for i, y in enumerate(train_y)]
    train = ImageSet(train_x, train_y, [f"t{i}" for i in range(len(train_x))], types)
    test = ImageSet(test_x, test_y, [f"s{i}" for i in range(len(test_x))],
                    ["good" if y == 0 else "spot" for y in test_y])
    det = pipeline.fit_detector(TripletDetector(**FAST_DIGITS, mining="batch-hard"),
                                DataSplit("test", train, test))
    assert det.train_info_["n_negative"] == 20
    assert det.train_info_["classes"] == [0, 1, 2]  # good, crack, spot
    run = pipeline.evaluate_detector(det, DataSplit("test", train, test))
    assert run.evaluation.image_auroc >= 0.9


def test_idx_data_through_the_pipeline(tmp_path):
    from sklearn.datasets import load_digits

    from gaikan.data.datasets import write_idx

    d = load_digits()
    images = (d.images * 15.9).astype(np.uint8)
    n = 1200
    write_idx(tmp_path / "train-images-idx3-ubyte", images[:n])
    write_idx(tmp_path / "train-labels-idx1-ubyte", d.target[:n].astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[n:])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", d.target[n:].astype(np.uint8))
    spec = f"idx:{tmp_path}?good=3&defect=8"
    det = pipeline.make_detector("triplet", {k: str(v) for k, v in FAST_DIGITS.items()})
    split = pipeline.load_split_for(det, spec)
    assert set(split.train.labels.tolist()) == {0, 1}  # the defect digit's training images are used
    pipeline.fit_detector(det, split)
    assert det.train_info_["negatives"] == "real"
    run = pipeline.evaluate_detector(det, split)
    assert run.evaluation.image_auroc >= 0.9


def test_rt_metric_input(defect_split, tmp_path):
    pytest.importorskip("gaikan.transforms.rt_metric")
    det = TripletDetector(input="rt", image_size=48, epochs=8, batch_size=16, rt_window=6, rt_stride=2)
    det.fit(defect_split.train.images)
    assert det.in_shape_ == (1, 22, 22)
    test = defect_split.test
    scores = det.score(test.images).scores
    assert image_auroc(test.labels, scores) >= 0.9
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    np.testing.assert_array_equal(again.score(test.images[:5]).scores, det.score(test.images[:5]).scores)
