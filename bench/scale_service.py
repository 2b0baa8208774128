"""Service replicas on one PostgreSQL log under load (issue 10).

    .venv/bin/python bench/scale_service.py [--model DIR] [--replicas 2] [--clients 4] [--per-client 100]

Starts a throwaway PostgreSQL server (the Debian package's binaries, `gaikan.service.pgtemp`:
initdb + pg_ctl in a temp dir, default durability settings: fsync=on, synchronous_commit=on), then
``--replicas`` `gaikan serve --db postgresql://...` processes on different ports sharing that
database and one data directory (for the images), then ``--clients`` threads per replica that each
POST ``--per-client`` ELPV cells to their replica one after the other.

Checks what a load balancer in front of replicas needs: 0 errors, the log holds exactly the
acknowledged requests (row count = acknowledged, every acknowledged id with its part id and
verdict), ids unique across replicas, the schema migrated once although the replicas started
together. Also records throughput and latency per replica and overall, and, with the replicas
stopped, what one log row costs: the latency of one committed INSERT (PostgreSQL and, for
comparison, the SQLite log) and PostgreSQL's insert rate from 8 concurrent writers.
Writes bench/results/scale_service.json and .md.

Model: ``--model`` or the `gaikan demo` model (PaDiM, default settings, fitted on elpv:mono), cached
in bench/.work/service_model (shared with bench/service_load.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from service_load import (WORK, default_model, free_port, percentile, post_inspect, stop_servers,  # noqa: E402
                          test_pngs, wait_healthy)

RESULTS = HERE / "results"


def _row(i: int) -> dict:
    return dict(part_id=f"probe-{i}", image_sha256="a" * 64, image_ext=".png", image_width=300, image_height=300,
                thumb_sha256="b" * 64, heatmap_sha256="c" * 64, overlay_sha256="d" * 64, score=1.0 + i,
                verdict="OK", threshold=2.0, threshold_method="conformal", p_value=0.5, model_id="probe",
                model_checksum="e" * 64, timing_ms=1.0)


def insert_cost(url: str, rows: int = 200, writers: int = 8) -> dict:
    """Latency of one committed log row (1 writer), and the row rate of ``writers`` threads."""
    from gaikan.service.store import PostgresStore, open_log

    log = PostgresStore(url, pool_size=writers) if url.startswith("postgresql") else open_log(url)
    try:
        lat = []
        t0 = time.perf_counter()
        for i in range(rows):
            t = time.perf_counter()
            log.add(**_row(i))
            lat.append(1000 * (time.perf_counter() - t))
        one = rows / (time.perf_counter() - t0)
        out = {"rows": rows, "writers": writers,
               "latency_ms": {"p50": round(percentile(lat, 50), 2), "p99": round(percentile(lat, 99), 2)},
               "rows_per_s_1_writer": round(one, 1)}
        if writers > 1:
            def write(k: int) -> None:
                for i in range(rows // writers):
                    log.add(**_row(rows + k * rows + i))

            threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["rows_per_s_concurrent"] = round(writers * (rows // writers) / (time.perf_counter() - t0), 1)
        return out
    finally:
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients per replica")
    ap.add_argument("--per-client", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica (OMP_NUM_THREADS)")
    args = ap.parse_args()

    import httpx

    from gaikan.service.pgtemp import TempPostgres, missing_reason
    from gaikan.service.store import SCHEMA_VERSION, open_log

    reason = missing_reason()
    if reason:
        raise SystemExit(reason)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` / kill: still stop the servers
    model = args.model or default_model()
    images, _ = test_pngs(200)
    data_dir = WORK / "scale_service_data"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    key = secrets.token_hex(16)
    load_before = os.getloadavg()
    procs: list[subprocess.Popen] = []
    with TempPostgres() as pg:
        db = pg.create_database("gaikan")
        import psycopg

        with psycopg.connect(db) as conn:
            pg_settings = {name: conn.execute(f"SHOW {name}").fetchone()[0]
                           for name in ("server_version", "fsync", "synchronous_commit", "max_connections")}
        ports = [free_port() for _ in range(args.replicas)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        env = {**os.environ, "GAIKAN_API_KEY": key, "GAIKAN_DB": db, "OMP_NUM_THREADS": str(args.threads)}
        logs = [data_dir.parent / f"scale_service_replica{r}.log" for r in range(args.replicas)]
        try:
            t_start = time.time()
            for r, port in enumerate(ports):  # all at once: they migrate the fresh database together
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "gaikan.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                     "--port", str(port), "--data-dir", str(data_dir)],
                    env=env, stdout=subprocess.DEVNULL, stderr=open(logs[r], "wb")))
            for url, proc, log in zip(urls, procs, logs):
                wait_healthy(url, proc, timeout=300, output=log.read_text)
            startup_s = time.time() - t_start
            for r, url in enumerate(urls):  # warm-up, not counted
                with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as c:
                    for i in range(3):
                        c.post("/v1/inspect", files={"file": ("w.png", images[i], "image/png")},
                               data={"part_id": f"warm-{r}-{i}"})

            lock = threading.Lock()
            latencies: list[list[float]] = [[] for _ in urls]
            acked: dict[int, tuple[str, str]] = {}
            duplicate_acks: list[int] = []
            errors: list[str] = []
            finished = [0.0] * len(urls)

            def client(r: int, k: int) -> None:
                with httpx.Client(base_url=urls[r], headers={"X-API-Key": key}, timeout=300) as c:
                    for i in range(args.per_client):
                        part = f"r{r}-c{k}-{i:04d}"
                        img = images[(r * 101 + k * 37 + i) % len(images)]
                        answer = post_inspect(c, part, img, errors, lock)
                        if answer is None:
                            continue
                        dt, body = answer
                        with lock:
                            latencies[r].append(dt)
                            if body["id"] in acked:
                                duplicate_acks.append(body["id"])
                            acked[body["id"]] = (part, body["verdict"])
                            finished[r] = time.perf_counter()

            threads = [threading.Thread(target=client, args=(r, k), daemon=True)
                       for r in range(len(urls)) for k in range(args.clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
        finally:
            stop_servers(procs)
        load_after = os.getloadavg()

        log = open_log(db)
        try:
            with log._transaction() as run:
                rows = {r[0]: (r[1], r[2]) for r in run("SELECT id, part_id, verdict FROM inspections", ())
                        if not (r[1] or "").startswith("warm-")}
                n_rows, n_distinct = run("SELECT COUNT(*), COUNT(DISTINCT id) FROM inspections", ())[0]
                versions = [v for (v,) in run("SELECT version FROM schema_version ORDER BY version", ())]
        finally:
            log.close()
        inserts = {"postgresql": insert_cost(pg.create_database("probe")),
                   "sqlite": insert_cost(f"sqlite:///{data_dir / 'probe.sqlite3'}", writers=1)}

    missing = [i for i, v in acked.items() if rows.get(i) != v]
    extra = [i for i in rows if i not in acked]
    n_req = args.replicas * args.clients * args.per_client
    manifest = json.loads((Path(model) / "manifest.json").read_text())
    per_replica = [{"replica": r, "port": ports[r], "acknowledged": len(latencies[r]),
                    "throughput_rps": round(len(latencies[r]) / max(finished[r] - t0, 1e-9), 2),
                    "latency_ms": {q: round(percentile(latencies[r], v), 1)
                                   for q, v in (("p50", 50), ("p95", 95), ("p99", 99))}}
                   for r in range(args.replicas)]
    ok = (not errors and not duplicate_acks and not missing and not extra and len(rows) == len(acked) == n_req
          and n_rows == n_distinct and versions == list(range(1, SCHEMA_VERSION + 1)))
    result = {
        "benchmark": "scale_service",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "nice": os.nice(0), "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                    "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
                    "note": "replicas, PostgreSQL and the client threads all on the same machine, shared with "
                            "other jobs"},
        "postgresql": pg_settings,
        "model": {"detector": manifest["detector"], "settings": manifest["settings"],
                  "input_size": manifest["input_size"], "data": manifest.get("fit", {}).get("data")},
        "images": "ELPV mono test cells, 300x300 grayscale PNG",
        "replicas": args.replicas, "clients_per_replica": args.clients, "per_client": args.per_client,
        "requests": n_req, "torch_threads_per_replica": args.threads,
        "startup_s": round(startup_s, 2),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(acked) / wall, 2),
        "per_replica": per_replica,
        "log_insert": inserts,
        "acknowledged": len(acked),
        "errors": len(errors),
        "error_examples": errors[:5],
        "duplicate_ids_acknowledged": len(duplicate_acks),
        "log_rows": len(rows),
        "log_ids_unique": n_rows == n_distinct,
        "acknowledged_missing_from_log": len(missing),
        "log_rows_not_acknowledged": len(extra),
        "schema_versions_recorded": versions,
        "ok": ok,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale_service.json").write_text(json.dumps(result, indent=2) + "\n")
    replica_rows = "\n".join(
        f"| {p['replica']} | {args.clients} x {args.per_client} | {p['acknowledged']} | {p['throughput_rps']} req/s | "
        f"{p['latency_ms']['p50']} ms | {p['latency_ms']['p95']} ms | {p['latency_ms']['p99']} ms |"
        for p in per_replica)
    m = result["machine"]
    md = f"""# Service replicas on one PostgreSQL

