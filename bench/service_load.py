"""Load benchmark of the inspection service (issue 5).

    .venv/bin/python bench/service_load.py [--model DIR] [--clients 8] [--per-client 200]

Starts `gaikan serve` as a subprocess on 127.0.0.1 (a free port, a fresh data directory, an API
key), then ``--clients`` threads each POST ``--per-client`` images to /v1/inspect one after the
other (a bounded load: clients x per-client requests in all), while one more thread polls /healthz
every 0.25 s to show whether the event loop stays responsive while the detector is busy.

Images: the ELPV mono test cells (300x300 grayscale PNG, as a line camera would send them), cycled.
Model: ``--model`` or, by default, PaDiM with its default settings fitted on elpv:mono (the
`gaikan demo` model), cached in bench/.work/service_model.

Records: throughput, client-side latency p50/p95/p99/max, server-side decode/score/render times,
errors (must be 0), /healthz latency under load, and that the SQLite log holds exactly one row per
acknowledged request (same ids, part ids and verdicts). Writes bench/results/service_load.json and
bench/results/service_load.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> Path:
    path = WORK / "service_model"
    if (path / "manifest.json").is_file():
        return path
    import torch

    from gaikan import pipeline

    torch.set_num_threads(2)
    det = pipeline.make_detector("padim")
    split = pipeline.load_split_for(det, "elpv:mono")
    pipeline.fit_detector(det, split)
    det.save(path, overwrite=True)
    return path


def test_pngs(n: int) -> list[bytes]:
    from PIL import Image

    from gaikan.data import load_data

    test = load_data("elpv:mono").test
    out = []
    for img in test.images[:n]:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server (OMP_NUM_THREADS)")
    args = ap.parse_args()

    import signal

    import httpx

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` / kill: still stop the server
    model = args.model or default_model()
    images = test_pngs(200)
    data_dir = WORK / "service_load_data"
    shutil.rmtree(data_dir, ignore_errors=True)
    key = secrets.token_hex(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GAIKAN_API_KEY": key, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen([sys.executable, "-m", "gaikan.cli", "serve", "--model", str(model), "--host",
                               "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t_start = time.time()
        while True:
            if server.poll() is not None:
                raise SystemExit(f"gaikan serve exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t_start > 120:
                raise SystemExit("gaikan serve did not start in 120 s")
            time.sleep(0.2)
        startup_s = time.time() - t_start

        # warm-up (not counted): first requests pay for lazy initialisation
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
            for i in range(3):
                c.post("/v1/inspect", files={"file": ("w.png", images[i], "image/png")}, data={"part_id": f"warm-{i}"})

        lock = threading.Lock()
        latencies: list[float] = []
        acked: dict[int, tuple[str, str]] = {}
        server_ms: dict[str, list[float]] = {"decode_ms": [], "queue_ms": [], "score_ms": [], "render_ms": [],
                                             "total_ms": []}
        errors: list[str] = []
        health_ms: list[float] = []
        done = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as c:
                for i in range(args.per_client):
                    part = f"c{k}-{i:04d}"
                    img = images[(k * 37 + i) % len(images)]
                    t0 = time.perf_counter()
                    try:
                        r = c.post("/v1/inspect", files={"file": ("cell.png", img, "image/png")},
                                   data={"part_id": part})
                    except httpx.HTTPError as exc:
                        with lock:
                            errors.append(f"{part}: {exc!r}")
                        continue
                    dt = 1000 * (time.perf_counter() - t0)
                    if r.status_code != 200:
                        with lock:
                            errors.append(f"{part}: HTTP {r.status_code} {r.text[:200]}")
                        continue
                    body = r.json()
                    with lock:
                        latencies.append(dt)
                        if body["id"] in acked:
                            errors.append(f"{part}: duplicate id {body['id']}")
                        acked[body["id"]] = (part, body["verdict"])
                        for name in server_ms:
                            server_ms[name].append(body["timing"][name])

        def health() -> None:
            with httpx.Client(base_url=url, timeout=30) as c:
                while not done.is_set():
                    t0 = time.perf_counter()
                    c.get("/healthz")
                    health_ms.append(1000 * (time.perf_counter() - t0))
                    done.wait(0.25)

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        hthread = threading.Thread(target=health, daemon=True)
        t0 = time.perf_counter()
        hthread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        done.set()
        hthread.join()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    db = sqlite3.connect(data_dir / "inspections.sqlite3")
    rows = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, part_id, verdict FROM inspections")
            if not (r[1] or "").startswith("warm-")}
    db.close()
    missing = [i for i, v in acked.items() if rows.get(i) != v]
    extra = [i for i in rows if i not in acked]
    n_req = args.clients * args.per_client
    manifest = json.loads((Path(model) / "manifest.json").read_text())
    result = {
        "benchmark": "service_load",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "2 CPU cores shared with other jobs; client threads run on the same machine"},
        "model": {"detector": manifest["detector"], "settings": manifest["settings"],
                  "input_size": manifest["input_size"], "data": manifest.get("fit", {}).get("data")},
        "images": "ELPV mono test cells, 300x300 grayscale PNG",
        "clients": args.clients, "per_client": args.per_client, "requests": n_req,
        "server_torch_threads": args.threads,
        "startup_s": round(startup_s, 2),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2),
        "latency_ms": {"p50": round(percentile(latencies, 50), 1), "p95": round(percentile(latencies, 95), 1),
                       "p99": round(percentile(latencies, 99), 1), "max": round(max(latencies, default=float("nan")), 1)},
        "server_ms_median": {k: round(percentile(v, 50), 2) for k, v in server_ms.items()},
        "healthz_ms_under_load": {"n": len(health_ms), "p50": round(percentile(health_ms, 50), 1),
                                  "p99": round(percentile(health_ms, 99), 1),
                                  "max": round(max(health_ms, default=float("nan")), 1)},
        "acknowledged": len(acked),
        "errors": len(errors),
        "error_examples": errors[:5],
        "log_rows": len(rows),
        "acknowledged_missing_from_log": len(missing),
        "log_rows_not_acknowledged": len(extra),
        "one_row_per_acknowledged_request": not missing and not extra and len(rows) == len(acked),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service_load.json").write_text(json.dumps(result, indent=2) + "\n")
    lat, srv, hz = result["latency_ms"], result["server_ms_median"], result["healthz_ms_under_load"]
    md = f"""# Inspection service under load

