"""Evaluation metrics: pure functions, numpy in, numbers and small dataclasses out.

Conventions used everywhere in gaikan:

* ``labels``: 0 = good (OK), 1 = defective (NG). Rows labelled -1 (unknown) are dropped by
  :func:`evaluate_scores`; the single metrics refuse them (callers drop them first).
* ``scores``: higher = more likely defective.
* Verdict rule: **NG iff score > threshold** (strict). Every threshold returned here is expressed in
  that rule, so ``confusion_at(labels, scores, t)`` reproduces the figure a function reports for ``t``.

Image-level metrics
    ROC AUC (``image_auroc``), average precision, the F1-optimal threshold, the detection rate at a
    fixed false-alarm rate, and the confusion matrix at a threshold.

Pixel-level metrics (anomaly maps against ground-truth masks)
    ``pixel_auroc`` and ``aupro``, the normalised area under the per-region-overlap curve of
    Bergmann et al., "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset for
    Unsupervised Anomaly Detection", IJCV 129, 2021 (Sec. 4.2 / "PRO"). Both compute the exact curve
    for up to :data:`EXACT_PIXEL_LIMIT` pixels and switch to a binned curve (bounded memory, one
    chunk of images at a time) above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gaikan.errors import DataError, SettingsError

#: Above this many pixels (N*H*W) the pixel metrics use a binned curve instead of a full sort.
EXACT_PIXEL_LIMIT = 20_000_000
#: Number of bins / thresholds of the binned pixel curves.
DEFAULT_BINS = 10_000
#: Pixels processed per chunk on the binned path (bounds the temporary memory).
_CHUNK_PIXELS = 4_000_000

__all__ = [
    "EXACT_PIXEL_LIMIT",
    "DEFAULT_BINS",
    "Confusion",
    "Evaluation",
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "pro_curve",
    "average_precision",
    "detection_rate_at_false_alarm",
    "best_f1",
    "confusion_at",
    "spearman",
    "resize_maps",
    "evaluate_scores",
]


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def _as_scores(scores, name: str = "scores") -> np.ndarray:
    """1-D float array; float32/float64 are kept as they are (thresholds are built in that dtype)."""
    s = np.asarray(scores)
    if s.ndim == 0:
        s = s.reshape(1)
    if s.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {s.shape}")
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32 if s.dtype == np.float16 else np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} contain NaN or infinity at rows {rows[:10].tolist()}")
    return s


def _as_labels(labels, allow_unknown: bool = False) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim == 0:
        lab = lab.reshape(1)
    if lab.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {lab.shape}")
    allowed = (-1, 0, 1) if allow_unknown else (0, 1)
    if lab.size and not np.isin(lab, allowed).all():
        found = np.unique(lab[~np.isin(lab, allowed)])[:10].tolist()
        extra = " (drop rows labelled -1 before calling)" if -1 in found else ""
        raise ValueError(f"labels must be {' or '.join(map(str, allowed))}; found {found}{extra}")
    return lab.astype(np.int64)


def _check_pair(labels, scores, *, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(labels)
    s = _as_scores(scores)
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    if need_both:
        n_pos = int(y.sum())
        if n_pos == 0 or n_pos == len(y):
            only = "defective (1)" if n_pos else "good (0)"
            raise ValueError(
                f"this metric needs both good (0) and defective (1) images; all {len(y)} are {only}"
            )
    return y, s


def _just_below(value, dtype) -> float:
    """The largest number of ``dtype`` strictly below ``value``, as a Python float.

    It is exactly representable in ``dtype`` (float32 for detector scores), so ``score > t`` gives the
    same verdicts whether the comparison is made in float32 or float64.
    """
    v = np.asarray(value, dtype=dtype)
    return float(np.nextafter(v, np.asarray(-np.inf, dtype=dtype)))


def _nan_to_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


# ------------------------------------------------------------------------------------------------
# image-level metrics
# ------------------------------------------------------------------------------------------------
def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (scikit-learn ``roc_auc_score``).

    AUROC = P(score of a random defective image > score of a random good image) + 0.5 P(tie).
    1.0 = perfect separation, 0.5 = chance, 0.0 = perfectly reversed.
    """
    from sklearn.metrics import roc_auc_score

    y, s = _check_pair(labels, scores)
    return float(roc_auc_score(y, s))


