"""cnn-classifier: Grad-CAM against its closed form, heat maps that peak on the injected defect,
labels required, the map maximum equals the score."""

import numpy as np
import pytest
import torch

from gaikan.data.synthetic import make_defect_dataset
from gaikan.detectors.classifier import ClassifierHead, CNNClassifier, grad_cam
from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import image_auroc


def test_grad_cam_equals_its_closed_form_for_a_pooled_linear_head():
    # with global average pooling and a linear layer, dy/dA_c(p) = w_c / (h w) at every p, so
    # Grad-CAM = ReLU(sum_c (w_c / (h w)) A_c)
    torch.manual_seed(0)
    head = ClassifierHead(5, 4, 3, dropout=0.0).eval()
    feats = torch.randn(2, 5, 6, 7)
    logits, cam = grad_cam(head, feats)
    acts = torch.relu(head.conv(feats))
    w = head.fc.weight[0].detach()
    expected = torch.relu((w[None, :, None, None] / 42.0 * acts).sum(1))
    torch.testing.assert_close(cam, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, head(feats).detach())


@pytest.fixture(scope="module")
def task():
    """30 good + 20 defective training images; 10 good + 20 unseen defective test images (96 px)."""
    data = make_defect_dataset(30, 10, 40, size=96, seed=5)
    test = data.test
    defects = np.flatnonzero(test.labels == 1)
    train_imgs = data.train.images + [test.images[i] for i in defects[:20]]
    train_labels = np.r_[data.train.labels, np.ones(20, np.int64)]
    held = np.r_[np.flatnonzero(test.labels == 0), defects[20:]]
    return train_imgs, train_labels, test.subset(held)


@pytest.fixture(scope="module")
def fitted(task):
    images, labels, _ = task
    return CNNClassifier(image_size=96, epochs=20).fit(images, labels)


def test_unseen_defects_are_found(fitted, task):
    test = task[2]
    assert image_auroc(test.labels, fitted.score(test.images).scores) >= 0.9


def test_grad_cam_peaks_on_the_injected_defect(fitted, task):
    test = task[2]
    result = fitted.score(test.images)
    assert result.maps.shape == (len(test), 96, 96)
    hits, chance, r = 0, 0.0, 8  # the peak within 8 px of the defect (half a stride-16 cell)
    defective = np.flatnonzero(test.labels == 1)
    for i in defective:
        amap, mask = result.maps[i], test.masks[i]
        a, b = np.unravel_index(np.argmax(amap), amap.shape)
        hits += mask[max(0, a - r):a + r + 1, max(0, b - r):b + r + 1].any()
        # chance: the share of pixels within r of the defect
        ys, xs = np.nonzero(mask)
        near = np.zeros_like(mask)
        for y, x in zip(ys, xs):
            near[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
        chance += near.mean()
    rate, chance = hits / len(defective), chance / len(defective)
    assert rate >= 0.7, (rate, chance)
    assert rate > 2 * chance, (rate, chance)


def test_the_map_maximum_is_the_ng_probability(fitted, task):
    result = fitted.score(task[2].images[:6])
    assert ((result.scores >= 0) & (result.scores <= 1)).all()
    np.testing.assert_allclose(result.maps.max(axis=(1, 2)), result.scores, rtol=1e-5, atol=1e-6)


def test_labels_with_both_classes_are_required(task):
    images, labels, _ = task
    with pytest.raises(SettingsError, match="labels are required"):
        CNNClassifier(image_size=96, epochs=1).fit(images)
    good = labels == 0
    with pytest.raises(SettingsError, match="OK and NG"):
        CNNClassifier(image_size=96, epochs=1).fit([im for im, g in zip(images, good) if g], labels[good])
    with pytest.raises(SettingsError, match="input"):
        CNNClassifier(input="pixels")
