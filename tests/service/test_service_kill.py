"""`gaikan serve` as a real process: requests from several clients, SIGKILL in the middle of the
traffic, and every inspection a client got an answer for must be in the SQLite log afterwards, with
no half rows (integrity check, every row complete, every picture it names on disk with its hash)."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
from serve_process import free_port, wait_healthy
import pytest

KEY = "kill-test-key"


def start_server(model, data_dir, port):
    env = {**os.environ, "GAIKAN_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gaikan.cli", "serve", "--model", str(model), "--port", str(port),
                             "--data-dir", str(data_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def test_sigkill_loses_no_acknowledged_inspection(service_model, uploads, tmp_path):
    data_dir, port = tmp_path / "log", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(service_model, data_dir, port)
    acked: list[tuple[int, str, str]] = []  # (id, part id, verdict)
    errors_after_kill = []
    stop = threading.Event()
    images = uploads["good"] + uploads["defect"]

    def client(k: int) -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=30) as c:
            i = 0
            while not stop.is_set():
                part = f"c{k}-{i}"
                try:
                    r = c.post("/v1/inspect", files={"file": ("x.png", images[(k + i) % len(images)], "image/png")},
                               data={"part_id": part})
                except httpx.HTTPError as exc:  # the server died under us: not acknowledged
                    errors_after_kill.append(repr(exc))
                    return
                assert r.status_code == 200, r.text
                body = r.json()
                acked.append((body["id"], part, body["verdict"]))
                i += 1

    try:
        wait_healthy(url, proc)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(acked) < 24 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # while requests are in flight
        proc.wait(timeout=10)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 24, f"only {len(acked)} acknowledged before the deadline"
    db = sqlite3.connect(data_dir / "inspections.sqlite3")
    rows = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, part_id, verdict FROM inspections")}
    missing = [a for a in acked if rows.get(a[0]) != (a[1], a[2])]
    assert not missing, f"{len(missing)} acknowledged inspections are not in the log: {missing[:5]}"
    assert len(rows) >= len(acked)  # at most the in-flight ones were logged without an answer
    assert len({a[0] for a in acked}) == len(acked)
    # no half rows: the file is consistent, every row is complete and its pictures are on disk, whole
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for sha_image, ext, *shas in db.execute("SELECT image_sha256, image_ext, thumb_sha256, heatmap_sha256, "
                                            "overlay_sha256 FROM inspections"):
        for sha, suffix in [(sha_image, ext)] + [(s, ".png") for s in shas if s is not None]:
            blob = data_dir / "blobs" / sha[:2] / f"{sha}{suffix}"
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha, blob
    db.close()

    # and the service comes back on the same log
    port2 = free_port()
    proc2 = start_server(service_model, data_dir, port2)
    try:
        wait_healthy(f"http://127.0.0.1:{port2}", proc2)
        r = httpx.get(f"http://127.0.0.1:{port2}/v1/inspections", headers={"X-API-Key": KEY})
        assert r.json()["total"] == len(rows)
    finally:
        proc2.terminate()
        proc2.wait(timeout=20)
