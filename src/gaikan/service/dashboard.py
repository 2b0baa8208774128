"""The dashboard's endpoints: the review loop and the numbers behind the charts.

::

    GET  /v1/review-queue                 NG inspections nobody has reviewed yet, newest first
    POST /v1/inspections/{id}/review      {"label": "false_alarm"} or {"label": "defect", "defect_type": "crack"}
    GET  /v1/reviews                      the latest reviews (who, when, what)
    GET  /v1/stats                        yield and NG rate over time, score histogram, review counts, drift

A review is stored in the log's ``reviews`` table with the name of the API key that sent it
(:mod:`gaikan.service.keys`) and the time; a second review of the same inspection supersedes the
first (both stay in the table).

Drift (:func:`log_pvalue_drift`): a good part's conformal p-value is super-uniform,
``P(p <= a) <= a`` for every ``a``, whatever the threshold. Over the last ``W`` logged parts that an
operator has not confirmed as defects, the count ``k`` of ``p <= a`` is then at most
``Binomial(W, a)``; the flag is raised when ``P(Binomial(W, a) >= k) < level`` (a one-sided exact
binomial test; defaults W = 200, a = 0.1, level = 0.001). It fires on shifted images (lighting,
camera, material) and also on a burst of real defects not yet reviewed: both need a look.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field

DRIFT_WINDOW = 200
DRIFT_ALPHA = 0.1
DRIFT_LEVEL = 1e-3
DRIFT_MIN_N = 30
HIST_BINS = 30
MAX_STATS_ROWS = 50_000


class ReviewIn(BaseModel):
    label: Literal["false_alarm", "defect"] = Field(description="'false_alarm': the part is good; "
                                                                "'defect': a real defect, of defect_type")
    defect_type: str | None = Field(None, min_length=1, max_length=60,
                                    description="the kind of defect (free text, e.g. 'crack', 'ひび'); "
                                                "required with label 'defect', absent with 'false_alarm'")


def log_pvalue_drift(p_values, *, alpha: float = DRIFT_ALPHA, level: float = DRIFT_LEVEL,
                     min_n: int = DRIFT_MIN_N) -> dict:
    """Exact one-sided binomial test of the rate of ``p <= alpha`` in a window of conformal p-values.

    Returns ``{"flag", "status" ('ok' | 'drift' | 'too_few'), "n", "count", "observed_rate",
    "expected_rate", "test_p_value", ...}``. The dashboard's drift flag; a service-wide drift
    monitor with the same answer shape can take its place.
    """
    from scipy.stats import binom

    p = np.asarray([x for x in p_values if x is not None], dtype=np.float64)
    n = int(p.size)
    k = int((p <= alpha).sum())
    out = {"method": f"binomial test: rate of conformal p <= {alpha:g} in the last {n} parts "
                     f"not confirmed as defects, against at most {alpha:g}",
           "n": n, "count": k, "alpha": alpha, "level": level, "expected_rate": alpha,
           "observed_rate": k / n if n else None}
    if n < min_n:
        return out | {"flag": False, "status": "too_few", "test_p_value": None,
                      "message": f"{n} parts with a p-value; the drift test needs {min_n}"}
    test_p = float(binom.sf(k - 1, n, alpha))
    flag = test_p < level
    return out | {"flag": bool(flag), "status": "drift" if flag else "ok", "test_p_value": test_p,
                  "message": (f"{k} of the last {n} parts have p <= {alpha:g} ({100 * k / n:.0f}%, at most "
                              f"{100 * alpha:.0f}% expected): drift or a run of defects" if flag else
                              f"{k} of the last {n} parts have p <= {alpha:g}: consistent with the calibration")}


def drift_status(store, model_id: str | None = None) -> dict:
    """The drift flag shown on the page, from the log (swap point for a service-wide monitor)."""
    rows = store.reviewed_window(model_id=model_id, limit=DRIFT_WINDOW * 5)
    p = [r[5] for r in rows if r[5] is not None and r[6] != "defect"][:DRIFT_WINDOW]
    return log_pvalue_drift(p)


def _bucket_seconds(span: float, target: int = 24) -> float:
    """A round bucket width giving about ``target`` buckets over ``span`` seconds."""
    for width in (60, 300, 600, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400):
        if span / width <= target:
            return float(width)
    return float(7 * 86400 * math.ceil(span / (7 * 86400 * target)))


def window_stats(store, *, window_s: float, now: float | None = None, model_id: str | None = None,
                 bins: int = HIST_BINS, threshold: float | None = None) -> dict:
    """Yield / NG rate per time bucket, the score histogram split by verdict, and review counts."""
    now = time.time() if now is None else float(now)
    since = now - float(window_s)
    rows = store.reviewed_window(since=since, until=now + 1e-6, model_id=model_id, limit=MAX_STATS_ROWS)
    truncated = len(rows) >= MAX_STATS_ROWS
    if truncated:  # the newest MAX_STATS_ROWS only: the window starts at the oldest of them
        since = rows[-1][1]
    width = _bucket_seconds(now - since)
    start = math.floor(since / width) * width
    n_buckets = max(1, math.ceil((now - start) / width))
    created = np.array([r[1] for r in rows], dtype=np.float64)
    scores = np.array([r[2] for r in rows], dtype=np.float64)
    ng = np.array([r[3] == "NG" for r in rows], dtype=bool)
    false_alarm = np.array([r[6] == "false_alarm" for r in rows], dtype=bool)
    defect = np.array([r[6] == "defect" for r in rows], dtype=bool)
    idx = np.clip(((created - start) // width).astype(int), 0, n_buckets - 1) if rows else np.zeros(0, int)
    series = []
    for b in range(n_buckets):
        sel = idx == b
        n, n_ng, n_fa = int(sel.sum()), int((sel & ng).sum()), int((sel & false_alarm).sum())
        series.append({"start": start + b * width, "n": n, "ok": n - n_ng, "ng": n_ng, "false_alarms": n_fa,
                       "yield": (n - n_ng) / n if n else None, "ng_rate": n_ng / n if n else None})
    thresholds = sorted({float(r[4]) for r in rows})
    threshold = thresholds[-1] if threshold is None and thresholds else threshold
    hist = {"edges": [], "ok": [], "ng": [], "threshold": threshold, "thresholds_in_window": thresholds}
    if rows:
        lo, hi = float(scores.min()), float(scores.max())
        if threshold is not None:
            lo, hi = min(lo, threshold), max(hi, threshold)
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 1e-6)
        edges = np.linspace(lo - pad, hi + pad, bins + 1)
        hist |= {"edges": edges.tolist(), "ok": np.histogram(scores[~ng], edges)[0].tolist(),
                 "ng": np.histogram(scores[ng], edges)[0].tolist()}
    n, n_ng = len(rows), int(ng.sum())
    types: dict[str, int] = {}
    for r in rows:
        if r[6] == "defect":
            types[r[7]] = types.get(r[7], 0) + 1
    n_fa, n_def = int(false_alarm.sum()), int(defect.sum())
    totals = {"n": n, "ok": n - n_ng, "ng": n_ng, "yield": (n - n_ng) / n if n else None,
              "ng_rate": n_ng / n if n else None, "false_alarms": n_fa, "defects": n_def,
              "unreviewed_ng": n_ng - int((ng & (false_alarm | defect)).sum()),
              "yield_after_review": (n - n_ng + int((ng & false_alarm).sum())) / n if n else None,
              "defect_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))}
    return {"window": {"since": since, "until": now, "window_s": float(window_s), "bucket_s": width,
                       "truncated": truncated},
            "totals": totals, "series": series, "histogram": hist}


def dashboard_router(service, require_key) -> APIRouter:
    """The review and stats routes; ``require_key`` is the app's auth dependency (returns the key's name)."""
    from gaikan.service.app import inspection_json

    router = APIRouter()
    store = service.store

    def with_review(row, review=None) -> dict:
        d = inspection_json(row)
        d["review"] = None if review is None else review.to_dict()
        return d

    @router.get("/v1/review-queue", tags=["reviews"], dependencies=[Depends(require_key)],
                summary="NG inspections nobody has reviewed yet, newest first")
    def review_queue(limit: int = Query(20, ge=1, le=200), offset: int = Query(0, ge=0)) -> dict:
        rows, total = store.review_queue(limit=limit, offset=offset)
        return {"items": [with_review(r) for r in rows], "total": total, "limit": limit, "offset": offset}

    @router.post("/v1/inspections/{inspection_id}/review", tags=["reviews"],
                 summary="Mark an NG inspection as a false alarm or a defect of some type (who: the API key's name)")
    def review(inspection_id: int, body: ReviewIn, reviewer: str = Depends(require_key)) -> dict:
        row = store.get(inspection_id)
        if row is None:
            raise HTTPException(404, f"no inspection with id {inspection_id}")
        if row.verdict != "NG":
            raise HTTPException(409, f"inspection {inspection_id} is {row.verdict}: only NG verdicts are reviewed")
        defect_type = None if body.defect_type is None else " ".join(body.defect_type.split())
        if body.label == "defect" and not defect_type:
            raise HTTPException(422, "a 'defect' review needs a defect_type (e.g. 'crack')")
        if body.label == "false_alarm" and defect_type is not None:
            raise HTTPException(422, "a 'false_alarm' review takes no defect_type")
        if defect_type is not None and not defect_type.isprintable():
            raise HTTPException(422, "defect_type must be printable text")
        saved = store.add_review(inspection_id, label=body.label, defect_type=defect_type, reviewer=reviewer)
        return with_review(row, saved)

    @router.get("/v1/reviews", tags=["reviews"], dependencies=[Depends(require_key)],
                summary="The latest reviews, newest first (superseded ones included)")
    def reviews(limit: int = Query(20, ge=1, le=500)) -> dict:
        items = []
        for r in store.recent_reviews(limit=limit):
            row = store.get(r.inspection_id)
            items.append(r.to_dict() | {"inspection": None if row is None else inspection_json(row)})
        return {"items": items}

    @router.get("/v1/stats", tags=["reviews"], dependencies=[Depends(require_key)],
                summary="Yield and NG rate over time, score histogram against the threshold, reviews, drift")
    def stats(window_s: float = Query(86400.0, gt=0, le=366 * 86400, description="the last this many seconds"),
              bins: int = Query(HIST_BINS, ge=5, le=200)) -> dict:
        out = window_stats(store, window_s=window_s, bins=bins, threshold=service.threshold)
        out["totals"]["review_queue"] = store.review_queue(limit=1)[1]
        out["drift"] = drift_status(store)
        return out

    return router
