"""Edge benchmark (issue 4, part A): PatchCore against PaDiM on the fixed ELPV split, and what the lean
options buy. Writes bench/results/edge.json and bench/results/edge.md.

    .venv/bin/python bench/edge.py                  # every run below (about 25 min on an idle 2-core box)
    .venv/bin/python bench/edge.py --only pc-mono-1,padim-mono-f32 --latency-runs 50

Runs (tags): PatchCore (stages 2+4, 224 px) on elpv:mono and elpv:poly at coreset fractions 1%, 5%, 10%
(float32 bank), and at 1% with a float16 bank; PaDiM (the library defaults) with float32 and float16
whitening matrices. Each measurement runs in a fresh subprocess, so each peak RSS is its own:

  fit phase:   torch.set_num_threads(2); load the split, fit on the `train` good rows (10% held out
               for the thresholds) -> fit seconds (PatchCore: features / coreset split too), peak RSS
               while fitting (VmHWM, read before anything is scored), model size on disk; then score
               the `test` rows -> image AUROC.
  score phase: a fresh process loads the saved model -> latency at batch 1 with
               torch.set_num_threads(1), from the decoded 300 x 300 8-bit cell to the score (median
               of --latency-runs after 5 warm-ups), throughput at batch 32 with 2 threads (median of 3),
               peak RSS while scoring.

JSON format (shared with bench/peer_anomalib.py, part B of issue 4; keep it stable):
  {"meta": {"machine", "python", "torch", "date", "protocol", "command"},
   "results": [ row, ... ]}
  row: {"tag": unique id, e.g. "pc-mono-1" / "padim-mono-f16" (a rerun replaces the row with its tag),
        "data": "elpv:mono" | "elpv:poly", "detector": "patchcore" | "padim", "runtime": "torch",
        "storage_dtype": "float32" | "float16", "coreset_fraction": float or null (PaDiM),
        "settings": the detector's settings, "n_train", "bank_size" (PatchCore; null for PaDiM),
        "image_auroc", "fit_seconds", "features_seconds", "coreset_seconds" (null for PaDiM),
        "fit_peak_rss_mb", "model_mb",
        "latency_ms_batch1_1thread", "throughput_img_s_batch32", "score_peak_rss_mb" (null when the
        row had no score phase),
        "onnx_latency_ms_batch1_1thread": null here; filled (or given in rows with "runtime": "onnx")
        by part B's scripts,
        "loadavg_1min": the machine's 1-minute load average when the row's fit started (this machine
        is shared: timings taken under load are slower than on an idle box)}
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
WORK = HERE / ".work" / "edge"

PATCHCORE = {"image_size": 224, "stages": [2, 4]}

# tag -> (detector, data kind, settings, run the score phase?)
RUNS = {
    "padim-mono-f32": ("padim", "mono", {}, True),
    "padim-mono-f16": ("padim", "mono", {"storage_dtype": "float16"}, True),
    "pc-mono-1": ("patchcore", "mono", {**PATCHCORE, "coreset_fraction": 0.01}, True),
    "pc-mono-1-f16": ("patchcore", "mono", {**PATCHCORE, "coreset_fraction": 0.01, "storage_dtype": "float16"}, True),
    "padim-poly-f32": ("padim", "poly", {}, False),
    "padim-poly-f16": ("padim", "poly", {"storage_dtype": "float16"}, False),
    "pc-poly-1": ("patchcore", "poly", {**PATCHCORE, "coreset_fraction": 0.01}, False),
    "pc-poly-1-f16": ("patchcore", "poly", {**PATCHCORE, "coreset_fraction": 0.01, "storage_dtype": "float16"}, False),
    "pc-mono-5": ("patchcore", "mono", {**PATCHCORE, "coreset_fraction": 0.05}, False),
    "pc-poly-5": ("patchcore", "poly", {**PATCHCORE, "coreset_fraction": 0.05}, False),
    "pc-mono-10": ("patchcore", "mono", {**PATCHCORE, "coreset_fraction": 0.10}, True),
    "pc-poly-10": ("patchcore", "poly", {**PATCHCORE, "coreset_fraction": 0.10}, False),
}


def phase_fit(tag: str) -> dict:
    import torch

    from gaikan.data import load_data
    from gaikan.evaluation.metrics import image_auroc
    from gaikan.pipeline import fit_detector, make_detector
    from gaikan.progress import set_quiet

    set_quiet(True)
    torch.set_num_threads(2)
    name, kind, settings, _ = RUNS[tag]
    split = load_data(f"elpv:{kind}")
    det = make_detector(name)
    for key, value in settings.items():
        setattr(det, key, tuple(value) if isinstance(value, list) else value)
    start = time.perf_counter()
    fit_detector(det, split)
    seconds = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    out = WORK / tag
    det.save(out, overwrite=True)
    parts = getattr(det, "fit_seconds_", {})
    auroc = image_auroc(split.test.labels, det.score(split.test.images).scores)
    return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in det.settings().items()},
            "n_train": det.fit_info_["n_train"],
            "bank_size": int(det.bank_.shape[0]) if hasattr(det, "bank_") else None,
            "image_auroc": auroc, "fit_seconds": seconds, "features_seconds": parts.get("features"),
            "coreset_seconds": parts.get("coreset"), "fit_peak_rss_mb": fit_rss, "model_mb": dir_size_mb(out)}


FRACTIONS = (0.01, 0.05, 0.10)


def phase_sweep(kind: str) -> list[dict]:
    """PatchCore at coreset fractions 1%, 5%, 10% from ONE feature extraction and ONE 10% greedy
    selection: k-center greedy is incremental (its first k picks are the size-k selection), so the
    1% and 5% banks are prefixes of the 10% one, identical to separate fits with the same seed. Fit
    time of a fraction = feature extraction + selection up to that fraction (threshold calibration
    not included). Same training rows as `fit` (the same seeded 10% of the goods held out)."""
    import numpy as np
    import torch

    from gaikan.data import load_data
    from gaikan.detectors.patchcore import PatchCore, greedy_coreset
    from gaikan.evaluation.metrics import image_auroc
    from gaikan.progress import set_quiet

    set_quiet(True)
    torch.set_num_threads(2)
    split = load_data(f"elpv:{kind}")
    det = PatchCore(image_size=PATCHCORE["image_size"], stages=tuple(PATCHCORE["stages"]))
    good = [img for img, lab in zip(split.train.images, split.train.labels) if lab == 0]
    n_val = int(round(0.1 * len(good)))
    val = np.sort(np.random.default_rng(det.seed).permutation(len(good))[:n_val])
    train = [good[i] for i in np.setdiff1d(np.arange(len(good)), val)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    features = det.patch_features(train)
    features_s = time.perf_counter() - start
    n = len(features)
    marks = {max(1, int(round(f * n))): f for f in FRACTIONS}
    reached: dict[float, float] = {}
    t0 = time.perf_counter()

    def progress(i: int) -> None:
        if i + 1 in marks:
            reached[marks[i + 1]] = time.perf_counter() - t0

    index = greedy_coreset(features, max(FRACTIONS), projection_dim=det.projection_dim, seed=det.seed,
                           progress=progress)
    fit_rss = peak_rss_mb()
    test_feats = [det._embed(split.test.images[i:i + 16]) for i in range(0, len(split.test), 16)]
    rows = []
    for size, frac in sorted(marks.items()):
        det.bank_ = features[index[:size]].clone()
        det._memory = None
        scores = torch.cat([det._maps_from_features(f)[1] for f in test_feats]).numpy()
        rows.append({"tag": f"sweep-{kind}-{round(100 * frac)}", "data": f"elpv:{kind}", "detector": "patchcore",
                     "runtime": "torch", "storage_dtype": "float32", "coreset_fraction": frac,
                     "loadavg_1min": load, "settings": {**PATCHCORE, "coreset_fraction": frac},
                     "n_train": len(train), "bank_size": size, "image_auroc": image_auroc(split.test.labels, scores),
                     "fit_seconds": features_s + reached[frac], "features_seconds": features_s,
                     "coreset_seconds": reached[frac], "fit_peak_rss_mb": fit_rss,
                     "model_mb": size * features.shape[1] * 4 / 1e6, "latency_ms_batch1_1thread": None,
                     "throughput_img_s_batch32": None, "score_peak_rss_mb": None,
                     "onnx_latency_ms_batch1_1thread": None, "method": "sweep (prefixes of one 10% selection)"})
    return rows


def phase_score(tag: str, latency_runs: int) -> dict:
    import torch

    from gaikan.data import load_data
    from gaikan.detectors.base import load_detector
    from gaikan.progress import set_quiet

    set_quiet(True)
    _, kind, _, _ = RUNS[tag]
    det = load_detector(WORK / tag)
    test = load_data(f"elpv:{kind}").test

    torch.set_num_threads(1)
    for i in range(5):
        det.score([test.images[i]])
    lat = []
    for i in range(latency_runs):
        img = [test.images[i % len(test.images)]]
        t = time.perf_counter()
        det.score(img)
        lat.append(time.perf_counter() - t)

    torch.set_num_threads(2)
    batch = test.images[:32]
    det.score(batch)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        det.score(batch)
        runs.append(time.perf_counter() - t)
    return {"latency_ms_batch1_1thread": 1000 * statistics.median(lat), "latency_runs": latency_runs,
            "throughput_img_s_batch32": len(batch) / statistics.median(runs), "score_peak_rss_mb": peak_rss_mb()}


def run_phase(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"phase {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def write_markdown(doc: dict) -> None:
    rows = sorted(doc["results"], key=lambda r: (r["data"], r["detector"], r.get("coreset_fraction") or 0,
                                                 r["storage_dtype"]))
    meta = doc["meta"]
    lines = [
        "# Edge benchmark: PatchCore and PaDiM on ELPV (issue 4)",
        "",
        f"{meta['machine']}, Python {meta['python']}, torch {meta['torch']}, {meta['date']}. {meta['protocol']}",
        "",
        f"Re-make: `{meta['command']}`",
        "",
        "| tag | data | detector | bank | coreset | image AUROC | fit s (features + coreset) | fit peak RSS MB "
        "| model MB | ms/img batch 1, 1 thread | img/s batch 32 | scoring peak RSS MB | onnxruntime ms/img | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = r.get("coreset_fraction")
        coreset = "–" if frac is None else f"{100 * frac:g}% ({r['bank_size']})"
        fit = fmt(r["fit_seconds"])
        if r.get("coreset_seconds") is not None:
            fit += f" ({r['features_seconds']:.1f} + {r['coreset_seconds']:.1f})"
        lines.append(
            f"| {r['tag']} | {r['data']} | {r['detector']} | {r['storage_dtype']} | "
            f"{coreset} | {r['image_auroc']:.4f} | {fit} | "
            f"{fmt(r['fit_peak_rss_mb'], 0)} | {fmt(r['model_mb'], 2)} | {fmt(r.get('latency_ms_batch1_1thread'))} | "
            f"{fmt(r.get('throughput_img_s_batch32'))} | {fmt(r.get('score_peak_rss_mb'), 0)} | "
            f"{fmt(r.get('onnx_latency_ms_batch1_1thread'))} | {fmt(r.get('loadavg_1min'))} |")
    lines += ["", "`load` is the machine's 1-minute load average when the fit started (2 cores shared with other "
              "jobs: above 2, every time in that row is inflated).", ""]
    (RESULTS / "edge.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated tags to (re)run; default: all")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--sweep", default="", help="comma-separated ELPV types (mono,poly) for the PatchCore "
                        "coreset-fraction sweep (1/5/10%% from one selection), run before the --only tags")
    parser.add_argument("--phase", choices=["fit", "score", "sweep"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "fit":
        print(json.dumps(phase_fit(args.tag)))
        return
    if args.phase == "score":
        print(json.dumps(phase_score(args.tag, args.latency_runs)))
        return
    if args.phase == "sweep":
        print(json.dumps(phase_sweep(args.kind)))
        return

    import torch

    sweeps = [k for k in args.sweep.split(",") if k]
    tags = [t for t in args.only.split(",") if t] or ([] if sweeps else list(RUNS))
    unknown = set(tags) - set(RUNS)
    if unknown:
        raise SystemExit(f"unknown tags {sorted(unknown)}; known: {', '.join(RUNS)}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "edge.json"
    doc = json.loads(path.read_text()) if path.exists() else {"results": []}
    doc["meta"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "python": platform.python_version(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "protocol": "Fixed ELPV split (fit on `train` good rows, 10% held out for thresholds; AUROC on `test` "
                    "rows); fit and batch-32 throughput with 2 torch threads, latency at batch 1 with 1 thread "
                    "(median after 5 warm-ups), each phase in its own process (peak RSS = VmHWM).",
        "command": "python bench/edge.py" + (f" --sweep {args.sweep}" if args.sweep else "")
                   + (f" --only {args.only}" if args.only else ""),
    }

    def save(rows: list[dict]) -> None:
        if path.exists():  # another run may have written rows meanwhile
            doc["results"] = json.loads(path.read_text())["results"]
        for row in rows:
            old = next((r for r in doc["results"] if r.get("tag") == row["tag"]), None)
            if old is not None:  # keep what other phases/scripts measured for this tag
                for key, value in old.items():
                    if row.get(key) is None and value is not None:
                        row[key] = value
            doc["results"] = [r for r in doc["results"] if r.get("tag") != row["tag"]] + [row]
        path.write_text(json.dumps(doc, indent=2) + "\n")
        write_markdown(doc)

    for kind in sweeps:
        print(f"[sweep {kind}] features + 10% greedy selection (load {os.getloadavg()[0]:.1f}) ...",
              file=sys.stderr, flush=True)
        rows = run_phase(["--phase", "sweep", "--kind", kind])
        save(rows)
        print(json.dumps(rows), file=sys.stderr, flush=True)
    for tag in tags:
        name, kind, settings, with_score = RUNS[tag]
        load = os.getloadavg()[0]
        print(f"[{tag}] fitting {name} on elpv:{kind} (load {load:.1f}) ...", file=sys.stderr, flush=True)
        row = {"tag": tag, "data": f"elpv:{kind}", "detector": name, "runtime": "torch",
               "storage_dtype": settings.get("storage_dtype", "float32"),
               "coreset_fraction": settings.get("coreset_fraction"), "loadavg_1min": load,
               "latency_ms_batch1_1thread": None, "throughput_img_s_batch32": None, "score_peak_rss_mb": None,
               "onnx_latency_ms_batch1_1thread": None}
        row.update(run_phase(["--phase", "fit", "--tag", tag]))
        if with_score:
            print(f"[{tag}] latency ...", file=sys.stderr, flush=True)
            row.update(run_phase(["--phase", "score", "--tag", tag, "--latency-runs", str(args.latency_runs)]))
        save([row])
        print(json.dumps(row), file=sys.stderr, flush=True)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
