"""Decision thresholds, all in the package's rule: **NG iff score > threshold**.

Methods (the names are the ones the CLI and the saved models use):

``max-good``   the largest good validation score: no validation good image is flagged.
``quantile``   the q-quantile of the good validation scores (an observed score, numpy method
               "higher"): about a fraction 1 - q of good images flagged.
``conformal``  split-conformal threshold for a false-alarm rate alpha (Vovk et al., "Algorithmic
               Learning in a Random World", 2005; Angelopoulos & Bates, "A Gentle Introduction to
               Conformal Prediction", 2021): with n good calibration scores s_(1) <= ... <= s_(n),
               t = s_(k), k = ceil((n + 1)(1 - alpha)). For a new good image exchangeable with the
               calibration ones, P(score > t) <= alpha (and >= alpha - 1/(n + 1) for continuous
               scores). Needs n >= ceil(1/alpha - 1).
``f1``         the F1-optimal threshold on labelled scores (needs defective examples).
``no-escape``  the highest threshold that still flags every defective example.

The first three need only good images (fit/validation time); ``f1`` and ``no-escape`` need labelled
defects and are computed at evaluation time for comparison.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import _as_labels, _as_scores, _just_below, best_f1

__all__ = [
    "ThresholdMethod",
    "THRESHOLD_METHODS",
    "max_good",
    "quantile",
    "f1_optimal",
    "no_escape",
    "conformal",
    "conformal_p_value",
    "compute_thresholds",
]


class ThresholdMethod(NamedTuple):
    name: str
    description: str
    needs_defects: bool


THRESHOLD_METHODS: list[ThresholdMethod] = [
    ThresholdMethod("max-good", "largest good validation score (no validation good flagged)", False),
    ThresholdMethod("quantile", "q-quantile of good validation scores (default q=0.995)", False),
    ThresholdMethod(
        "conformal", "split-conformal: false-alarm rate <= alpha on new good images", False
    ),
    ThresholdMethod("f1", "F1-optimal on labelled scores (needs defective examples)", True),
    ThresholdMethod("no-escape", "highest threshold that flags every defective example", True),
]


def _good(good_scores) -> np.ndarray:
    s = _as_scores(good_scores, "good scores")
    if s.size == 0:
        raise SettingsError("no good validation scores to compute a threshold from")
    return s


def max_good(good_scores) -> float:
    """``max(good_scores)``: with NG iff score > t, no good validation image is flagged."""
    return float(_good(good_scores).max())


def quantile(good_scores, q: float = 0.995) -> float:
    """The q-quantile of the good scores (numpy method "higher": an observed score)."""
    if not 0.0 <= q <= 1.0:
        raise SettingsError(f"quantile q must be in [0, 1], got {q}")
    return float(np.quantile(_good(good_scores), q, method="higher"))


def f1_optimal(labels, scores) -> float:
    """The F1-optimal threshold (see :func:`gaikan.evaluation.metrics.best_f1`)."""
    return best_f1(labels, scores)[1]


def no_escape(labels, scores) -> float:
    """``nextafter(min(defect scores), -inf)`` in the scores' dtype.

    The highest threshold that flags every defective image: any larger representable value lets the
    weakest defect through.
    """
    y = _as_labels(labels)
    s = _as_scores(scores)
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    defects = s[y == 1]
    if defects.size == 0:
        raise ValueError("the no-escape threshold needs at least one defective (1) image")
    return _just_below(defects.min(), s.dtype)


def _conformal_rank(n: int, alpha: float) -> int:
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)


def conformal(good_scores, alpha: float) -> float:
    """Split-conformal threshold: the ``ceil((n + 1)(1 - alpha))``-th smallest calibration score.

    Guarantee (exchangeable scores): a new good image is flagged (score > t) with probability at most
    alpha, marginally over the calibration draw. Refuses (SettingsError) when n is too small for
    alpha, i.e. when ``ceil((n + 1)(1 - alpha)) > n``, which happens for n < ceil(1/alpha - 1).
    """
    if not 0.0 < alpha < 1.0:
        raise SettingsError(f"the false-alarm rate alpha must be in (0, 1), got {alpha}")
    s = np.sort(_good(good_scores))
    n = len(s)
    k = _conformal_rank(n, alpha)
    if k > n:
        needed = math.ceil(1.0 / alpha - 1.0 - 1e-9)
        raise SettingsError(
            f"a conformal threshold for false-alarm rate alpha={alpha:g} needs at least {needed} good "
            f"calibration images; only {n} were given"
        )
    return float(s[k - 1])


def conformal_p_value(calibration_scores, score):
    """Conformal p-value ``(1 + #{s_i >= score}) / (n + 1)`` of each score against the calibration set.

    Vectorised over ``score`` (a float in, a float out; an array in, an array out). Small p-values
    mean "unusually high for a good image"; for a good image p is (super-)uniform, and
    ``p <= alpha`` is the same decision as ``score > conformal(calibration_scores, alpha)``.
    """
    cal = np.sort(_good(calibration_scores).astype(np.float64))
    x = np.asarray(score, dtype=np.float64)
    n_ge = len(cal) - np.searchsorted(cal, x, side="left")
    p = (1.0 + n_ge) / (len(cal) + 1.0)
    return float(p) if np.ndim(p) == 0 else p


def compute_thresholds(
    good_scores, *, quantile_q: float = 0.995, conformal_alpha: float | None = None
) -> dict[str, float]:
    """Thresholds that need only good validation scores: ``{"max-good": ..., "quantile": ...}``.

    With ``conformal_alpha`` also ``"conformal"`` (SettingsError if there are too few scores).
    """
    out = {"max-good": max_good(good_scores), "quantile": quantile(good_scores, quantile_q)}
    if conformal_alpha is not None:
        out["conformal"] = conformal(good_scores, conformal_alpha)
    return out