def average_precision(labels, scores) -> float:
    """Average precision (area under the precision-recall curve, step-wise; scikit-learn).

    AP = sum_k (R_k - R_{k-1}) P_k over the thresholds in decreasing order.
    """
    from sklearn.metrics import average_precision_score

    y, s = _check_pair(labels, scores)
    # clipped: scikit-learn's sum of steps can round to 1.0000000000000002
    return float(min(1.0, average_precision_score(y, s)))


def detection_rate_at_false_alarm(labels, scores, false_alarm_rate: float) -> tuple[float, float]:
    """Detection rate at a fixed false-alarm rate on the good images.

    The threshold ``t`` is the smallest value with ``#{good scores > t} / n_good <= rate``. With the
    good scores sorted ``g_(1) <= ... <= g_(n)`` and ``k = floor(rate * n)`` false alarms allowed,
    ``t = g_(n-k)`` (an observed good score) for ``k < n``; for ``k >= n`` every image may be flagged
    and ``t`` is returned just below the smallest score (rather than -inf) so it stays a finite
    number. The detection rate is ``#{defect scores > t} / n_defective``.

    Returns ``(detection_rate, threshold)``.
    """
    y, s = _check_pair(labels, scores)
    rate = float(false_alarm_rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"false_alarm_rate must be in [0, 1], got {false_alarm_rate}")
    good = np.sort(s[y == 0])
    n = len(good)
    k = int(math.floor(rate * n + 1e-9))  # tolerance: 0.29 * 100 must allow 29, not 28
    if k >= n:
        t = _just_below(s.min(), s.dtype)
    else:
        t = float(good[n - 1 - k])
    detected = float(np.mean(s[y == 1] > t))
    return detected, t


def best_f1(labels, scores) -> tuple[float, float]:
    """The maximal F1 over all thresholds and the threshold that reaches it.

    ``F1 = 2 TP / (2 TP + FP + FN)``. The candidate cut-offs are the distinct scores ``v``
    ("NG iff score >= v"); all of them are evaluated at once from cumulative counts over the scores
    sorted in decreasing order. The chosen cut-off ``v*`` is expressed in the package's rule
    (NG iff score > threshold) as ``threshold = nextafter(v*, -inf)`` computed in the scores' own
    dtype: the largest representable number below ``v*``, so exactly the images with score >= v* are
    flagged, in float32 and float64 alike, and ``confusion_at(labels, scores, threshold).f1`` equals
    the returned F1 exactly. Among equal F1 values the highest threshold (fewest alarms) is chosen.

    Returns ``(f1, threshold)``.
    """
    y, s = _check_pair(labels, scores, need_both=False)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("F1 needs at least one defective (1) image")
    order = np.argsort(s, kind="stable")[::-1]
    s_desc = s[order]
    tp = np.cumsum(y[order])
    fp = np.arange(1, len(s) + 1) - tp
    last_of_tie = np.r_[s_desc[1:] != s_desc[:-1], True]
    tp, fp, cut = tp[last_of_tie], fp[last_of_tie], s_desc[last_of_tie]
    fn = n_pos - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    i = int(np.argmax(f1))  # first maximum = highest threshold
    conf = Confusion(tn=int(len(s) - n_pos - fp[i]), fp=int(fp[i]), fn=int(fn[i]), tp=int(tp[i]))
    return conf.f1, _just_below(cut[i], s.dtype)


def spearman(scores, values) -> float:
    """Spearman rank correlation (scipy) between scores and e.g. a defect-severity measure."""
    from scipy.stats import spearmanr

    a = _as_scores(scores)
    b = _as_scores(values, "values")
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores but {len(b)} values")
    if len(a) < 2:
        raise ValueError("Spearman correlation needs at least two points")
    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------------
