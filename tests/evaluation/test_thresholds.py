"""Behaviour of gaikan.evaluation.thresholds (rule: NG iff score > threshold)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import best_f1, confusion_at
from gaikan.evaluation.thresholds import (
    THRESHOLD_METHODS,
    compute_thresholds,
    conformal,
    conformal_p_value,
    f1_optimal,
    max_good,
    no_escape,
    quantile,
)


def _labelled(seed=0, n_good=200, n_def=50):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_good, int), np.ones(n_def, int)]
    scores = (rng.normal(size=n_good + n_def) + 1.5 * labels).astype(np.float32)
    return labels, scores


def test_max_good_flags_no_good_of_its_own_set():
    good = np.random.default_rng(0).normal(size=500).astype(np.float32)
    t = max_good(good)
    assert t == float(good.max())
    assert confusion_at(np.zeros(len(good), int), good, t).fp == 0


def test_quantile_is_an_observed_score():
    good = np.random.default_rng(1).normal(size=1000)
    t = quantile(good, 0.995)
    assert t in good
    assert np.mean(good > t) <= 0.005
    assert quantile(good, 1.0) == max_good(good)
    with pytest.raises(SettingsError):
        quantile(good, 1.5)


def test_f1_optimal_delegates_to_best_f1():
    labels, scores = _labelled()
    assert f1_optimal(labels, scores) == best_f1(labels, scores)[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_escape_flags_every_defect_and_is_the_highest_such(dtype):
    labels, scores = _labelled(seed=2)
    scores = scores.astype(dtype)
    t = no_escape(labels, scores)
    defects = scores[labels == 1]
    assert (defects > t).all()
    assert confusion_at(labels, scores, t).fn == 0
    higher = np.nextafter(dtype(t), dtype(np.inf))  # the next representable value up
    assert (defects > higher).sum() == len(defects) - 1
    assert confusion_at(labels, scores, float(higher)).fn == 1
    with pytest.raises(ValueError, match="defective"):
        no_escape(np.zeros(3, int), [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "alpha, n, draw",
    [
        (0.05, 99, lambda rng, size: rng.normal(size=size)),
        (0.10, 50, lambda rng, size: rng.exponential(size=size)),
    ],
)
def test_conformal_false_alarm_rate_is_controlled(alpha, n, draw):
    """Over 2000 seeded repetitions (fresh calibration and fresh good test scores each time) the
    mean false-alarm rate is <= alpha + 0.005 and > alpha - 0.03.

    Theory for continuous scores: E[FA] = 1 - k/(n + 1), k = ceil((n + 1)(1 - alpha)), which is in
    (alpha - 1/(n + 1), alpha]; here 0.05 and 0.098. The standard deviation of the mean over 2000
    repetitions is about 0.0006, so the tolerance 0.005 is far outside chance.
    """
    rng = np.random.default_rng(12345)
    reps, n_test = 2000, 100
    rates = np.empty(reps)
    for r in range(reps):
        t = conformal(draw(rng, n), alpha)
        rates[r] = np.mean(draw(rng, n_test) > t)
    observed = rates.mean()
    expected = 1 - math.ceil((n + 1) * (1 - alpha)) / (n + 1)
    assert observed <= alpha + 0.005
    assert observed > alpha - 0.03
    assert observed == pytest.approx(expected, abs=0.004)


def test_conformal_is_the_kth_smallest():
    scores = np.arange(1.0, 100.0)  # n = 99, alpha = 0.05 -> k = ceil(100 * 0.95) = 95
    assert conformal(scores[::-1], 0.05) == 95.0
    assert conformal(np.arange(1.0, 20.0), 0.05) == 19.0  # n = 19: k = 19, the maximum


def test_conformal_refuses_too_few_calibration_images():
    with pytest.raises(SettingsError, match=r"needs at least 19 good calibration images; only 18"):
        conformal(np.arange(18.0), 0.05)
    with pytest.raises(SettingsError, match=r"at least 99 .* only 50"):
        conformal(np.arange(50.0), 0.01)
    with pytest.raises(SettingsError, match="alpha"):
        conformal(np.arange(50.0), 0.0)


def test_conformal_p_value_formula():
    cal = np.array([4.0, 1.0, 3.0, 2.0])
    # (1 + #{s_i >= s}) / (n + 1)
    assert conformal_p_value(cal, 2.5) == pytest.approx(3 / 5)
    assert conformal_p_value(cal, 3.0) == pytest.approx(3 / 5)  # ties count as >=
    assert conformal_p_value(cal, 0.0) == pytest.approx(1.0)
    assert conformal_p_value(cal, 9.0) == pytest.approx(1 / 5)
    p = conformal_p_value(cal, np.array([0.0, 2.5, 9.0]))
    assert isinstance(p, np.ndarray) and np.allclose(p, [1.0, 0.6, 0.2])
    assert isinstance(conformal_p_value(cal, 1.0), float)


def test_conformal_p_values_are_uniformish_and_match_the_threshold():
    rng = np.random.default_rng(3)
    cal = rng.normal(size=999)
    test = rng.normal(size=20_000)
    p = conformal_p_value(cal, test)
    for a in (0.01, 0.05, 0.1, 0.5, 0.9):
        assert np.mean(p <= a) == pytest.approx(a, abs=0.02)
    for alpha in (0.01, 0.05, 0.2):
        t = conformal(cal, alpha)
        assert np.array_equal(p <= alpha, test > t)


def test_compute_thresholds_and_method_names():
    good = np.random.default_rng(4).normal(size=300)
    th = compute_thresholds(good)
    assert set(th) == {"max-good", "quantile"}
    assert th["max-good"] == max_good(good) and th["quantile"] == quantile(good, 0.995)
    th = compute_thresholds(good, quantile_q=0.9, conformal_alpha=0.05)
    assert th["quantile"] == quantile(good, 0.9) and th["conformal"] == conformal(good, 0.05)
    names = [m.name for m in THRESHOLD_METHODS]
    assert names == ["max-good", "quantile", "conformal", "f1", "no-escape"]
    assert all(m.description for m in THRESHOLD_METHODS)
    with pytest.raises(SettingsError, match="no good"):
        max_good([])
