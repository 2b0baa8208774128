"""Load benchmark of the inspection service (issues 5 and 9), with the raw onnxruntime reference.

    .venv/bin/python bench/service_load.py [--model DIR] [--clients 8] [--per-client 100] [--single 100]
                                           [--serve-arg=--max-batch=8 ...]

Starts `gaikan serve` as one subprocess on 127.0.0.1 (a free port, a fresh data directory, an API
key; default settings: onnxruntime, one scoring worker per core, micro-batching, lazy figures),
then

1. raw onnxruntime on the server's own exported model (``DATA_DIR/onnx/*.onnx``), in this process
   while the server is idle, on the same cores: the time of one prepared image in one intra-op
   thread (what a service worker does), and the throughput of the best of three set-ups (one
   session shared by one thread per core at batch 1 and at batch ``--raw-batch``, one session with
   all cores' intra-op threads at batch ``--raw-batch``), on already decoded and resized images:
   the graph's time only;
2. one client alone, ``--single`` uploads one after the other;
3. ``--clients`` threads each POSTing ``--per-client`` images one after the other (a bounded load),
   while one more thread polls /healthz every 0.25 s;
4. raw onnxruntime again (the load of the machine may have changed during the run; the reference
   is the mean of the two measurements).

Images: the ELPV mono test cells (300x300 grayscale PNG, as a line camera would send them), cycled.
Model: ``--model`` or, by default, PaDiM with its default settings fitted on elpv:mono (the
`gaikan demo` model), cached in bench/.work/service_model.

Records: throughput, client-side latency p50/p95/p99/max, server-side decode/queue/score/render
times and batch sizes, errors (must be 0), /healthz latency under load, that the SQLite log holds
exactly one row per acknowledged request (same ids, part ids and verdicts, model id and version on
every row), and the issue 9 targets. Writes bench/results/service_load.json and
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

# `gaikan serve` as a process: the helpers the service tests use (also imported by scale_service.py)
sys.path.insert(0, str(HERE.parent / "tests" / "service"))
from serve_process import free_port, stop_servers, wait_healthy  # noqa: E402


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


def test_pngs(n: int) -> tuple[list[bytes], list[np.ndarray]]:
    from PIL import Image

    from gaikan.data import load_data

    test = load_data("elpv:mono").test
    pngs, arrays = [], []
    for img in test.images[:n]:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        arrays.append(np.asarray(img))
    return pngs, arrays


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post_inspect(client, part: str, png: bytes, errors: list, lock) -> tuple[float, dict] | None:
    """POST one upload; (latency ms, answer) or None after appending the failure to ``errors``."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = client.post("/v1/inspect", files={"file": ("cell.png", png, "image/png")}, data={"part_id": part})
    except httpx.HTTPError as exc:
        with lock:
            errors.append(f"{part}: {exc!r}")
        return None
    dt = 1000 * (time.perf_counter() - t0)
    if r.status_code != 200:
        with lock:
            errors.append(f"{part}: HTTP {r.status_code} {r.text[:200]}")
        return None
    return dt, r.json()


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def raw_onnxruntime(onnx_path: Path, arrays: list[np.ndarray], *, cores: int, batch: int, seconds: float) -> dict:
    """The exported graph alone on prepared images: single-image time and the best throughput."""
    import onnxruntime as ort

    from gaikan.edge import EdgeScorer

    one = EdgeScorer(onnx_path, threads=1)
    prepared = one.prepare(arrays[:max(batch, 16)])
    # single image, 1 intra-op thread (what a service worker runs)
    for _ in range(5):
        one.score_prepared(prepared[:1])
    single = []
    for i in range(40):
        t0 = time.perf_counter()
        one.score_prepared(prepared[i % len(prepared):i % len(prepared) + 1])
        single.append(1000 * (time.perf_counter() - t0))

    def throughput(scorer, n_threads: int, b: int) -> float:
        count = [0] * n_threads
        stop = time.perf_counter() + seconds

        def work(k: int) -> None:  # at least 2 batches per thread, however loaded the machine is
            i = 0
            while time.perf_counter() < stop or i < 2:
                start = (i * b) % (len(prepared) - b + 1)
                scorer.score_prepared(prepared[start:start + b])
                count[k] += b
                i += 1

        for _ in range(2):
            scorer.score_prepared(prepared[:b])
        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(count) / (time.perf_counter() - t0)

    setups = {f"{cores} threads x 1 intra-op thread, batch 1": throughput(one, cores, 1),
              f"{cores} threads x 1 intra-op thread, batch {batch}": throughput(one, cores, batch)}
    all_cores = EdgeScorer(onnx_path, threads=cores)
    setups[f"1 thread x {cores} intra-op threads, batch {batch}"] = throughput(all_cores, 1, batch)
    del ort
    best = max(setups, key=setups.get)
    return {"single_image_ms_p50": round(percentile(single, 50), 2),
            "throughput_img_s": {k: round(v, 2) for k, v in setups.items()},
            "best_setup": best, "best_img_s": round(setups[best], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--name", default="service_load",
                    help="results file name under bench/results (e.g. service_load_patchcore for --model OTHER)")
    ap.add_argument("--per-client", type=int, default=100)
    ap.add_argument("--single", type=int, default=100, help="requests of the lone client")
    ap.add_argument("--raw-batch", type=int, default=8)
    ap.add_argument("--raw-seconds", type=float, default=8.0)
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `gaikan serve` argument (repeat)")
    ap.add_argument("--load-note", default="2 CPU cores shared with other jobs (benchmark run niced)",
                    help="how loaded the machine was, for the table")
    args = ap.parse_args()

    import signal

    import httpx

    from gaikan.service.scoring import available_cores

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` / kill: still stop the server
    cores = available_cores()
    model = args.model or default_model()
    images, arrays = test_pngs(200)
    data_dir = WORK / "service_load_data"
    shutil.rmtree(data_dir, ignore_errors=True)
    key = secrets.token_hex(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GAIKAN_API_KEY": key}
    load_before = os.getloadavg()[0]
    server = subprocess.Popen([sys.executable, "-m", "gaikan.cli", "serve", "--model", str(model), "--host",
                               "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir), *args.serve_arg],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    phases: dict[str, dict] = {}
    try:
        startup_s = wait_healthy(url, server, timeout=600.0, output=lambda: server.stderr.read().decode())
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
            served = c.get("/v1/models").json()["models"][0]
        onnx_files = sorted((data_dir / "onnx").glob("*.onnx"))
        if served["runtime"] != "onnx" or not onnx_files:
            raise SystemExit(f"the server does not run onnxruntime: {served['runtime_note']}")
        raw_before = raw_onnxruntime(onnx_files[0], arrays, cores=cores, batch=args.raw_batch,
                                     seconds=args.raw_seconds)

        # warm-up (not counted): first requests pay for lazy initialisation
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
            for i in range(5):
                c.post("/v1/inspect", files={"file": ("w.png", images[i], "image/png")}, data={"part_id": f"warm-{i}"})

        lock = threading.Lock()
        acked: dict[int, tuple[str, str, str, str]] = {}
        errors: list[str] = []

        def run_phase(label: str, n_clients: int, per_client: int) -> dict:
            latencies: list[float] = []
            server_ms: dict[str, list[float]] = {"decode_ms": [], "queue_ms": [], "score_ms": [], "render_ms": [],
                                                 "total_ms": [], "batch_size": []}
            health_ms: list[float] = []
            done = threading.Event()
            n_errors = len(errors)

            def client(k: int) -> None:
                with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as c:
                    for i in range(per_client):
                        part = f"{label}-c{k}-{i:04d}"
                        img = images[(k * 37 + i) % len(images)]
                        answer = post_inspect(c, part, img, errors, lock)
                        if answer is None:
                            continue
                        dt, body = answer
                        with lock:
                            latencies.append(dt)
                            if body["id"] in acked:
                                errors.append(f"{part}: duplicate id {body['id']}")
                            acked[body["id"]] = (part, body["verdict"], body["model_id"], body["model_version"])
                            for name in server_ms:
                                server_ms[name].append(body["timing"][name])

            def health() -> None:
                with httpx.Client(base_url=url, timeout=30) as c:
                    while not done.is_set():
                        t0 = time.perf_counter()
                        c.get("/healthz")
                        health_ms.append(1000 * (time.perf_counter() - t0))
                        done.wait(0.25)

            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(n_clients)]
            hthread = threading.Thread(target=health, daemon=True)
            cpu0 = (process_cpu_s(server.pid), time.process_time())
            t0 = time.perf_counter()
            hthread.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            cpu1 = (process_cpu_s(server.pid), time.process_time())
            done.set()
            hthread.join()
            return {"clients": n_clients, "per_client": per_client, "requests": n_clients * per_client,
                    "wall_s": round(wall, 2), "throughput_rps": round(len(latencies) / wall, 2),
                    "errors": len(errors) - n_errors,
                    "latency_ms": {"p50": round(percentile(latencies, 50), 1),
                                   "p95": round(percentile(latencies, 95), 1),
                                   "p99": round(percentile(latencies, 99), 1),
                                   "max": round(max(latencies, default=float("nan")), 1)},
                    "server_ms_median": {k: round(percentile(v, 50), 2) for k, v in server_ms.items()},
                    "batch_size_mean": round(float(np.mean(server_ms["batch_size"])), 2) if latencies else None,
                    "healthz_ms": {"n": len(health_ms), "p50": round(percentile(health_ms, 50), 1),
                                   "p99": round(percentile(health_ms, 99), 1)},
                    "load_avg_1min_after": round(os.getloadavg()[0], 2),
                    # CPU time per acknowledged request (user + system, all threads): the server process,
                    # and this process's client threads (httpx; plus the /healthz poller)
                    "cpu_ms_per_request": {
                        "server": round(1000 * (cpu1[0] - cpu0[0]) / max(1, len(latencies)), 2),
                        "clients": round(1000 * (cpu1[1] - cpu0[1]) / max(1, len(latencies)), 2)},
                    "cpu_cores_busy": round((cpu1[0] - cpu0[0] + cpu1[1] - cpu0[1]) / wall, 2)}

        phases["single"] = run_phase("single", 1, args.single)
        phases["loaded"] = run_phase("loaded", args.clients, args.per_client)
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
            metrics_text = c.get("/metrics").text
        raw_after = raw_onnxruntime(onnx_files[0], arrays, cores=cores, batch=args.raw_batch,
                                    seconds=args.raw_seconds)
    finally:
        stop_servers([server])

    db = sqlite3.connect(data_dir / "inspections.sqlite3")
    rows = {r[0]: tuple(r[1:]) for r in db.execute(
        "SELECT id, part_id, verdict, model_id, model_version FROM inspections")
        if not (r[1] or "").startswith("warm-")}
    db.close()
    missing = [i for i, v in acked.items() if rows.get(i) != v]
    extra = [i for i in rows if i not in acked]
    one_row = not missing and not extra and len(rows) == len(acked)
    manifest = json.loads((Path(model) / "manifest.json").read_text())
    raw_img_s = (raw_before["best_img_s"] + raw_after["best_img_s"]) / 2
    raw_single_ms = min(raw_before["single_image_ms_p50"], raw_after["single_image_ms_p50"])
    loaded, single = phases["loaded"], phases["single"]
    targets = {
        "throughput_ratio": round(loaded["throughput_rps"] / raw_img_s, 3),
        "throughput_ratio_ok": loaded["throughput_rps"] >= 0.6 * raw_img_s,
        "p99_ms": loaded["latency_ms"]["p99"], "p99_ok": loaded["latency_ms"]["p99"] <= 300,
        "single_p50_over_raw_single": round(single["latency_ms"]["p50"] / raw_single_ms, 2),
        "single_p50_ok": single["latency_ms"]["p50"] <= 2 * raw_single_ms,
        "errors_ok": len(errors) == 0, "one_row_per_ack_ok": one_row,
    }
    result = {
        "benchmark": "service_load",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "cores_used": cores, "platform": platform.platform(),
                    "python": platform.python_version(), "load_avg_1min_at_start": round(load_before, 2),
                    "note": args.load_note + "; client threads run on the same machine and cores"},
        "model": {"detector": manifest["detector"], "settings": manifest["settings"],
                  "input_size": manifest["input_size"], "data": manifest.get("fit", {}).get("data")},
        "server": {"args": args.serve_arg, "runtime": served["runtime"], "runtime_note": served["runtime_note"],
                   "workers": served["workers"], "max_batch": served["max_batch"],
                   "max_wait_ms": served["max_wait_ms"]},
        "images": "ELPV mono test cells, 300x300 grayscale PNG",
        "startup_s": round(startup_s, 2),
        "raw_onnxruntime": {"before": raw_before, "after": raw_after, "reference_img_s": round(raw_img_s, 2),
                            "reference_single_ms": raw_single_ms},
        "phases": phases,
        "acknowledged": len(acked), "errors": len(errors), "error_examples": errors[:5],
        "log_rows": len(rows), "acknowledged_missing_from_log": len(missing),
        "log_rows_not_acknowledged": len(extra), "one_row_per_acknowledged_request": one_row,
        "metrics_lines": len(metrics_text.splitlines()),
        "targets": targets,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    yes = {True: "yes", False: "**no**"}
    lat, srv = loaded["latency_ms"], loaded["server_ms_median"]
    slat = single["latency_ms"]
    raw_rows = "\n".join(f"| {k} | {raw_before['throughput_img_s'][k]} | {raw_after['throughput_img_s'][k]} |"
                         for k in raw_before["throughput_img_s"])
    md = f"""# Inspection service under load

`bench/service_load.py`, {result['date']}: one `gaikan serve` process on 127.0.0.1 ({manifest['detector']},
input {'x'.join(map(str, manifest['input_size']))}, fitted on {result['model']['data']}; {served['runtime_note']};
max batch {served['max_batch']}, max wait {served['max_wait_ms']:g} ms, lazy figures), uploads of 300x300 ELPV
cells (PNG). Machine: {os.cpu_count()} CPU cores, **{args.load_note}** (1-minute load average
{load_before:.1f} at the start, {loaded['load_avg_1min_after']} after the loaded phase); the clients run
on the same cores. Raw onnxruntime = the server's own exported model, in the benchmark process, on
prepared (decoded, resized) images: the graph alone.

| phase | requests | errors | throughput | p50 | p95 | p99 | max | mean batch |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| 1 client | {single['requests']} | {single['errors']} | {single['throughput_rps']} req/s | {slat['p50']} ms | {slat['p95']} ms | {slat['p99']} ms | {slat['max']} ms | {single['batch_size_mean']} |
| {args.clients} clients | {loaded['requests']} | {loaded['errors']} | {loaded['throughput_rps']} req/s | {lat['p50']} ms | {lat['p95']} ms | {lat['p99']} ms | {lat['max']} ms | {loaded['batch_size_mean']} |

Raw onnxruntime (img/s; single image on 1 intra-op thread: {raw_before['single_image_ms_p50']} ms before,
{raw_after['single_image_ms_p50']} ms after):

| set-up | before | after |
|---|---:|---:|
{raw_rows}

| issue 9 target | measured | met |
|---|---|:--:|
| {args.clients}-client throughput >= 0.6 x raw ({raw_img_s:.1f} img/s, best set-up, mean of before/after) | {loaded['throughput_rps']} req/s = {targets['throughput_ratio']} x | {yes[targets['throughput_ratio_ok']]} |
| p99 <= 300 ms at {args.clients} clients | {lat['p99']} ms | {yes[targets['p99_ok']]} |
| 1 client p50 <= 2 x raw single image ({raw_single_ms} ms) | {slat['p50']} ms = {targets['single_p50_over_raw_single']} x | {yes[targets['single_p50_ok']]} |
| 0 errors | {len(errors)} | {yes[targets['errors_ok']]} |
| exactly one log row per acknowledged request (id, part id, verdict, model id, version) | {len(rows)} rows, {len(acked)} acknowledged | {yes[targets['one_row_per_ack_ok']]} |

Server-side medians per request at {args.clients} clients: decode + prepare {srv['decode_ms']} ms, queue
{srv['queue_ms']} ms, score (the batch) {srv['score_ms']} ms, store {srv['render_ms']} ms, total incl. the
committed log row {srv['total_ms']} ms. `/healthz` while loaded: p50 {loaded['healthz_ms']['p50']} ms, p99
{loaded['healthz_ms']['p99']} ms. Start-up (model load + ONNX export + check) {result['startup_s']} s.
CPU per request at {args.clients} clients: server process {loaded['cpu_ms_per_request']['server']} ms, client
threads {loaded['cpu_ms_per_request']['clients']} ms ({loaded['cpu_cores_busy']} of {os.cpu_count()} cores busy); raw onnxruntime at
its best set-up needs {round(1000 * cores / raw_img_s, 2)} ms of CPU per image.

Re-run on an idle machine: `.venv/bin/python bench/service_load.py --load-note "idle machine"`.
"""
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)
    return 0 if result["errors"] == 0 and one_row else 1


if __name__ == "__main__":
    sys.exit(main())
