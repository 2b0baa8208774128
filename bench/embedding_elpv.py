"""Fit time and AUROC of single metric-learning detector variants on ELPV, through the pipeline.

    .venv/bin/python bench/embedding_elpv.py mono "triplet:" "triplet:loss=higher-order" "classifier-embedding:net=efficientnet"

Each argument after the type is ``NAME:k=v,k=v`` (options as ``gaikan fit --option``; empty = the
defaults). Data: ``load_split_for`` (ELPV ``split_sup``: the detectors also learn from the defective
training cells, one class), fit with 10 % of the good cells held out for the max-good threshold,
AUROC on the ``split_sup == test`` rows (the rows of bench/results/elpv.md's "split_sup test" column).
torch on one thread. Each result is appended as one JSON line to bench/results/embedding_elpv.jsonl;
bench/results/embedding_elpv.md is rewritten from all lines. (The issue-3 comparison table with
PaDiM and the cnn-classifier is bench/metric_learning.py.)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
JSONL = HERE / "results" / "embedding_elpv.jsonl"
MD = HERE / "results" / "embedding_elpv.md"


def run(kind: str, spec: str) -> dict:
    from gaikan import pipeline

    name, _, opts = spec.partition(":")
    options = dict(o.split("=", 1) for o in opts.split(",") if o)
    det = pipeline.make_detector(name, options)
    split = pipeline.load_split_for(det, f"elpv:{kind}")
    start = time.perf_counter()
    pipeline.fit_detector(det, split)
    fit_s = time.perf_counter() - start
    j = pipeline.evaluate_detector(det, split).to_json()
    return dict(spec=spec, kind=kind, fit_s=round(fit_s, 1), auroc=round(j["image_auroc"], 4), ms=j["ms_per_image"],
                info=det.train_info_, val=det.history_["val_loss"][-3:])


def write_md() -> None:
    rows = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
    lines = ["Metric-learning detector variants on ELPV (`split_sup` test rows), defaults unless stated: "
             "net=cnn, image_size=64, epochs=15, batch_size=32, lr=1e-3, Mahalanobis (Ledoit-Wolf). "
             "Fit seconds on the shared 2-core machine under load (load average 12-15), torch 1 thread: "
             "compare them with each other only.", "",
             "| data | variant | image AUROC | fit s | ms/img | negatives |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| elpv:{r['kind']} | `{r['spec']}` | {r['auroc']:.4f} | {r['fit_s']} | {r['ms']} | "
                     f"{r['info']['negatives']} ({r['info']['n_negative']}) |")
    MD.write_text("\n".join(lines) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    from gaikan.progress import set_quiet

    set_quiet(True)
    kind, specs = sys.argv[1], sys.argv[2:]
    JSONL.parent.mkdir(exist_ok=True)
    for spec in specs:
        row = run(kind, spec)
        row["machine"] = f"{platform.machine()}, {os.cpu_count()} cpus"
        with open(JSONL, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        write_md()


if __name__ == "__main__":
    main()
