"""`gaikan serve --db postgresql://...`: the service writes the same rows as with its SQLite log, and
two real `gaikan serve` processes on different ports share one PostgreSQL database (and one data
directory for the images) with no lost or duplicated row, each serving the other's inspections."""

import hashlib
import os
import subprocess
import sys
import threading

import httpx
from serve_process import free_port, stop_servers, wait_healthy
from fastapi.testclient import TestClient

from gaikan.service.app import create_app
from gaikan.service.store import SCHEMA_VERSION, open_log

KEY = "pg-test-key"
H = {"X-API-Key": KEY}
VOLATILE = {"id", "created", "created_utc", "timing_ms", "timing", "links"}


def post(c, data: bytes, part: str):
    return c.post("/v1/inspect", files={"file": ("x.png", data, "image/png")}, data={"part_id": part}, headers=H)


def test_the_service_logs_the_same_rows_in_postgresql_as_in_sqlite(service_model, uploads, pg_url, tmp_path):
    images = uploads["good"][:3] + uploads["defect"][:3]
    rows = {}
    for name, db in (("sqlite", None), ("postgresql", pg_url)):
        with TestClient(create_app(service_model, tmp_path / name, KEY, db=db)) as c:
            answers = [post(c, img, f"part-{i}") for i, img in enumerate(images)]
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            listed = c.get("/v1/inspections?limit=100", headers=H).json()
            assert listed["total"] == len(images)
            assert [a.json()["id"] for a in answers] == [i["id"] for i in reversed(listed["items"])]
            rows[name] = [{k: v for k, v in i.items() if k not in VOLATILE} for i in reversed(listed["items"])]
    assert rows["sqlite"] == rows["postgresql"]  # scores, verdicts, p-values, hashes: identical
    assert [r["verdict"] for r in rows["postgresql"]] == ["OK"] * 3 + ["NG"] * 3


def start_replica(model, data_dir, db, port):
    env = {**os.environ, "GAIKAN_API_KEY": KEY, "GAIKAN_DB": db, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gaikan.cli", "serve", "--model", str(model), "--port", str(port),
                             "--data-dir", str(data_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_two_replicas_share_one_postgresql_log_without_lost_or_duplicated_rows(service_model, uploads, pg_url,
                                                                                 tmp_path):
    shared = tmp_path / "shared-data"
    ports = [free_port(), free_port()]
    procs = [start_replica(service_model, shared, pg_url, p) for p in ports]  # together: both migrate
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    images = uploads["good"] + uploads["defect"]
    acked, errors, lock = [], [], threading.Lock()

    def client(r: int, k: int):
        with httpx.Client(base_url=urls[r], timeout=60) as c:
            for i in range(8):
                part = f"r{r}-c{k}-{i}"
                img = images[(3 * k + i + r) % len(images)]
                try:
                    resp = post(c, img, part)
                except httpx.HTTPError as exc:
                    errors.append(f"{part}: {exc!r}")
                    continue
                if resp.status_code != 200:
                    errors.append(f"{part}: {resp.status_code} {resp.text[:200]}")
                    continue
                body = resp.json()
                with lock:
                    acked.append((body["id"], part, body["verdict"], body["score"], hashlib.sha256(img).hexdigest()))

    try:
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc, timeout=300.0)  # model load on a busy machine
        threads = [threading.Thread(target=client, args=(r, k)) for r in range(2) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:5]
        assert len(acked) == 48 and len({a[0] for a in acked}) == 48  # ids unique across replicas

        # each replica answers for the other's inspections, pictures included (one shared data dir)
        with httpx.Client(timeout=30, headers=H) as c:
            for a in acked[:4] + acked[-4:]:
                other = urls[1] if a[1].startswith("r0") else urls[0]
                row = c.get(f"{other}/v1/inspections/{a[0]}").json()
                assert (row["part_id"], row["verdict"], row["score"]) == a[1:4]
                image = c.get(f"{other}/v1/inspections/{a[0]}/image")
                assert image.status_code == 200 and hashlib.sha256(image.content).hexdigest() == a[4]
                assert c.get(f"{other}/v1/inspections/{a[0]}/heatmap").status_code == 200
            totals = [c.get(f"{u}/v1/inspections?limit=1").json()["total"] for u in urls]
        assert totals == [48, 48]
    finally:
        stop_servers(procs)

    log = open_log(pg_url)
    try:
        with log._transaction() as run:
            rows = run("SELECT id, part_id, verdict, score, image_sha256 FROM inspections", ())
            versions = run("SELECT version FROM schema_version", ())
    finally:
        log.close()
    assert sorted(rows) == sorted(acked)  # row count = acknowledged requests, each with its answer
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]  # migrated once by two replicas


def test_cli_serve_names_a_bad_database_url_in_one_line(service_model, tmp_path):
    from typer.testing import CliRunner

    from gaikan.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(service_model), "--api-key", "k", "--data-dir",
                                      str(tmp_path / "d"), "--db", "mongodb://u:pw@h/x"])
    assert result.exit_code == 2 and "--db mongodb://u@h/x: unknown database URL" in result.output
    assert len(result.output.strip().splitlines()) == 1
