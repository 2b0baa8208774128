"""Classifier-embedding detector on digits, with the EfficientNet head on injected defects."""

import numpy as np
import pytest

from gaikan.detectors.base import load_detector
from gaikan.detectors.classifier_embedding import ClassifierEmbeddingDetector
from gaikan.evaluation.metrics import image_auroc

from digits_task import FAST_DIGITS, digits_task


def test_classifier_embedding_separates_digits():
    train_x, train_y, test_x, test_y = digits_task()
    det = ClassifierEmbeddingDetector(**FAST_DIGITS).fit(train_x, train_y)
    assert det.class_ids_.tolist() == [0, 1]
    assert image_auroc(test_y, det.score(test_x).scores) >= 0.9
    assert det.history_["val_loss"][-1] < det.history_["val_loss"][0]


def test_efficientnet_head_on_injected_defects(defect_split, tmp_path):
    det = ClassifierEmbeddingDetector(net="efficientnet", stage=3, image_size=64, epochs=4, batch_size=16)
    det.fit(defect_split.train.images)
    test = defect_split.test
    scores = det.score(test.images).scores
    assert image_auroc(test.labels, scores) >= 0.9
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")  # only the head is saved; the frozen backbone is rebuilt
    assert not any(k.startswith("net.backbone") for k in again.manifest_["tensors"]["arrays"])
    np.testing.assert_array_equal(again.score(test.images[:4]).scores, det.score(test.images[:4]).scores)


def test_finetuned_backbone_is_saved_and_reloaded(defect_split, tmp_path):
    det = ClassifierEmbeddingDetector(net="efficientnet", stage=2, finetune=True, image_size=32, epochs=1,
                                      batch_size=16)
    det.fit(defect_split.train.images[:20])
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    assert any(k.startswith("net.backbone") for k in again.manifest_["tensors"]["arrays"])
    images = defect_split.test.images[:4]
    np.testing.assert_array_equal(again.score(images).scores, det.score(images).scores)
