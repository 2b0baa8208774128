"""Behaviour of gaikan.evaluation.metrics (rule everywhere: NG iff score > threshold)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from gaikan.errors import DataError, SettingsError
from gaikan.evaluation import metrics
from gaikan.evaluation.metrics import (
    Confusion,
    aupro,
    average_precision,
    best_f1,
    confusion_at,
    detection_rate_at_false_alarm,
    evaluate_scores,
    image_auroc,
    pixel_auroc,
    pro_curve,
    resize_maps,
    spearman,
)


def _separable(n_good=40, n_def=20, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_def, int)]
    scores = np.r_[rng.uniform(0, 1, n_good), rng.uniform(2, 3, n_def)].astype(np.float32)
    return labels, scores


def _noisy(n_good=300, n_def=80, seed=1, shift=1.2):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_def, int)]
    scores = (rng.normal(size=n_good + n_def) + shift * labels).astype(np.float32)
    perm = rng.permutation(len(labels))
    return labels[perm], scores[perm]


# ---------------------------------------------------------------------------------------------
# image AUROC / AP
# ---------------------------------------------------------------------------------------------
def test_image_auroc_perfect_reversed_and_tied():
    labels, scores = _separable()
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0
    assert image_auroc(labels, np.ones(len(labels))) == 0.5


def test_image_auroc_matches_sklearn():
    labels, scores = _noisy()
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_refuses_bad_labels_and_one_class():
    with pytest.raises(ValueError, match="-1"):
        image_auroc([0, 1, -1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        image_auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both good"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, np.nan])


def test_average_precision():
    labels, scores = _separable()
    assert average_precision(labels, scores) == 1.0
    labels, scores = _noisy()
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores))


def test_spearman():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# confusion, F1, detection rate
# ---------------------------------------------------------------------------------------------
def test_confusion_counts_and_rates():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.5, 0.9, 0.5, 0.8, 0.95])
    c = confusion_at(labels, scores, 0.5)  # strict: 0.5 is OK
    assert (c.tn, c.fp, c.fn, c.tp) == (3, 1, 1, 2)
    assert c.as_matrix().tolist() == [[3, 1], [1, 2]]
    assert c.accuracy == pytest.approx(5 / 7)
    assert c.precision == pytest.approx(2 / 3)
    assert c.recall == pytest.approx(2 / 3)
    assert c.false_alarm_rate == pytest.approx(1 / 4)
    assert c.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    d = c.to_dict()
    assert d["tp"] == 2 and d["f1"] == pytest.approx(c.f1)
    json.dumps(d, allow_nan=False)


def test_confusion_undefined_ratios_are_none_in_dict():
    c = Confusion(tn=5, fp=0, fn=0, tp=0)
    assert np.isnan(c.precision) and np.isnan(c.recall)
    d = c.to_dict()
    assert d["precision"] is None and d["recall"] is None and d["f1"] is None
    assert d["accuracy"] == 1.0
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("seed", range(5))
def test_best_f1_threshold_reproduces_f1_and_is_optimal(seed):
    labels, scores = _noisy(seed=seed, n_good=120, n_def=40)
    scores = np.round(scores, 1).astype(np.float32)  # plenty of ties
    f1, t = best_f1(labels, scores)
    assert confusion_at(labels, scores, t).f1 == f1
    # the same verdicts in float32 and in float64
    assert np.array_equal(scores > np.float32(t), scores.astype(np.float64) > t)
    # plain loop over every possible cut (below each distinct score, and above all)
    cands = [np.nextafter(np.float32(v), np.float32(-np.inf)) for v in np.unique(scores)]
    brute = max(confusion_at(labels, scores, float(c)).f1 for c in cands + [scores.max()])
    assert f1 == pytest.approx(brute, abs=0)


def test_best_f1_perfect_separation():
    labels, scores = _separable()
    f1, t = best_f1(labels, scores)
    assert f1 == 1.0
    assert scores[labels == 0].max() <= t < scores[labels == 1].min()


def test_detection_rate_at_false_alarm_constructed():
    good = np.arange(200, dtype=np.float64)  # 0 .. 199
    defects = np.array([150.5, 195.0, 198.5, 250.0, 300.0])
    labels = np.r_[np.zeros(200, int), np.ones(5, int)]
    scores = np.r_[good, defects]
    # 1 %: 2 false alarms allowed (198, 199) -> t = 197; defects above 197: 3 of 5
    rate, t = detection_rate_at_false_alarm(labels, scores, 0.01)
    assert t == 197.0 and rate == pytest.approx(0.6)
    # 5 %: 10 allowed -> t = 189; defects above: 4 of 5
    rate, t = detection_rate_at_false_alarm(labels, scores, 0.05)
    assert t == 189.0 and rate == pytest.approx(0.8)
    # 0 %: t = max good; 29 %: floor(0.29 * 200) = 58 allowed (no float rounding loss)
    assert detection_rate_at_false_alarm(labels, scores, 0.0)[1] == 199.0
    assert detection_rate_at_false_alarm(labels, scores, 0.29)[1] == 199.0 - 58


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.2, 0.5])
def test_detection_rate_threshold_is_the_smallest_admissible(rate):
    labels, scores = _noisy(seed=3)
    scores = np.round(scores, 1).astype(np.float32)
    det, t = detection_rate_at_false_alarm(labels, scores, rate)
    good, bad = scores[labels == 0], scores[labels == 1]
    assert np.mean(good > t) <= rate
    below = np.nextafter(np.float32(t), np.float32(-np.inf))
    assert np.mean(good > below) > rate  # any smaller threshold breaks the false-alarm budget
    assert det == np.mean(bad > t)


# ---------------------------------------------------------------------------------------------
# pixel AUROC
# ---------------------------------------------------------------------------------------------
def _pixel_example(n=12, h=32, w=40, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, h, w), bool)
    masks[: n // 2, 5:12, 6:20] = True
    masks[: n // 2, 20:26, 30:33] = True
    maps = rng.normal(size=(n, h, w)).astype(np.float32) + 1.3 * masks
    if ties:
        maps = np.round(maps, 1)
    return masks, maps


@pytest.mark.parametrize("ties", [False, True])
def test_pixel_auroc_matches_sklearn(ties):
    masks, maps = _pixel_example(ties=ties)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_pixel_auroc_matches_plain_pair_loop():
    rng = np.random.default_rng(5)
    masks = rng.random((1, 4, 5)) < 0.3
    maps = np.round(rng.random((1, 4, 5)), 1).astype(np.float32)
    pos, neg = maps[masks], maps[~masks]
    wins = sum((p > g) + 0.5 * (p == g) for p in pos for g in neg)
    assert pixel_auroc(masks, maps) == pytest.approx(wins / (len(pos) * len(neg)))


def test_pixel_auroc_histogram_agrees_with_exact_on_large_example():
    rng = np.random.default_rng(7)
    n, h, w = 40, 128, 128  # 655k pixels
    masks = np.zeros((n, h, w), bool)
    masks[:20, 30:60, 40:90] = True
    maps = rng.gamma(2.0, size=(n, h, w)).astype(np.float32) + 1.5 * masks
    exact = pixel_auroc(masks, maps)
    binned = pixel_auroc(masks, maps, num_bins=10_000)
    assert binned == pytest.approx(exact, abs=1e-3)


def test_pixel_auroc_switches_to_bins_above_the_limit(monkeypatch):
    masks, maps = _pixel_example()
    exact = pixel_auroc(masks, maps)
    monkeypatch.setattr(metrics, "EXACT_PIXEL_LIMIT", 100)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 3000)  # several chunks
    assert pixel_auroc(masks, maps) == pytest.approx(exact, abs=1e-3)


def test_pixel_auroc_refuses_shape_mismatch_and_one_class():
    masks, maps = _pixel_example()
    with pytest.raises(ValueError, match="resize_maps"):
        pixel_auroc(masks, maps[:, :16])
    with pytest.raises(ValueError, match="both defect and defect-free"):
        pixel_auroc(np.zeros_like(masks), maps)


# ---------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------
def _aupro_from_pro(pro_level, fpr_limit=0.3):
    # curve (0, 0) -> (0, pro_level) -> (1, 1): integral of pro_level + (1 - pro_level) x on [0, L], / L
    return pro_level + (1 - pro_level) * fpr_limit / 2


def _two_regions():
    """A small 2x2 region and a large 10x10 region in one 20x20 image."""
    masks = np.zeros((1, 20, 20), bool)
    masks[0, 2:4, 2:4] = True
    masks[0, 10:20, 10:20] = True
    return masks


@pytest.mark.parametrize("num_thresholds", [None, 50])
def test_aupro_perfect_map_is_one(num_thresholds):
    masks, _ = _pixel_example()
    assert aupro(masks, masks.astype(np.float32), num_thresholds=num_thresholds) == pytest.approx(1.0)


@pytest.mark.parametrize("num_thresholds", [None, 50])
def test_aupro_one_of_two_regions(num_thresholds):
    masks = _two_regions()
    maps = np.zeros(masks.shape, np.float32)
    maps[0, 2:4, 2:4] = 1.0  # only the small region found: PRO = (1 + 0) / 2, FPR = 0
    # hand value: 0.5 + 0.5 * 0.3 / 2 = 0.575 (a per-pixel overlap would give 4/104)
    assert aupro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(0.575)
    assert aupro(masks, maps, fpr_limit=1.0, num_thresholds=num_thresholds) == pytest.approx(0.75)
    maps_big = np.zeros(masks.shape, np.float32)
    maps_big[0, 10:20, 10:20] = 1.0  # the other region only: same PRO, region sizes do not matter
    assert aupro(masks, maps_big, num_thresholds=num_thresholds) == pytest.approx(0.575)


def test_aupro_regions_use_8_connectivity_and_never_cross_images():
    masks = np.zeros((2, 12, 12), bool)
    masks[0, 2, 2] = masks[0, 3, 3] = True  # diagonal neighbours: one region (two with 4-connectivity)
    masks[0, 8:11, 8:11] = True
    maps = np.zeros(masks.shape, np.float32)
    maps[0, 2, 2] = maps[0, 3, 3] = 1.0
    assert aupro(masks, maps) == pytest.approx(_aupro_from_pro(1 / 2))  # 4-connectivity: 2/3
    # the same square in two images: two regions, only one found
    masks = np.zeros((2, 12, 12), bool)
    masks[:, 4:8, 4:8] = True
    maps = np.zeros(masks.shape, np.float32)
    maps[0, 4:8, 4:8] = 1.0
    assert aupro(masks, maps) == pytest.approx(_aupro_from_pro(1 / 2))


def _naive_pro_curve(masks, maps):
    """Plain loops: every threshold (NG iff map > t), every region, one image at a time."""
    from scipy import ndimage

    regions = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    good = ~masks
    points = []
    for t in np.r_[np.unique(maps), maps.min() - 1.0]:
        pred = maps > t
        pro = np.mean([pred[i][reg].mean() for i, reg in regions])
        fpr = pred[good].sum() / good.sum()
        points.append((fpr, pro))
    points.sort()
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def test_aupro_matches_plain_loop():
    rng = np.random.default_rng(11)
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 1:4, 1:5] = True
    masks[0, 6:9, 8:11] = True
    masks[1, 3:7, 2:4] = True
    maps = np.round(rng.random(masks.shape) + 0.6 * masks, 2).astype(np.float32)
    fpr, pro = _naive_pro_curve(masks, maps)
    for limit in (0.05, 0.3, 1.0):
        expected = metrics._integrate(fpr, pro, limit) / limit
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    # the vectorised curve has exactly the same points
    f2, p2 = pro_curve(masks, maps, fpr_limit=1.0)
    assert f2.shape == fpr.shape
    assert np.allclose(f2, fpr, atol=1e-12) and np.allclose(p2, pro, atol=1e-12)
    assert f2[-1] == pytest.approx(1.0) and p2[-1] == pytest.approx(1.0)


def test_aupro_binned_agrees_with_exact(monkeypatch):
    masks, maps = _pixel_example(n=16, h=64, w=64, seed=4)
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=10_000) == pytest.approx(exact, abs=2e-3)
    monkeypatch.setattr(metrics, "EXACT_PIXEL_LIMIT", 1000)
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 10_000)  # chunked labelling and counting
    assert aupro(masks, maps) == pytest.approx(exact, abs=2e-3)


def test_aupro_refuses_empty_masks():
    masks, maps = _pixel_example()
    with pytest.raises(ValueError, match="defect region"):
        aupro(np.zeros_like(masks), maps)


def test_resize_maps():
    maps = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    out = resize_maps(maps, (8, 6))
    assert out.shape == (2, 8, 6) and out.dtype == np.float32
    assert out.min() >= maps.min() and out.max() <= maps.max()
    assert np.array_equal(resize_maps(maps, (4, 4)), maps)


# ---------------------------------------------------------------------------------------------
# evaluate_scores
# ---------------------------------------------------------------------------------------------
def test_evaluate_scores_image_level_ignores_unknown_rows():
    labels, scores = _noisy()
    lab = np.r_[labels, -1, -1]
    sc = np.r_[scores, 100.0, -100.0].astype(np.float32)
    thresholds = {"max-good": 1.5, "quantile": 1.2}
    ev = evaluate_scores(lab, sc, thresholds=thresholds, threshold_method="quantile")
    assert ev.n_images == len(labels)
    assert ev.n_good == int((labels == 0).sum()) and ev.n_defective == int((labels == 1).sum())
    assert ev.image_auroc == pytest.approx(roc_auc_score(labels, scores))
    assert ev.pixel_auroc is None and ev.aupro is None
    assert ev.threshold == 1.2 and ev.threshold_method == "quantile"
    assert ev.confusion == confusion_at(labels, scores, 1.2)
    assert ev.f1_max == confusion_at(labels, scores, ev.f1_threshold).f1
    assert ev.thresholds["f1"] == ev.f1_threshold
    assert (scores[labels == 1] > ev.thresholds["no-escape"]).all()
    assert ev.thresholds["max-good"] == 1.5 and thresholds == {"max-good": 1.5, "quantile": 1.2}
    d = ev.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["confusion"]["tp"] == ev.confusion.tp
    assert d["pixel_auroc"] is None


def test_evaluate_scores_keeps_the_models_own_values():
    labels, scores = _noisy()
    ev = evaluate_scores(labels, scores, thresholds={"f1": 0.25}, threshold_method="f1")
    assert ev.thresholds["f1"] == 0.25 and ev.threshold == 0.25
    assert "no-escape" in ev.thresholds


def test_evaluate_scores_pixel_level_resizes_maps():
    masks, maps = _pixel_example(n=8, h=32, w=32)
    labels = np.r_[np.ones(4, int), np.zeros(4, int)]
    scores = maps.reshape(8, -1).max(axis=1)
    small = maps[:, ::2, ::2]  # maps at half the mask resolution
    ev = evaluate_scores(labels, scores, masks=masks, maps=small,
                         thresholds={"max-good": 2.0}, threshold_method="max-good")
    big = resize_maps(small, (32, 32))
    assert ev.pixel_auroc == pytest.approx(pixel_auroc(masks, big))
    assert ev.aupro == pytest.approx(aupro(masks, big))
    assert 0.5 < ev.pixel_auroc <= 1.0


def test_evaluate_scores_errors():
    labels, scores = _noisy()
    with pytest.raises(SettingsError, match="not among"):
        evaluate_scores(labels, scores, thresholds={"max-good": 1.0}, threshold_method="quantile")
    with pytest.raises(DataError, match="0 defective"):
        evaluate_scores(np.zeros(5, int), np.arange(5.0), thresholds={"a": 1.0}, threshold_method="a")
    with pytest.raises(ValueError, match="labels must be"):
        evaluate_scores([0, 1, 3], [1.0, 2.0, 3.0], thresholds={"a": 1.0}, threshold_method="a")
