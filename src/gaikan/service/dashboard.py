"""The dashboard's endpoints: the review loop and the numbers behind the charts.

::

    GET  /v1/review-queue                 NG inspections nobody has reviewed yet, newest first
    POST /v1/inspections/{id}/review      {"label": "false_alarm"} or {"label": "defect", "defect_type": "crack"}
    GET  /v1/reviews                      the latest reviews (who, when, what)
    GET  /v1/stats                        yield and NG rate over time, score histogram, review counts, drift

A review is stored in the log's ``reviews`` table with the name of the API key that sent it
(:mod:`gaikan.service.keys`) and the time; a second review of the same inspection supersedes the
first (both stay in the table).

Drift: the page's flag is the service's drift monitor (:class:`gaikan.service.monitor.DriftMonitor`,
the same flag as ``/v1/drift``, ``/metrics`` and the log's ``drift`` column), shown by
:func:`drift_status`; with several models it is raised when any model's is.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field

HIST_BINS = 30
MAX_STATS_ROWS = 50_000


class ReviewIn(BaseModel):
    label: Literal["false_alarm", "defect"] = Field(description="'false_alarm': the part is good; "
                                                                "'defect': a real defect, of defect_type")
    defect_type: str | None = Field(None, min_length=1, max_length=60,
                                    description="the kind of defect (free text, e.g. 'crack', 'ひび'); "
                                                "required with label 'defect', absent with 'false_alarm'")


def drift_status(service) -> dict:
    """The page's drift box from the service's drift monitor(s): ``{"flag", "status" ('ok' | 'drift' |
    'too_few' | 'unmonitored'), "message", "method", "test_p_value", "model", "state"}``."""
    monitored = [(m.name, m.drift.state()) for m in service.registry.all() if m.drift is not None]
    method = ("two-sample KS test of the OK parts' scores in the window against the calibration goods' "
              "(and the NG rate against --drift-ng-rate when given)")
    if not monitored:
        return {"flag": False, "status": "unmonitored", "message": "no model has calibration scores: "
                "drift is not monitored", "method": method, "test_p_value": None, "model": None, "state": None}
    name, state = next(((n, st) for n, st in monitored if st["drift"]), monitored[0])
    tests = [p for p in (state["ks_pvalue"], state["ng_rate_tail_p"]) if p is not None]
    test_p = min(tests) if tests else None
    if state["drift"]:
        status = "drift"
        message = f"model {name}: " + " and ".join(
            {"goods_not_uniform": "OK parts' scores no longer look like the calibration goods'",
             "ng_rate_high": "NG rate above the expected rate"}[r] for r in state["reasons"])
    elif test_p is None:
        status = "too_few"
        message = (f"model {name}: {state['ok_in_window']} OK parts in the window; the drift test needs "
                   f"{state['min_count']}")
    else:
        status = "ok"
        message = (f"model {name}: {state['ok_in_window']} OK parts of the last {state['window']}: consistent "
                   "with the calibration")
    return {"flag": bool(state["drift"]), "status": status, "message": message, "method": method,
            "test_p_value": test_p, "model": name, "state": state}


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


def dashboard_router(service, require_key, router: APIRouter | None = None) -> APIRouter:
    """The review and stats routes; ``require_key`` is the app's auth dependency (returns the key's name).
    ``router``: where to add them (the app's own ``app.router``, so that they are plain routes of the
    app: FastAPI >= 0.16x wraps an included router, which gaikan.service.errors would not see to
    document their error codes); a new APIRouter if None."""
    from gaikan.service.app import inspection_json

    router = APIRouter() if router is None else router
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
                 responses={409: {"description": "The inspection's verdict is OK: only NG verdicts are reviewed",
                                  "content": {"application/json": {"schema": {
                                      "type": "object", "properties": {"detail": {"type": "string"}},
                                      "required": ["detail"]}}}}},
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
        out["drift"] = drift_status(service)
        return out

    return router