# confusion matrix
# ------------------------------------------------------------------------------------------------
@dataclass
class Confusion:
    """Confusion counts at one threshold. Positive = defective (NG).

    Ratios whose denominator is zero (e.g. precision when nothing is flagged) are NaN, and ``None``
    in :meth:`to_dict`.
    """

    tn: int
    fp: int
    fn: int
    tp: int

    @staticmethod
    def _ratio(num: int, den: int) -> float:
        return num / den if den else float("nan")

    @property
    def n(self) -> int:
        return self.tn + self.fp + self.fn + self.tp

    @property
    def accuracy(self) -> float:
        """(TP + TN) / N."""
        return self._ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float:
        """TP / (TP + FP): the fraction of flagged images that are defective."""
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """TP / (TP + FN): the detection rate."""
        return self._ratio(self.tp, self.tp + self.fn)

    detection_rate = recall

    @property
    def false_alarm_rate(self) -> float:
        """FP / (FP + TN): the fraction of good images flagged NG."""
        return self._ratio(self.fp, self.fp + self.tn)

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN), the harmonic mean of precision and recall."""
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def as_matrix(self) -> np.ndarray:
        """2x2 array ``[[tn, fp], [fn, tp]]``: rows = true OK/NG, columns = predicted OK/NG."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]], dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tn": int(self.tn),
            "fp": int(self.fp),
            "fn": int(self.fn),
            "tp": int(self.tp),
            "accuracy": _nan_to_none(self.accuracy),
            "precision": _nan_to_none(self.precision),
            "recall": _nan_to_none(self.recall),
            "false_alarm_rate": _nan_to_none(self.false_alarm_rate),
            "f1": _nan_to_none(self.f1),
        }


def confusion_at(labels, scores, threshold: float) -> Confusion:
    """Confusion counts with the verdict NG iff ``score > threshold``.

    The comparison is made in float64 (scores of any float dtype convert exactly).
    """
    y, s = _check_pair(labels, scores, need_both=False)
    pred = s.astype(np.float64) > float(threshold)
    truth = y == 1
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(len(y) - tp - fp - fn)
    return Confusion(tn=tn, fp=fp, fn=fn, tp=tp)


