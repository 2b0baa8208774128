"""The dashboard's API: named API keys, the review loop (queue, false alarm / defect reviews stored
with who and when), the stats behind the charts (the drift flag is issue 9's monitor: tests/service/test_service_monitoring.py)."""

import io
import sqlite3

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from gaikan.errors import GaikanError
from gaikan.service.app import create_app
from gaikan.service.keys import parse_api_keys

KEYS = ["alice=alice-key-123", "bob=bob-key-456", "plain-line-key"]


def test_api_key_names_plain_keys_and_refusals():
    assert parse_api_keys(["alice=k-1", "bob=k=2"]) == {"alice": "k-1", "bob": "k=2"}
    assert parse_api_keys("just-a-key") == {"default": "just-a-key"}
    assert parse_api_keys("c2VjcmV0==") == {"default": "c2VjcmV0=="}  # base64 padding is not NAME=KEY
    assert parse_api_keys(["a key=with space"]) == {"default": "a key=with space"}  # not a name
    with pytest.raises(GaikanError, match="'alice' is given twice"):
        parse_api_keys(["alice=k1", "alice=k2"])
    with pytest.raises(GaikanError, match="same key as 'alice'"):
        parse_api_keys(["alice=k1", "bob=k1"])
    with pytest.raises(GaikanError, match="write NAME=KEY"):
        parse_api_keys(["k1", "k2"])


@pytest.fixture
def client(service_model, tmp_path):
    with TestClient(create_app(service_model, tmp_path / "data", KEYS)) as c:
        yield c


def png(img) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(np.asarray(img, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _inspect(client, data, key="plain-line-key"):
    r = client.post("/v1/inspect", files={"file": ("p.png", data, "image/png")}, headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    return r.json()


def _review(client, inspection_id, body, key):
    return client.post(f"/v1/inspections/{inspection_id}/review", json=body, headers={"X-API-Key": key})


def test_review_loop_records_who_and_when_and_empties_the_queue(client, uploads, tmp_path):
    alice, bob, line = ({"X-API-Key": k.split("=")[-1]} for k in KEYS)
    good = _inspect(client, uploads["good"][0])
    ngs = [_inspect(client, d) for d in uploads["defect"][:3]]
    assert good["verdict"] == "OK" and [n["verdict"] for n in ngs] == ["NG"] * 3
    assert client.get("/v1/review-queue", headers={"X-API-Key": "nope"}).status_code == 401
    q = client.get("/v1/review-queue", headers=alice).json()
    assert q["total"] == 3 and [i["id"] for i in q["items"]] == [n["id"] for n in reversed(ngs)]
    assert all(i["review"] is None and i["links"]["heatmap"] for i in q["items"])

    # refused, and nothing stored
    assert _review(client, good["id"], {"label": "false_alarm"}, alice["X-API-Key"]).status_code == 409
    assert _review(client, 9999, {"label": "false_alarm"}, alice["X-API-Key"]).status_code == 404
    r = _review(client, ngs[0]["id"], {"label": "defect"}, alice["X-API-Key"])
    assert r.status_code == 422 and "defect_type" in r.json()["detail"]
    r = _review(client, ngs[0]["id"], {"label": "false_alarm", "defect_type": "crack"}, alice["X-API-Key"])
    assert r.status_code == 422
    assert _review(client, ngs[0]["id"], {"label": "ok"}, alice["X-API-Key"]).status_code == 422
    assert client.get("/v1/review-queue", headers=alice).json()["total"] == 3

    r = _review(client, ngs[0]["id"], {"label": "false_alarm"}, alice["X-API-Key"])
    assert r.status_code == 200, r.text
    assert r.json()["review"]["reviewer"] == "alice" and r.json()["review"]["label"] == "false_alarm"
    r = _review(client, ngs[1]["id"], {"label": "defect", "defect_type": "  ひび割れ  "}, bob["X-API-Key"])
    assert r.json()["review"]["defect_type"] == "ひび割れ"
    # the plain --api-key form keeps working and is named 'default'
    r = _review(client, ngs[2]["id"], {"label": "defect", "defect_type": "crack"}, line["X-API-Key"])
    assert r.json()["review"]["reviewer"] == "default"
    # a second opinion supersedes the first: the current review of ngs[2] is bob's false alarm
    _review(client, ngs[2]["id"], {"label": "false_alarm"}, bob["X-API-Key"])
    assert client.get("/v1/review-queue", headers=alice).json()["total"] == 0
    recent = client.get("/v1/reviews", headers=alice).json()["items"]
    assert [(x["inspection_id"], x["reviewer"], x["label"]) for x in recent] == [
        (ngs[2]["id"], "bob", "false_alarm"), (ngs[2]["id"], "default", "defect"),
        (ngs[1]["id"], "bob", "defect"), (ngs[0]["id"], "alice", "false_alarm")]

    # stored in the log with who and when
    db = sqlite3.connect(tmp_path / "data" / "inspections.sqlite3")
    rows = db.execute("SELECT inspection_id, reviewer, label, defect_type, created, created_utc FROM reviews "
                      "ORDER BY id").fetchall()
    assert [r[:4] for r in rows] == [(ngs[0]["id"], "alice", "false_alarm", None),
                                     (ngs[1]["id"], "bob", "defect", "ひび割れ"),
                                     (ngs[2]["id"], "default", "defect", "crack"),
                                     (ngs[2]["id"], "bob", "false_alarm", None)]
    assert all(r[4] >= ngs[-1]["created"] and r[5].endswith("Z") for r in rows)

    s = client.get("/v1/stats?window_s=3600", headers=alice).json()
    t = s["totals"]
    assert (t["n"], t["ok"], t["ng"], t["false_alarms"], t["defects"], t["review_queue"]) == (4, 1, 3, 2, 1, 0)
    assert t["yield"] == pytest.approx(1 / 4) and t["yield_after_review"] == pytest.approx(3 / 4)
    assert t["defect_types"] == {"ひび割れ": 1}
    assert sum(b["n"] for b in s["series"]) == 4 and sum(b["ng"] for b in s["series"]) == 3
    h = s["histogram"]
    assert sum(h["ok"]) == 1 and sum(h["ng"]) == 3 and h["threshold"] == pytest.approx(good["threshold"])
    edges = np.asarray(h["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    # every NG count sits in a bin reaching above the threshold, the OK one in a bin reaching below it
    assert all(edges[i + 1] > h["threshold"] for i, c in enumerate(h["ng"]) if c)
    assert all(edges[i] < h["threshold"] for i, c in enumerate(h["ok"]) if c)
    assert len(centers) == 30 and s["drift"]["status"] == "too_few"