`bench/scale_service.py`, {result['date']}: {args.replicas} `gaikan serve --db postgresql://...` replicas
({manifest['detector']}, default settings, input {'x'.join(map(str, manifest['input_size']))}, fitted on
{result['model']['data']}; {args.threads} torch thread each) sharing one PostgreSQL {pg_settings['server_version']}
(fsync={pg_settings['fsync']}, synchronous_commit={pg_settings['synchronous_commit']}) and one data directory;
{args.clients} clients per replica x {args.per_client} uploads of 300x300 ELPV cells (PNG) = {n_req} requests.
**Load:** everything (replicas, PostgreSQL, clients) on one machine with {m['cpus']} CPU cores shared with
other jobs; load average {m['loadavg_1_5_15_before'][0]} before, {m['loadavg_1_5_15_after'][0]} after; run with
nice {m['nice']}. The correctness counts do not depend on the load; the speeds do.

| requests | errors | acknowledged | log rows | ids unique | acked missing from log | rows not acked | schema migrated once |
|---:|---:|---:|---:|:--:|---:|---:|:--:|
| {n_req} | {result['errors']} | {len(acked)} | {len(rows)} | {'yes' if result['log_ids_unique'] and not duplicate_acks else 'NO'} | {len(missing)} | {len(extra)} | {'yes' if versions == list(range(1, SCHEMA_VERSION + 1)) else 'NO'} |

