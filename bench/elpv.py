"""ELPV benchmark of gaikan's PaDiM (issue 2): accuracy and cost on the fixed split.

    .venv/bin/python bench/elpv.py [--types mono,poly] [--latency-runs 50]

For each module type, two fresh subprocesses (so each phase's peak RSS is its own):
  fit:   load the `train` rows, fit PaDiM (2 threads), save the model; seconds, peak RSS, model size.
  score: load the saved model, score the `test` rows (image AUROC, best F1, Spearman with the
         annotated probability over test + extra, AUROC on the split_sup test rows), throughput at
         batch 32 (2 threads).
  latency: a fresh process loads the model and scores one image file at a time, like a line
         scanner: latency at batch 1 with torch.set_num_threads(1) (median of N runs after 5
         warm-ups) and the process's peak RSS while scoring.
Writes bench/results/elpv.json and bench/results/elpv.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import dir_size_mb, peak_rss_mb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work"


def phase_fit(kind: str, settings: dict) -> dict:
    import torch

    from gaikan.data import load_data
    from gaikan.detectors.padim import PaDiM
    from gaikan.pipeline import fit_detector

    torch.set_num_threads(2)
    split = load_data(f"elpv:{kind}")
    det = PaDiM(**settings)
    start = time.perf_counter()
    fit_detector(det, split)
    seconds = time.perf_counter() - start
    out = WORK / f"padim-{kind}"
    det.save(out, overwrite=True)
    return {"fit_seconds": seconds, "fit_peak_rss_mb": peak_rss_mb(), "model_mb": dir_size_mb(out),
            "n_train": det.fit_info_["n_train"], "n_calibration": det.fit_info_["n_calibration"]}


def phase_score(kind: str) -> dict:
    import numpy as np
    import torch

    from gaikan.data import load_data
    from gaikan.detectors.base import load_detector
    from gaikan.evaluation.metrics import best_f1, image_auroc, spearman

    torch.set_num_threads(2)
    det = load_detector(WORK / f"padim-{kind}")
    split = load_data(f"elpv:{kind}")
    test = split.test
    scores = det.score(test.images).scores
    auroc = image_auroc(test.labels, scores)
    f1, _ = best_f1(test.labels, scores)
    extra_scores = det.score(split.extra.images).scores
    rho = spearman(np.r_[scores, extra_scores], np.r_[test.probabilities, split.extra.probabilities])
    sup = load_data(f"elpv:{kind}", supervised=True).test
    sup_auroc = image_auroc(sup.labels, det.score(sup.images).scores)

    batch = test.images[:32]
    det.score(batch)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        det.score(batch)
        runs.append(time.perf_counter() - t)
    throughput = len(batch) / statistics.median(runs)

    return {"image_auroc": auroc, "f1_max": f1, "spearman_probability": rho, "image_auroc_split_sup_test": sup_auroc,
            "n_test": len(test), "throughput_img_s_batch32_2threads": throughput}


def phase_latency(kind: str, latency_runs: int) -> dict:
    """Like a line scanner: a fresh process loads the model and scores one image file at a time."""
    import csv

    import torch

    from gaikan.data.datasets import elpv_data_dir
    from gaikan.data.images import read_image
    from gaikan.detectors.base import load_detector

    torch.set_num_threads(1)
    det = load_detector(WORK / f"padim-{kind}")
    split_csv = Path(__file__).resolve().parents[1] / "src/gaikan/data/elpv_split.csv"
    files = [r["file"] for r in csv.DictReader(open(split_csv)) if r["type"] == kind and r["split"] == "test"]
    paths = [elpv_data_dir() / f for f in files[:latency_runs]]
    for path in paths[:5]:
        det.score([read_image(path)])
    lat = []
    for path in paths:
        image = read_image(path)
        t = time.perf_counter()
        det.score([image])
        lat.append(time.perf_counter() - t)
    return {"latency_ms_batch1_1thread": 1000 * statistics.median(lat), "latency_runs": len(lat),
            "score_peak_rss_mb": peak_rss_mb()}


def run_phase(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"phase {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="mono,poly")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--phase", choices=["fit", "score", "latency"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help="PaDiM settings as JSON (default: the library defaults)")
    args = parser.parse_args()
    if args.phase == "fit":
        print(json.dumps(phase_fit(args.kind, json.loads(args.settings))))
        return
    if args.phase == "score":
        print(json.dumps(phase_score(args.kind)))
        return
    if args.phase == "latency":
        print(json.dumps(phase_latency(args.kind, args.latency_runs)))
        return

    from gaikan.detectors.padim import PaDiM

    settings = {**PaDiM().settings(), **json.loads(args.settings)}
    rows = []
    for kind in args.types.split(","):
        print(f"[elpv:{kind}] fitting ...", file=sys.stderr, flush=True)
        fit = run_phase(["--phase", "fit", "--kind", kind, "--settings", args.settings])
        print(f"[elpv:{kind}] scoring ...", file=sys.stderr, flush=True)
        score = run_phase(["--phase", "score", "--kind", kind])
        print(f"[elpv:{kind}] latency ...", file=sys.stderr, flush=True)
        latency = run_phase(["--phase", "latency", "--kind", kind, "--latency-runs", str(args.latency_runs)])
        rows.append({"data": f"elpv:{kind}", **fit, **score, **latency})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"detector": "padim", "settings": settings, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "protocol": "fit on `train` good rows (10% held out for thresholds), AUROC on `test` rows of "
                        "shared/benchmarks/elpv_split.csv; fit/throughput with 2 threads, latency with 1 thread"}
    (RESULTS / "elpv.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        f"PaDiM (EfficientNet-Lite0 stages {settings['stages']}, {settings['image_size']} px, d={settings['n_features']}),"
        f" {meta['machine']}, {meta['date']}. {meta['protocol']}.",
        "",
        "| data | image AUROC | AUROC (split_sup test) | best F1 | Spearman vs probability | fit s | fit peak RSS MB "
        "| img/s (batch 32) | ms/img (batch 1, 1 thread) | scoring peak RSS MB | model MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['image_auroc']:.4f} | {r['image_auroc_split_sup_test']:.4f} | {r['f1_max']:.4f} "
            f"| {r['spearman_probability']:.3f} | {r['fit_seconds']:.1f} | {r['fit_peak_rss_mb']:.0f} "
            f"| {r['throughput_img_s_batch32_2threads']:.1f} | {r['latency_ms_batch1_1thread']:.1f} "
            f"| {r['score_peak_rss_mb']:.0f} | {r['model_mb']:.1f} |")
    (RESULTS / "elpv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
