"""Faults of the log under the service: the SQLite log locked by another process, and the data
directory's disk full (a real small tmpfs). Each request that cannot be logged gets a 503 with a
Retry-After header and nothing logged; every request that got a 200 has its row; service recovers
by itself once the fault is gone."""

import sqlite3
import threading
import time

from fastapi.testclient import TestClient

import gaikan.service.store as store
from gaikan.service.app import create_app
from small_fs import fill, small_tmpfs

KEY = "faults-key-0123456789"
H = {"X-API-Key": KEY}


def post(client, data: bytes, part: str):
    return client.post("/v1/inspect", files={"file": ("p.png", data, "image/png")}, data={"part_id": part},
                       headers=H)


def logged(data_dir) -> dict[int, str]:
    db = sqlite3.connect(data_dir / store.DB_NAME)
    try:
        return {r[0]: r[1] for r in db.execute("SELECT id, part_id FROM inspections")}
    finally:
        db.close()


def check_503(response) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert "nothing was logged" in response.json()["detail"]


def test_a_locked_log_gives_503_with_retry_after_and_loses_no_acknowledged_row(service_model, uploads, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.3)
    data_dir = tmp_path / "log"
    acked: dict[int, str] = {}
    refused: list[str] = []
    images = uploads["good"] + uploads["defect"]
    with TestClient(create_app(service_model, data_dir, KEY)) as client:
        r = post(client, images[0], "before")
        assert r.status_code == 200
        acked[r.json()["id"]] = "before"
        other = sqlite3.connect(data_dir / store.DB_NAME, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        r = post(client, images[1], "while-locked")
        check_503(r)
        assert "locked" in r.json()["detail"]
        refused.append("while-locked")
        assert client.get("/v1/inspections", headers=H).status_code in (200, 503)  # readers: WAL lets them in

        # clients keep sending while the lock comes and goes
        def sender(k: int) -> None:
            for i in range(4):
                part = f"c{k}-{i}"
                resp = post(client, images[(k + i) % len(images)], part)
                if resp.status_code == 200:
                    acked[resp.json()["id"]] = part
                else:
                    check_503(resp)
                    refused.append(part)

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        other.execute("ROLLBACK")
        for t in threads:
            t.join(timeout=120)
        other.close()
        r = post(client, images[2], "after")
        assert r.status_code == 200
        acked[r.json()["id"]] = "after"
    rows = logged(data_dir)
    assert rows == acked  # every acknowledged row, and nothing for the refused ones
    assert not set(refused) & set(rows.values())
    assert len(refused) >= 2  # the lock did refuse some


def test_a_full_disk_gives_503_and_the_service_recovers(service_model, uploads, tmp_path):
    with small_tmpfs(tmp_path / "mnt", 4096) as mnt:
        data_dir = mnt / "log"
        acked: dict[int, str] = {}
        with TestClient(create_app(service_model, data_dir, KEY)) as client:
            r = post(client, uploads["good"][0], "ok-1")
            assert r.status_code == 200
            acked[r.json()["id"]] = "ok-1"
            ballast = fill(mnt)
            statuses = []
            for i, data in enumerate(uploads["defect"][:3]):  # new images: their blobs cannot be written
                r = post(client, data, f"full-{i}")
                statuses.append(r.status_code)
                if r.status_code == 200:
                    acked[r.json()["id"]] = f"full-{i}"
                else:
                    check_503(r)
                    assert "ENOSPC" in r.json()["detail"] or "full" in r.json()["detail"]
            assert 503 in statuses
            assert client.get("/v1/inspections", headers=H).status_code in (200, 503)
            ballast.unlink()
            r = post(client, uploads["defect"][0], "ok-2")
            assert r.status_code == 200, r.text
            acked[r.json()["id"]] = "ok-2"
            for row_id in acked:  # every acknowledged row is complete: its pictures are there
                row = client.get(f"/v1/inspections/{row_id}", headers=H).json()
                for kind in ("image", "thumb", "heatmap", "overlay"):
                    assert client.get(row["links"][kind], headers=H).status_code == 200
        assert logged(data_dir) == acked
        assert not list((data_dir / "tmp").iterdir())  # no half-written blob or upload left behind
