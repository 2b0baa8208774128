"""The inspection service through FastAPI's TestClient: verdicts with p-values on synthetic parts,
the SQLite log (and its survival of a restart), every bad input with its status code and message,
auth rules, and a free event loop while the detector is busy."""

import hashlib
import io
import sqlite3
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from gaikan.detectors.base import load_detector
from gaikan.errors import GaikanError
from gaikan.evaluation.thresholds import conformal_p_value
from gaikan.service.app import create_app

ALPHA = 0.1
KEY = "test-key-0123456789"
H = {"X-API-Key": KEY}


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "service-data"


@pytest.fixture
def client(service_model, data_dir):
    app = create_app(service_model, data_dir, KEY, max_upload_bytes=2_000_000, max_pixels=1_000_000)
    with TestClient(app) as c:
        yield c


def inspect(client, data: bytes, part_id=None, headers=H, name="part.png"):
    form = {"part_id": part_id} if part_id is not None else {}
    return client.post("/v1/inspect", files={"file": (name, data, "image/png")}, data=form, headers=headers)


def test_good_part_is_ok_and_defective_part_is_ng_with_p_values_and_a_logged_row(client, service_model,
                                                                                data_dir, uploads):
    det = load_detector(service_model)
    good, bad = uploads["good"][0], uploads["defect"][0]
    r_good = inspect(client, good, part_id="A-001")
    r_bad = inspect(client, bad, part_id="A-002")
    assert r_good.status_code == 200 and r_bad.status_code == 200, (r_good.text, r_bad.text)
    g, b = r_good.json(), r_bad.json()
    assert g["verdict"] == "OK" and b["verdict"] == "NG"
    assert g["threshold_method"] == "conformal" and g["threshold"] == pytest.approx(det.threshold)
    # the service's score is the library's score of the decoded upload
    direct = det.score([np.asarray(Image.open(io.BytesIO(bad)))]).scores[0]
    assert b["score"] == pytest.approx(float(direct), rel=1e-5)
    # conformal p-values: NG iff p <= alpha at the conformal threshold
    assert b["p_value"] == pytest.approx(conformal_p_value(det.calibration_scores_, b["score"]))
    assert b["p_value"] <= ALPHA < g["p_value"]
    assert b["model_id"] == g["model_id"] and b["model_id"].startswith("padim-")
    assert set(b["timing"]) >= {"decode_ms", "queue_ms", "score_ms", "render_ms", "total_ms"}
    for kind in ("image", "thumb", "heatmap", "overlay"):
        r = client.get(b["links"][kind], headers=H)
        assert r.status_code == 200, kind
        if kind == "image":
            assert r.content == bad
        else:
            assert Image.open(io.BytesIO(r.content)).size[0] > 0
    # the row, read straight from SQLite
    db = sqlite3.connect(data_dir / "inspections.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    row = db.execute("SELECT part_id, image_sha256, score, verdict, threshold, p_value, model_id, model_checksum "
                     "FROM inspections WHERE id = ?", (b["id"],)).fetchone()
    manifest_sha = det.manifest_["tensors"]["sha256"]
    assert row == ("A-002", hashlib.sha256(bad).hexdigest(), pytest.approx(b["score"]), "NG",
                   pytest.approx(det.threshold), pytest.approx(b["p_value"]), b["model_id"], manifest_sha)
    sha = row[1]
    assert (data_dir / "blobs" / sha[:2] / f"{sha}.png").read_bytes() == bad
    assert client.get(f"/v1/inspections/{b['id']}", headers=H).json()["image_sha256"] == sha


def test_every_injected_defect_is_ng_and_most_goods_are_ok(client, uploads):
    defects = [inspect(client, d).json() for d in uploads["defect"]]
    goods = [inspect(client, g).json() for g in uploads["good"]]
    assert all(d["verdict"] == "NG" for d in defects), [d["score"] for d in defects]
    assert sum(g["verdict"] == "OK" for g in goods) >= len(goods) - 2
    assert min(d["score"] for d in defects) > np.median([g["score"] for g in goods])


def test_listing_filters_pages_and_orders_ng_first(client, uploads):
    t0 = time.time()
    ids = [inspect(client, uploads["good"][0]).json()["id"], inspect(client, uploads["defect"][1]).json()["id"],
           inspect(client, uploads["good"][1]).json()["id"]]
    page = client.get("/v1/inspections", headers=H).json()
    assert page["total"] == 3 and [i["id"] for i in page["items"]] == ids[::-1]
    ng_first = client.get("/v1/inspections?order=ng_first", headers=H).json()["items"]
    assert ng_first[0]["id"] == ids[1] and ng_first[0]["verdict"] == "NG"
    only_ok = client.get("/v1/inspections?verdict=OK", headers=H).json()
    assert only_ok["total"] == 2 and {i["verdict"] for i in only_ok["items"]} == {"OK"}
    paged = client.get("/v1/inspections?limit=1&offset=1", headers=H).json()
    assert paged["total"] == 3 and [i["id"] for i in paged["items"]] == [ids[1]]
    assert client.get(f"/v1/inspections?since={t0 - 60}", headers=H).json()["total"] == 3
    assert client.get(f"/v1/inspections?until={t0 - 60}", headers=H).json()["total"] == 0
    assert client.get("/v1/inspections?verdict=maybe", headers=H).status_code == 422


def test_restart_keeps_the_log(service_model, data_dir, uploads):
    with TestClient(create_app(service_model, data_dir, KEY)) as c1:
        first = inspect(c1, uploads["defect"][2], part_id="before-restart").json()
    app2 = create_app(service_model, data_dir, KEY)
    with TestClient(app2) as c2:
        got = c2.get(f"/v1/inspections/{first['id']}", headers=H)
        assert got.status_code == 200 and got.json()["part_id"] == "before-restart"
        assert c2.get(first["links"]["heatmap"], headers=H).status_code == 200
        second = inspect(c2, uploads["good"][0]).json()
        assert second["id"] == first["id"] + 1
        assert c2.get("/v1/inspections", headers=H).json()["total"] == 2


