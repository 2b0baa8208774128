"""Monitoring of the inspection service: Prometheus metrics and a running drift test per model.

Drift (``DriftMonitor``). For good parts made like the calibration parts, the conformal p-value
``p = (1 + #{s_i >= s}) / (n + 1)`` is uniform, which is the same as saying that their scores are
distributed like the calibration scores ``s_1..s_n``. The test compares the two samples directly,
because with one fixed calibration set the p-values of new goods are uniform only up to the
calibration set's own sampling noise (about ``1/sqrt(n)`` in their CDF): a one-sample test of the
p-values against U(0, 1) flags a stable process by chance when n is small (we saw it at n = 12).

The verdict is OK iff ``score <= t``; defects are mostly NG, so the OK parts are (nearly) all goods,
whatever the line's defect rate. Over the last ``window`` inspections:

* ``goods_not_uniform``: two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the OK
  parts' scores against the calibration scores ``<= t`` (the same truncation); raised when its
  p-value < ``level``. New lighting, focus, a new supplier move good scores up or down.
* ``ng_rate_high`` (only with ``expected_ng_rate`` = q, the line's usual NG rate: ``gaikan serve
  --drift-ng-rate``): the number k of NG verdicts among the window's N inspections against the
  binomial bound, raised when ``P(Binomial(N, q) >= k) < level``. It catches a shift that turns
  (nearly) every part NG, which leaves too few OK parts for the first test. It is off by default:
  real defects raise the NG rate too, and the goods' false-alarm rate alone (about
  alpha) would flag any line with a steady defect rate above it.

Each test runs once at least ``min_count`` values are in the window (OK parts for the first). The
flag is the OR of the two, recomputed every ``every`` inspections (default 5); ``level`` is per
evaluation (default 1e-4: on a stable process a window is flagged by chance with probability
about 1e-4 per evaluation).

Metrics (``ServiceMetrics``, one ``prometheus_client.CollectorRegistry`` per app, label ``model`` =
the served name): ``gaikan_requests_total{model,code}``, ``gaikan_verdicts_total{model,verdict}``,
``gaikan_request_latency_seconds{model}`` (histogram, upload received -> answer ready),
``gaikan_batch_size{model}`` (histogram), ``gaikan_queue_length{model}``, ``gaikan_drift{model}``,
``gaikan_drift_ks_pvalue{model}``, ``gaikan_drift_window{model}`` and
``gaikan_model_info{model,model_id,model_version,runtime}`` (= 1).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

import numpy as np

from gaikan.errors import SettingsError

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class DriftMonitor:
    """Running test: do the OK parts' scores still look like the calibration goods' (module docstring)?"""

    def __init__(self, calibration_scores, threshold: float, *, window: int = 200, min_count: int = 50,
                 level: float = 1e-4, expected_ng_rate: float | None = None, every: int = 5):
        if window < 10 or not 1 <= min_count <= window or not 0 < level < 1 or every < 1:
            raise SettingsError(f"drift window must be >= 10, 1 <= min count <= window, 0 < level < 1 and "
                                f"every >= 1; got {window}, {min_count}, {level}, {every}")
        if expected_ng_rate is not None and not 0.0 < expected_ng_rate < 1.0:
            raise SettingsError(f"the expected NG rate must be in (0, 1), got {expected_ng_rate}")
        cal = np.sort(np.asarray(calibration_scores, dtype=np.float64))
        self.threshold = float(threshold)
        self.n = len(cal)
        self.reference = cal[cal <= self.threshold]
        self.window, self.min_count, self.level, self.every = int(window), int(min_count), float(level), int(every)
        self.expected_ng_rate = None if expected_ng_rate is None else float(expected_ng_rate)
        self._scores: deque[float] = deque(maxlen=self.window)
        self._lock = threading.Lock()
        self.flag = False
        self.raised_at: float | None = None
        self.seen = 0
        self._state = self._evaluate()

    def update(self, score: float) -> bool:
        """Add one inspection's score (NG iff score > threshold); returns the flag after it."""
        with self._lock:
            self.seen += 1
            self._scores.append(float(score))
            if self.seen % self.every == 0 or len(self._scores) == self.min_count:
                self._state = self._evaluate()
                flag = bool(self._state["goods_not_uniform"] or self._state["ng_rate_high"])
                if flag and not self.flag:
                    self.raised_at = time.time()
                if not flag:
                    self.raised_at = None
                self.flag = flag
            return self.flag

    def _evaluate(self) -> dict:
        from scipy import stats

        scores = np.fromiter(self._scores, dtype=np.float64, count=len(self._scores))
        ok = scores[scores <= self.threshold]
        n_all, k_ng = len(scores), int(len(scores) - len(ok))
        ks_stat = ks_p = None
        if len(ok) >= self.min_count and len(self.reference) >= 2:
            res = stats.ks_2samp(ok, self.reference)
            ks_stat, ks_p = float(res.statistic), float(res.pvalue)
        ng_tail = None
        if self.expected_ng_rate is not None and n_all >= self.min_count:
            ng_tail = float(stats.binom.sf(k_ng - 1, n_all, self.expected_ng_rate)) if k_ng > 0 else 1.0
        return {"window": n_all, "ok_in_window": int(len(ok)), "ng_in_window": k_ng,
                "ng_rate": (k_ng / n_all) if n_all else None, "expected_ng_rate": self.expected_ng_rate,
                "ng_rate_tail_p": ng_tail, "ks_statistic": ks_stat, "ks_pvalue": ks_p,
                "goods_not_uniform": ks_p is not None and ks_p < self.level,
                "ng_rate_high": ng_tail is not None and ng_tail < self.level}

    def state(self) -> dict:
        """The JSON the service answers at /v1/drift (and the page reads)."""
        with self._lock:
            s = dict(self._state)
            reasons = [r for r in ("goods_not_uniform", "ng_rate_high") if s[r]]
            return {"drift": self.flag, "reasons": reasons, "raised_at": self.raised_at, "seen": self.seen,
                    "window_size": self.window, "min_count": self.min_count, "level": self.level,
                    "n_calibration": self.n, "n_reference": int(len(self.reference)), **s}


