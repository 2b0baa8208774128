"""Monitoring (issue 9): /metrics parsed with prometheus-client's own parser and checked against
the log, and the drift flag: not raised on a stream of new good parts, raised on shifted ones, in
/v1/drift, /metrics and the log rows."""

import io
import sqlite3

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from gaikan.data.synthetic import make_textured_images
from gaikan.detectors.base import load_detector
from gaikan.service.app import create_app
from gaikan.service.monitor import DriftMonitor

KEY = "monitoring-key"
H = {"X-API-Key": KEY}
DRIFT = {"window": 100, "min_count": 30, "level": 1e-4}


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(client, data):
    return client.post("/v1/inspect", files={"file": ("p.png", data, "image/png")}, headers=H)


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} from the exposition text, via prometheus-client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def fresh_goods(n: int) -> list[np.ndarray]:
    """New good parts from the same process as the model's training parts."""
    return make_textured_images(n, 64, np.random.default_rng(123))


def shifted(images: list[np.ndarray]) -> list[np.ndarray]:
    """The same parts seen by a noisier camera (sensor noise sigma 0.015 -> 0.025)."""
    rng = np.random.default_rng(1)
    return [np.clip(im + rng.normal(0.0, 0.02, im.shape), 0.0, 1.0).astype(np.float32) for im in images]


def test_metrics_are_prometheus_text_and_agree_with_the_log(service_model, tmp_path, uploads):
    with TestClient(create_app(service_model, tmp_path / "d", KEY)) as c:
        answers = [post(c, d).json() for d in uploads["good"][:5] + uploads["defect"][:3]]
        assert post(c, b"not an image at all" * 4).status_code == 415
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        model_id = c.get("/v1/models/default", headers=H).json()["model_id"]
    got = samples(r.text)
    m = frozenset({("model", "default")})
    n_ng = sum(a["verdict"] == "NG" for a in answers)
    assert got[("gaikan_requests_total", m | {("code", "200")})] == len(answers)
    assert got[("gaikan_requests_total", m | {("code", "415")})] == 1
    assert got[("gaikan_verdicts_total", m | {("verdict", "NG")})] == n_ng >= 3  # the 3 defects (+ false alarms)
    assert got[("gaikan_verdicts_total", m | {("verdict", "OK")})] == len(answers) - n_ng
    assert got[("gaikan_request_latency_seconds_count", m)] == len(answers)
    assert got[("gaikan_request_latency_seconds_bucket", m | {("le", "+Inf")})] == len(answers)
    total_ms = sum(a["timing"]["total_ms"] for a in answers)  # up to the log write; the histogram adds its commit
    assert total_ms / 1000 <= got[("gaikan_request_latency_seconds_sum", m)] < total_ms / 1000 + 60
    assert got[("gaikan_batch_size_count", m)] >= 1
    assert got[("gaikan_queue_length", m)] == 0
    assert got[("gaikan_drift", m)] == 0
    info = [k for k in got if k[0] == "gaikan_model_info"]
    assert len(info) == 1 and ("model_id", model_id) in info[0][1] and ("runtime", "onnx") in info[0][1]
    db = sqlite3.connect(tmp_path / "d" / "inspections.sqlite3")
    assert dict(db.execute("SELECT verdict, COUNT(*) FROM inspections GROUP BY verdict")) == {
        "OK": len(answers) - n_ng, "NG": n_ng}


def test_drift_monitor_flags_shifted_goods_and_not_new_goods(service_model):
    det = load_detector(service_model)
    goods = fresh_goods(300)
    for images, expect in ((goods, False), (shifted(goods), True)):
        monitor = DriftMonitor(det.calibration_scores_, det.threshold, **DRIFT)
        flags = [monitor.update(s) for s in det.score(images).scores]
        assert any(flags) == expect, monitor.state()
    # a steady defect rate is not drift: 30 % NG parts mixed into the goods raise nothing
    monitor = DriftMonitor(det.calibration_scores_, det.threshold, **DRIFT)
    scores = det.score(goods[:200]).scores
    for i, s in enumerate(scores):
        monitor.update(s)
        if i % 3 == 0:
            monitor.update(det.threshold * 3)
    assert not monitor.flag
    # ... unless the line's usual NG rate is given and exceeded
    monitor = DriftMonitor(det.calibration_scores_, det.threshold, expected_ng_rate=0.05, **DRIFT)
    for i, s in enumerate(scores[:100]):
        monitor.update(s)
        if i % 3 == 0:
            monitor.update(det.threshold * 3)
    assert monitor.flag and monitor.state()["reasons"] == ["ng_rate_high"]


def test_drift_flag_is_raised_by_shifted_parts_in_the_api_metrics_and_log(service_model, tmp_path):
    goods = fresh_goods(100)
    with TestClient(create_app(service_model, tmp_path / "d", KEY, drift=DRIFT)) as c:
        for im in goods:
            assert post(c, png(im)).status_code == 200
        calm = c.get("/v1/drift", headers=H).json()
        calm_metric = samples(c.get("/metrics").text)[("gaikan_drift", frozenset({("model", "default")}))]
        for im in shifted(goods):
            assert post(c, png(im)).status_code == 200
        raised = c.get("/v1/drift", headers=H).json()
        one = c.get("/v1/models/default/drift", headers=H).json()
        raised_metric = samples(c.get("/metrics").text)[("gaikan_drift", frozenset({("model", "default")}))]
    assert calm["drift"] is False and calm["models"]["default"]["state"]["window"] == 100 and calm_metric == 0
    assert raised["drift"] is True and one["drift"] is True and raised_metric == 1
    assert one["state"]["reasons"] == ["goods_not_uniform"] and one["state"]["ks_pvalue"] < DRIFT["level"]
    db = sqlite3.connect(tmp_path / "d" / "inspections.sqlite3")
    flags = [r[0] for r in db.execute("SELECT drift FROM inspections ORDER BY id")]
    assert flags[:100] == [0] * 100 and flags[-1] == 1