def _truncated_png() -> bytes:
    data = _png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    """A small PNG whose header claims 30000 x 30000 pixels (a decompression bomb): refused from the header."""
    import struct
    import zlib

    data = bytearray(_png(np.zeros((8, 8), np.uint8)))
    ihdr = bytearray(data[16:29])  # width, height, depth, colour type, ...
    ihdr[0:8] = struct.pack(">II", 30000, 30000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


BAD_INPUTS = [
    ("decompression bomb", _bomb_png, H, 413, "too large"),
    ("non-image", lambda: b"this is not an image, just text\n" * 10, H, 415, "not an image"),
    ("empty", lambda: b"", H, 422, "empty"),
    ("truncated", _truncated_png, H, 422, "truncated"),
    ("too many pixels", lambda: _png(np.zeros((1001, 1000), np.uint8)), H, 413, "more than the limit"),
    ("too many bytes", lambda: b"\x89PNG" + bytes(2_100_000), H, 413, "larger than the limit"),
    ("missing key", lambda: _png(np.zeros((64, 64), np.uint8)), {}, 401, "missing API key"),
    ("wrong key", lambda: _png(np.zeros((64, 64), np.uint8)), {"X-API-Key": "nope"}, 401, "wrong API key"),
]


@pytest.mark.parametrize("case,make,headers,status,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_status_and_a_message_and_the_service_keeps_serving(client, uploads, data_dir, case,
                                                                               make, headers, status, fragment):
    r = inspect(client, make(), headers=headers)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and fragment in detail and "\n" not in detail
    assert client.get("/v1/inspections", headers=H).json()["total"] == 0  # nothing logged
    assert list((data_dir / "tmp").iterdir()) == []  # no leftovers
    ok = inspect(client, uploads["good"][0])
    assert ok.status_code == 200 and ok.json()["verdict"] == "OK"


def test_unknown_ids_and_keys_on_reads(client, uploads):
    assert client.get("/v1/inspections/999", headers=H).status_code == 404
    assert "no inspection with id 999" in client.get("/v1/inspections/999", headers=H).json()["detail"]
    assert client.get("/v1/inspections/999/heatmap", headers=H).status_code == 404
    assert client.get("/v1/inspections/1/secret", headers=H).status_code == 422
    for path in ("/v1/inspections", "/v1/inspections/1", "/v1/inspections/1/image"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"X-API-Key": KEY + "x"}).status_code == 401
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.get("/").status_code == 200 and "<html" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/inspect", "/v1/inspections", "/v1/inspections/{inspection_id}", "/healthz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_client_file_names_never_reach_a_path(client, data_dir, uploads):
    r = inspect(client, uploads["good"][0], name="../../../escape.png")
    assert r.status_code == 200
    r = inspect(client, uploads["good"][1], name="/tmp/abs/evil name.png")
    assert r.status_code == 200
    written = [p.name for p in data_dir.parent.rglob("*")]
    assert not any("escape" in n or "evil" in n for n in written)
    for p in (data_dir / "blobs").rglob("*.*"):
        assert len(p.stem) == 64 and all(c in "0123456789abcdef" for c in p.stem)


def test_auth_settings_are_refused_when_unsafe(service_model, tmp_path, monkeypatch, uploads):
    monkeypatch.delenv("GAIKAN_API_KEY", raising=False)
    with pytest.raises(GaikanError, match="needs an API key"):
        create_app(service_model, tmp_path / "d1")
    with pytest.raises(GaikanError, match="only allowed on a loopback host"):
        create_app(service_model, tmp_path / "d2", no_auth=True, host="0.0.0.0")
    with TestClient(create_app(service_model, tmp_path / "d3", no_auth=True, host="::1")) as c:
        assert inspect(c, uploads["good"][0], headers={}).status_code == 200
    monkeypatch.setenv("GAIKAN_API_KEY", "from-env")
    with TestClient(create_app(service_model, tmp_path / "d4")) as c:
        assert inspect(c, uploads["good"][0], headers={"X-API-Key": "from-env"}).status_code == 200
        assert inspect(c, uploads["good"][0], headers=H).status_code == 401


def test_cli_serve_refuses_no_auth_on_a_public_host(service_model, tmp_path):
    from typer.testing import CliRunner

    from gaikan.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(service_model), "--host", "0.0.0.0", "--no-auth",
                                      "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and "only allowed on a loopback host" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "nothing"), "--api-key", "k",
                                      "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2 and "no model at" in result.output


def test_event_loop_stays_free_while_the_detector_is_busy(client, uploads):
    served = client.app.state.service.registry.get("default")
    gate = threading.Event()
    run = served.batcher._stages[0]

    def blocked_run(items):  # the scoring workers are "busy" until the gate opens
        gate.wait(30)
        return run(items)

    served.batcher._stages[0] = blocked_run
    done = {}
    try:  # an inspection must wait, /healthz, /metrics and reads must not
        t = threading.Thread(target=lambda: done.setdefault("r", inspect(client, uploads["defect"][0])))
        t.start()
        time.sleep(0.3)
        start = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/inspections", headers=H).status_code == 200
        assert client.get("/metrics").status_code == 200
        assert time.perf_counter() - start < 2.0
        assert "r" not in done
    finally:
        gate.set()
        t.join(timeout=30)
        served.batcher._stages[0] = run
    assert done["r"].status_code == 200 and done["r"].json()["verdict"] == "NG"