| replica | clients x uploads | acknowledged | throughput | latency p50 | p95 | p99 |
|---:|---:|---:|---:|---:|---:|---:|
{replica_rows}

All replicas together: {result['throughput_rps']} req/s over {result['wall_s']} s. Both replicas compete for
the same {m['cpus']} cores here, so this throughput is the machine's, not a replica's: scoring (not the log) is the
bottleneck. Start-up of both replicas (model load, schema migration) {result['startup_s']} s.

What one log row costs (measured after the replicas stopped, same machine and load; one row = one
committed INSERT ... RETURNING id, {inserts['postgresql']['rows']} rows):

| log | commit latency p50 | p99 | rows/s, 1 writer | rows/s, {inserts['postgresql']['writers']} writers |
|---|---:|---:|---:|---:|
| PostgreSQL (TCP on 127.0.0.1) | {inserts['postgresql']['latency_ms']['p50']} ms | {inserts['postgresql']['latency_ms']['p99']} ms | {inserts['postgresql']['rows_per_s_1_writer']} | {inserts['postgresql']['rows_per_s_concurrent']} |
| SQLite (WAL, synchronous=FULL) | {inserts['sqlite']['latency_ms']['p50']} ms | {inserts['sqlite']['latency_ms']['p99']} ms | {inserts['sqlite']['rows_per_s_1_writer']} | (one file, one writer) |
"""
    (RESULTS / "scale_service.md").write_text(md)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