`bench/service_load.py`, {result['date']}: `gaikan serve` on 127.0.0.1 ({manifest['detector']},
input {'x'.join(map(str, manifest['input_size']))}, fitted on {result['model']['data']}), {args.clients} concurrent
clients x {args.per_client} uploads of 300x300 ELPV cells (PNG), server with {args.threads} torch threads, on a
machine with {os.cpu_count()} CPU cores shared with other work (clients on the same machine).

| requests | errors | throughput | latency p50 | p95 | p99 | max | log rows | one row per ack |
|---:|---:|---:|---:|---:|---:|---:|---:|:--:|
| {n_req} | {result['errors']} | {result['throughput_rps']} req/s | {lat['p50']} ms | {lat['p95']} ms | {lat['p99']} ms | {lat['max']} ms | {len(rows)} | {'yes' if result['one_row_per_acknowledged_request'] else 'NO'} |

Server-side medians per request: decode {srv['decode_ms']} ms, waiting for the detector {srv['queue_ms']} ms,
score {srv['score_ms']} ms, render (thumbnail, heat map, overlay PNGs) {srv['render_ms']} ms, total incl. logging
{srv['total_ms']} ms. The detector runs under a lock (one image at a time), so latency under load is mostly
queueing: about clients x the per-request service time, and throughput is about 1 / (score + render). `/healthz` while loaded: p50 {hz['p50']} ms, p99 {hz['p99']} ms, max {hz['max']} ms ({hz['n']} polls):
the event loop stays free while scoring runs in the threadpool. Start-up (model load) {result['startup_s']} s.
"""
    (RESULTS / "service_load.md").write_text(md)
    print(md)
    return 0 if result["errors"] == 0 and result["one_row_per_acknowledged_request"] else 1


if __name__ == "__main__":
    sys.exit(main())
