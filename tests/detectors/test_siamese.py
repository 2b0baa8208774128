"""Siamese detector on a digits task (good-only and with labelled defects) and the mean anchor."""

import numpy as np
import pytest

from gaikan.detectors.siamese import SiameseDetector
from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import image_auroc

from digits_task import FAST_DIGITS, digits_task


@pytest.fixture(scope="module")
def task():
    return digits_task()


@pytest.mark.parametrize("anchor", ["random", "mean"])
def test_siamese_separates_digits_with_labelled_defects(task, anchor):
    train_x, train_y, test_x, test_y = task
    det = SiameseDetector(**FAST_DIGITS, anchor=anchor).fit(train_x, train_y)
    assert det.train_info_["negatives"] == "real"
    assert image_auroc(test_y, det.score(test_x).scores) >= 0.9
    assert len(det.history_["train_loss"]) == FAST_DIGITS["epochs"]
    assert len(det.history_["val_loss"]) == FAST_DIGITS["epochs"]


def test_siamese_learns_from_good_images_only_with_synthetic_negatives(task):
    train_x, train_y, test_x, test_y = task
    good = [img for img, lab in zip(train_x, train_y) if lab == 0]
    det = SiameseDetector(**FAST_DIGITS).fit(good)
    assert det.train_info_["negatives"] == "synthetic"
    assert image_auroc(test_y, det.score(test_x).scores) >= 0.9


def test_siamese_settings_are_checked():
    with pytest.raises(SettingsError, match="anchor"):
        SiameseDetector(anchor="median")
    with pytest.raises(SettingsError, match="net"):
        SiameseDetector(net="resnet")
    det = SiameseDetector.from_options({"net": "mlp", "margin": "2", "anchor": "mean", "hidden": "64,32"})
    assert det.margin == 2.0 and det.anchor == "mean" and det.hidden == (64, 32)