# ------------------------------------------------------------------------------------------------
# pixel-level metrics
# ------------------------------------------------------------------------------------------------
def _check_masks_maps(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(f"masks and maps must be (N, H, W); got {m.shape} and {a.shape}")
    if m.shape != a.shape:
        raise ValueError(
            f"masks {m.shape} and maps {a.shape} differ in shape; resize the maps to the mask size "
            "first (gaikan.evaluation.resize_maps)"
        )
    if m.dtype != bool:
        m = m > 0
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError("anomaly maps contain NaN or infinity")
    return m, a


def _chunks(n_images: int, pixels_per_image: int):
    step = max(1, _CHUNK_PIXELS // max(1, pixels_per_image))
    for start in range(0, n_images, step):
        yield slice(start, min(n_images, start + step))


def _bin_index(values: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    """Bin of each value in ``n_bins`` equal bins over [lo, hi] (values outside are clipped)."""
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.int64)
    idx = np.floor((values.astype(np.float64) - lo) * (n_bins / (hi - lo)))
    return np.clip(idx, 0, n_bins - 1).astype(np.int64)


def pixel_auroc(masks, maps, *, num_bins: int | None = None) -> float:
    """ROC AUC over all pixels: anomaly-map values against the ground-truth masks.

    masks: (N, H, W) bool (non-zero = defect); maps: (N, H, W) float, same shape (see
    :func:`resize_maps`). Maps are used as float32.

    Exact when ``num_bins`` is None and N*H*W <= :data:`EXACT_PIXEL_LIMIT`: the Mann-Whitney
    statistic ``AUC = (#{d > g} + #{d = g} / 2) / (n_pos n_neg)`` over all (defect pixel d, good
    pixel g) pairs, counted by sorting each class once and ``np.searchsorted`` (equal to scikit-learn's
    ``roc_auc_score`` on the flattened arrays, several times faster, 4 bytes of extra memory a
    pixel). Otherwise (or when ``num_bins`` is given; :data:`DEFAULT_BINS` on large inputs) the
    values are counted into ``num_bins`` equal bins between the map minimum and maximum, one chunk
    of images at a time, and the AUC is the Mann-Whitney statistic of the binned values (ties
    within a bin count one half):

        AUC = sum_b neg_b * (pos_above_b + pos_b / 2) / (n_pos * n_neg)

    With 10 000 bins this agrees with the exact value to about 1e-4 on smooth score distributions.
    """
    m, a = _check_masks_maps(masks, maps)
    n_pos = int(np.count_nonzero(m))
    if n_pos == 0 or n_pos == m.size:
        raise ValueError("pixel AUROC needs both defect and defect-free pixels in the masks")
    if num_bins is None and m.size <= EXACT_PIXEL_LIMIT:
        # exact Mann-Whitney statistic: sort each class once (float32 copies, 4 bytes a pixel) and
        # count, for every defect value, the good values below it (ties count one half)
        neg = np.sort(a[~m])
        pos = np.sort(a[m])
        below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
        below_or_tie = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
        return float((below + below_or_tie) / 2.0 / (float(len(pos)) * float(len(neg))))
    n_bins = int(num_bins or DEFAULT_BINS)
    lo, hi = float(a.min()), float(a.max())
    pos = np.zeros(n_bins, dtype=np.int64)
    neg = np.zeros(n_bins, dtype=np.int64)
    for sl in _chunks(len(m), m[0].size):
        b = _bin_index(a[sl], lo, hi, n_bins)
        mk = m[sl]
        pos += np.bincount(b[mk], minlength=n_bins)
        neg += np.bincount(b[~mk], minlength=n_bins)
    pos_above = np.cumsum(pos[::-1])[::-1] - pos  # positives in strictly higher bins
    n_neg = int(neg.sum())
    auc = np.sum(neg * (pos_above + 0.5 * pos)) / (float(n_pos) * float(n_neg))
    return float(auc)


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of each mask (8-connectivity), never joining two images."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-neighbourhood within a slice, nothing across slices
    regions, count = ndimage.label(masks, structure=structure)
    return regions, int(count)


def _integrate(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) on [0, x_max]; x non-decreasing from 0, y interpolated at x_max."""
    idx = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:idx], y[:idx]
    if idx < len(x) and xs[-1] < x_max:
        x0, x1, y0, y1 = x[idx - 1], x[idx], y[idx - 1], y[idx]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) * 0.5))


def pro_curve(
    masks, maps, *, fpr_limit: float = 1.0, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve (Bergmann et al., IJCV 2021): ``(fpr, pro)``, both from 0.

    For a threshold t (predicted defect = map > t):

        PRO(t) = 1/R * sum_r |P_t ∩ C_r| / |C_r|      (mean overlap over all R ground-truth regions)
        FPR(t) = |P_t ∩ G| / |G|                        (G = all defect-free pixels)

    Regions C_r are the connected components (8-connectivity) of each ground-truth mask. Every pixel
    contributes a fixed step when the threshold passes below its value: 1/(R |C_r|) to PRO for a
    defect pixel, 1/|G| to FPR for a good one; so the curve at *all* thresholds is a cumulative sum
    over the pixels sorted by decreasing value (ties grouped), with no loop over thresholds or
    regions. Only pixels at or above the value where FPR reaches ``fpr_limit`` are sorted.

    ``num_thresholds=None``: exact up to :data:`EXACT_PIXEL_LIMIT` pixels, else
    :data:`DEFAULT_BINS` bins. With an int, the pixels are counted into that many equal bins between
    the FPR-limit value and the maximum, chunk by chunk (bounded memory).

    The returned curve reaches at least ``fpr_limit`` on the FPR axis (it may continue past it).
    """
    m, a = _check_masks_maps(masks, maps)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    n_ok = int(m.size - np.count_nonzero(m))
    if n_ok == 0:
        raise ValueError("PRO needs defect-free pixels (every mask pixel is a defect)")
    if n_ok == m.size:
        raise ValueError("PRO needs at least one defect region; all masks are empty")
    k = min(n_ok, max(1, math.ceil(fpr_limit * n_ok - 1e-9)))  # good pixels needed to reach the limit
    if num_thresholds is None and m.size <= EXACT_PIXEL_LIMIT:
        return _pro_curve_exact(m, a, n_ok, k)
    return _pro_curve_binned(m, a, n_ok, k, int(num_thresholds or DEFAULT_BINS))


def _pro_curve_exact(m: np.ndarray, a: np.ndarray, n_ok: int, k: int):
    regions, n_regions = _label_regions(m)
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (n_regions * sizes[1:])
    good_values = a[~m]
    t_lim = np.partition(good_values, n_ok - k)[n_ok - k]  # k-th largest good value
    del good_values
    sel = a >= t_lim
    values = a[sel]
    labels = regions[sel]
    del sel, regions
    order = np.argsort(values, kind="stable")[::-1]
    values, labels = values[order], labels[order]
    pro = np.cumsum(weight[labels])
    fpr = np.cumsum(labels == 0) / n_ok
    last = np.r_[values[1:] != values[:-1], True]
    return np.r_[0.0, fpr[last]], np.r_[0.0, np.minimum(pro[last], 1.0)]


def _pro_curve_binned(m: np.ndarray, a: np.ndarray, n_ok: int, k: int, n_bins: int):
    lo, hi = float(a.min()), float(a.max())
    per_image = m[0].size
    # pass 1: a fine histogram of the good values locates the k-th largest one (to a bin edge)
    fine = 1 << 16
    hist = np.zeros(fine, dtype=np.int64)
    for sl in _chunks(len(m), per_image):
        hist += np.bincount(_bin_index(a[sl][~m[sl]], lo, hi, fine), minlength=fine)
    from_top = np.cumsum(hist[::-1])
    j = fine - 1 - int(np.searchsorted(from_top, k))  # the bin holding the k-th largest good value
    # one bin lower than the bin's own edge, so that rounding in the binning never drops a value
    t_lim = lo + (hi - lo) * max(j - 1, 0) / fine if hi > lo else lo
    # pass 2: per-bin PRO weight (sum of 1/|C_r|) and good-pixel counts above t_lim
    pro_w = np.zeros(n_bins, dtype=np.float64)
    ok_c = np.zeros(n_bins, dtype=np.int64)
    n_regions = 0
    for sl in _chunks(len(m), per_image):
        mk, av = m[sl], a[sl]
        regions, count = _label_regions(mk)
        sizes = np.bincount(regions.ravel(), minlength=count + 1)
        inv = np.zeros(count + 1, dtype=np.float64)
        inv[1:] = 1.0 / sizes[1:]
        keep = av >= t_lim
        b = _bin_index(av[keep], t_lim, hi, n_bins)
        lab = regions[keep]
        pro_w += np.bincount(b, weights=inv[lab], minlength=n_bins)
        ok_c += np.bincount(b[lab == 0], minlength=n_bins)
        n_regions += count
    pro = np.cumsum(pro_w[::-1]) / n_regions
    fpr = np.cumsum(ok_c[::-1]) / n_ok
    return np.r_[0.0, fpr], np.r_[0.0, np.minimum(pro, 1.0)]


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO curve up to a false-positive rate (Bergmann et al., IJCV 2021).

        AUPRO = 1/fpr_limit * integral_0^fpr_limit PRO(FPR) dFPR

    (trapezoid rule over the curve of :func:`pro_curve`, with PRO interpolated linearly at
    ``fpr_limit``). A perfect map gives 1.0. The MVTec AD benchmark uses ``fpr_limit=0.3``.
    """
    fpr, pro = pro_curve(masks, maps, fpr_limit=fpr_limit, num_thresholds=num_thresholds)
    return _integrate(fpr, pro, fpr_limit) / fpr_limit


def resize_maps(maps, size: tuple[int, int]) -> np.ndarray:
    """Resize (N, h, w) anomaly maps to ``size`` = (H, W) with bilinear interpolation (Pillow, float32)."""
    from PIL import Image

    a = np.asarray(maps, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    h, w = int(size[0]), int(size[1])
    if a.shape[1:] == (h, w):
        return a
    out = np.empty((len(a), h, w), dtype=np.float32)
    for i, amap in enumerate(a):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(amap)).resize((w, h), Image.BILINEAR))
    return out


# ------------------------------------------------------------------------------------------------
# one call for everything
# ------------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Every figure of one evaluation run; ``to_dict()`` is ready for ``json.dump``."""

    n_images: int
    n_good: int
    n_defective: int
    image_auroc: float
    pixel_auroc: float | None
    aupro: float | None
    average_precision: float
    f1_max: float
    f1_threshold: float
    detection_rate_at_1pct: float
    detection_rate_at_5pct: float
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_method: str = "max-good"
    threshold: float = float("nan")
    confusion: Confusion = field(default_factory=lambda: Confusion(0, 0, 0, 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": int(self.n_images),
            "n_good": int(self.n_good),
            "n_defective": int(self.n_defective),
            "image_auroc": _nan_to_none(self.image_auroc),
            "pixel_auroc": _nan_to_none(self.pixel_auroc),
            "aupro": _nan_to_none(self.aupro),
            "average_precision": _nan_to_none(self.average_precision),
            "f1_max": _nan_to_none(self.f1_max),
            "f1_threshold": _nan_to_none(self.f1_threshold),
            "detection_rate_at_1pct": _nan_to_none(self.detection_rate_at_1pct),
            "detection_rate_at_5pct": _nan_to_none(self.detection_rate_at_5pct),
            "thresholds": {str(k): _nan_to_none(v) for k, v in self.thresholds.items()},
            "threshold_method": str(self.threshold_method),
            "threshold": _nan_to_none(self.threshold),
            "confusion": self.confusion.to_dict(),
        }


def evaluate_scores(
    labels,
    scores,
    *,
    masks=None,
    maps=None,
    thresholds: dict[str, float],
    threshold_method: str,
) -> Evaluation:
    """Compute every metric for one labelled test set.

    labels: (N,) 0 good / 1 defective / -1 unknown (unknown rows are ignored everywhere).
    scores: (N,) image scores. masks, maps: optional (N, H, W) ground truth and anomaly maps; when
    both are given, ``pixel_auroc`` and ``aupro`` (FPR limit 0.3) are computed; maps of another size
    than the masks are resized (bilinear) to the mask size. Good images have all-zero masks.

    thresholds: the model's thresholds by method; ``threshold_method`` picks the model's decision
    threshold, at which the confusion matrix is computed. The returned ``thresholds`` dict also holds
    the evaluation-time thresholds ``f1`` (F1-optimal on these labels) and ``no-escape`` (highest
    threshold flagging every defect) for comparison; they never replace a value the model already
    has under the same name, and never change the model's threshold.

    Raises DataError when the labelled rows lack good or defective images, SettingsError when
    ``threshold_method`` is not among ``thresholds``.
    """
    from gaikan.evaluation.thresholds import f1_optimal, no_escape

    lab = _as_labels(labels, allow_unknown=True)
    s = _as_scores(scores)
    if len(lab) != len(s):
        raise ValueError(f"{len(lab)} labels but {len(s)} scores")
    if threshold_method not in thresholds:
        raise SettingsError(
            f"threshold method {threshold_method!r} is not among the model's thresholds "
            f"({', '.join(sorted(thresholds)) or 'none'})"
        )
    model_threshold = float(thresholds[threshold_method])
    keep = lab != -1
    y, s = lab[keep], s[keep]
    n_def = int(y.sum())
    n_good = int(len(y) - n_def)
    if n_def == 0 or n_good == 0:
        raise DataError(
            f"evaluation needs both good and defective labelled images; found {n_good} good and "
            f"{n_def} defective ({int((~keep).sum())} unlabelled rows ignored)"
        )

    pix_auc = pro = None
    if masks is not None or maps is not None:
        if masks is None or maps is None:
            raise ValueError("pixel metrics need both masks and maps")
        mk = np.asarray(masks)
        mp = np.asarray(maps)
        if len(mk) != len(lab) or len(mp) != len(lab):
            raise ValueError(f"{len(lab)} labels but {len(mk)} masks and {len(mp)} maps")
        mk = mk[keep] > 0
        mp = mp[keep]
        if mp.shape[1:] != mk.shape[1:]:
            mp = resize_maps(mp, mk.shape[1:])
        pix_auc = pixel_auroc(mk, mp)
        pro = aupro(mk, mp, fpr_limit=0.3)

    f1, f1_t = best_f1(y, s)
    all_thresholds = {str(k): float(v) for k, v in thresholds.items()}
    all_thresholds.setdefault("f1", f1_optimal(y, s))
    all_thresholds.setdefault("no-escape", no_escape(y, s))
    return Evaluation(
        n_images=int(len(y)),
        n_good=n_good,
        n_defective=n_def,
        image_auroc=image_auroc(y, s),
        pixel_auroc=pix_auc,
        aupro=pro,
        average_precision=average_precision(y, s),
        f1_max=f1,
        f1_threshold=f1_t,
        detection_rate_at_1pct=detection_rate_at_false_alarm(y, s, 0.01)[0],
        detection_rate_at_5pct=detection_rate_at_false_alarm(y, s, 0.05)[0],
        thresholds=all_thresholds,
        threshold_method=threshold_method,
        threshold=model_threshold,
        confusion=confusion_at(y, s, model_threshold),
    )
