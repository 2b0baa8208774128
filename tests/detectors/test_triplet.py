"""Triplet detector: every loss, anchor and mining option reaches the AUROC floor on digits."""

import numpy as np
import pytest

from gaikan.detectors.base import load_detector
from gaikan.detectors.triplet import TripletDetector
from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import image_auroc

from digits_task import FAST_DIGITS, digits_task


@pytest.fixture(scope="module")
def task():
    return digits_task()


@pytest.mark.parametrize("loss", ["euclidean", "cosine", "higher-order"])
@pytest.mark.parametrize("anchor", ["random", "mean"])
def test_each_loss_and_anchor_separates_digits(task, loss, anchor):
    train_x, train_y, test_x, test_y = task
    det = TripletDetector(**FAST_DIGITS, loss=loss, anchor=anchor).fit(train_x, train_y)
    assert image_auroc(test_y, det.score(test_x).scores) >= 0.9


@pytest.mark.parametrize("mining", ["batch-hard", "semi-hard"])
@pytest.mark.parametrize("anchor", ["random", "mean"])
def test_online_mining_separates_digits(task, mining, anchor):
    train_x, train_y, test_x, test_y = task
    det = TripletDetector(**FAST_DIGITS, mining=mining, anchor=anchor).fit(train_x, train_y)
    assert image_auroc(test_y, det.score(test_x).scores) >= 0.9


def test_knn_scoring_and_embedding(task, tmp_path):
    train_x, train_y, test_x, test_y = task
    det = TripletDetector(**FAST_DIGITS, scoring="knn", k=3, embedding_dim=16).fit(train_x, train_y)
    assert image_auroc(test_y, det.score(test_x).scores) >= 0.9
    emb = det.embed(test_x[:5])
    assert emb.shape == (5, 16) and emb.dtype == np.float32
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    np.testing.assert_array_equal(again.embed(test_x[:5]), emb)
    assert again.history_ == det.history_


def test_default_margins_follow_the_loss():
    assert TripletDetector(loss="euclidean").margin_value == 1.0
    assert TripletDetector(loss="cosine").margin_value == 0.4
    assert TripletDetector(loss="cosine", margin=0.2).margin_value == 0.2
    with pytest.raises(SettingsError, match="loss"):
        TripletDetector(loss="hinge")
    with pytest.raises(SettingsError, match="mining"):
        TripletDetector(mining="hardest")