class ServiceMetrics:
    """The Prometheus metrics of one app (own registry, so several apps in one process do not clash)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gaikan_requests", "Inspection requests answered, by HTTP status code",
                                ["model", "code"], registry=self.registry)
        self.verdicts = Counter("gaikan_verdicts", "Verdicts given", ["model", "verdict"], registry=self.registry)
        self.latency = Histogram("gaikan_request_latency_seconds",
                                 "Inspection latency in the server: upload received -> answer ready",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("gaikan_batch_size", "Images per scoring batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue = Gauge("gaikan_queue_length", "Requests waiting for a scoring worker", ["model"],
                           registry=self.registry)
        self.drift = Gauge("gaikan_drift", "1 if the drift flag is raised", ["model"], registry=self.registry)
        self.drift_ks_p = Gauge("gaikan_drift_ks_pvalue", "KS test p-value of the OK parts' p-values (window)",
                                ["model"], registry=self.registry)
        self.drift_window = Gauge("gaikan_drift_window", "Inspections in the drift window", ["model"],
                                  registry=self.registry)
        self.model_info = Gauge("gaikan_model_info", "The model version served under a name (value 1)",
                                ["model", "model_id", "model_version", "runtime"], registry=self.registry)
        self._info_labels: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def set_model(self, served) -> None:
        """Register (or, after a swap, replace) the model served under ``served.name``."""
        labels = (served.name, served.model_id, served.model_version, served.runtime)
        with self._lock:
            old = self._info_labels.get(served.name)
            if old is not None and old != labels:
                self.model_info.remove(*old)
            self.model_info.labels(*labels).set(1)
            self._info_labels[served.name] = labels
        self.queue.labels(served.name).set_function(lambda s=served: s.queue_length())
        self.drift.labels(served.name).set(0)
        self.drift_window.labels(served.name).set(0)
        self.drift_ks_p.labels(served.name).set(math.nan)
        for verdict in ("OK", "NG"):
            self.verdicts.labels(served.name, verdict)  # present (0) from the start
        self.latency.labels(served.name)
        self.batch_size.labels(served.name)

    def observe_inspection(self, model: str, verdict: str, seconds: float, drift: dict | None) -> None:
        self.requests.labels(model, "200").inc()
        self.verdicts.labels(model, verdict).inc()
        self.latency.labels(model).observe(seconds)
        if drift is not None:
            self.drift.labels(model).set(1 if drift["drift"] else 0)
            self.drift_window.labels(model).set(drift["window"])
            ks = drift["ks_pvalue"]
            self.drift_ks_p.labels(model).set(math.nan if ks is None else ks)

    def observe_refused(self, model: str, code: int) -> None:
        self.requests.labels(model, str(int(code))).inc()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
