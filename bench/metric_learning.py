"""ELPV benchmark of the metric-learning detectors (issue 3) against PaDiM, on identical rows.

    .venv/bin/python bench/metric_learning.py [--types mono,poly] [--only SUBSTRING,...] [--threads 1]

Every variant is fitted and evaluated through ``gaikan.compare.compare_detectors`` (what
``gaikan compare`` runs) with ``rows="supervised"``: all detectors are scored on the ``split_sup ==
test`` rows of shared/benchmarks/elpv_split.csv; PaDiM fits on the good ``train`` rows only, the
metric-learning detectors also learn from the ``split_sup == train`` defective cells (one class per
defect type; ELPV has one), the cnn-classifier is trained on OK/NG labels. 10% of the good training
cells are held out to calibrate each model's max-good threshold, at which accuracy is reported.

Results are merged into bench/results/metric_learning.json by variant label (so a partial run with
--only updates its rows and keeps the others) and the markdown table is rewritten from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
JSON_PATH = RESULTS / "metric_learning.json"
MD_PATH = RESULTS / "metric_learning.md"

# Settings chosen so that the whole benchmark (2 types x all variants) stays near 30 CPU-minutes on
# a 2-core machine: metric-learning nets at 64 px for 8 epochs; PaDiM and the cnn-classifier on
# the pretrained backbone at 224 px (the cnn-classifier without flip augmentation, whose features
# would cost 4 backbone passes per training image).
ML = "image_size=64,epochs=8"
VARIANTS = [
    "padim",
    f"siamese[net=mlp,{ML}]",
    f"siamese[net=cnn,{ML}]",
    f"triplet[net=cnn,loss=euclidean,anchor=random,{ML}]",
    f"triplet[net=cnn,loss=cosine,anchor=random,{ML}]",
    f"triplet[net=cnn,loss=euclidean,anchor=mean,{ML}]",
    f"triplet[net=cnn,loss=cosine,anchor=mean,{ML}]",
    f"classifier-embedding[net=cnn,{ML}]",
    "cnn-classifier[image_size=224,augment=false]",
    # the same with the RT-metric anomaly-degree image as input
    f"siamese[net=mlp,input=rt,{ML}]",
    f"siamese[net=cnn,input=rt,{ML}]",
    f"triplet[net=cnn,loss=euclidean,anchor=random,input=rt,{ML}]",
    f"triplet[net=cnn,loss=cosine,anchor=random,input=rt,{ML}]",
    f"triplet[net=cnn,loss=euclidean,anchor=mean,input=rt,{ML}]",
    f"triplet[net=cnn,loss=cosine,anchor=mean,input=rt,{ML}]",
    f"classifier-embedding[net=cnn,input=rt,{ML}]",
    "cnn-classifier[image_size=224,augment=false,input=rt]",
]
# run with --extra: can the metric learners close the gap to PaDiM with more resolution / pretrained nets?
EXTRA = [
    "triplet[net=cnn,loss=cosine,anchor=random,input=rt,image_size=128,epochs=8]",
    "classifier-embedding[net=cnn,input=rt,image_size=128,epochs=8]",
    "triplet[net=cnn,loss=cosine,anchor=random,image_size=128,epochs=8]",
    "triplet[net=efficientnet,loss=cosine,anchor=random,image_size=128,epochs=8]",
]


def load_results() -> dict:
    if JSON_PATH.exists():
        return json.loads(JSON_PATH.read_text())
    return {"results": {}}


def fmt(v, digits=4):
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_markdown(payload: dict) -> None:
    lines = [
        "# Metric-learning detectors vs PaDiM on ELPV (split_sup test rows)",
        "",
        f"{payload.get('machine', '')}. Written by `bench/metric_learning.py` (via `gaikan.compare`). "
        "All variants scored on the `split_sup == test` rows (mono: 176 good + 157 defective; poly: 276 + 201). "
        "PaDiM fits on the good `train` rows; siamese / triplet / classifier-embedding also learn from the "
        "`split_sup == train` defective cells (plus their good cells); cnn-classifier learns OK/NG from the same "
        "rows. Accuracy at each model's max-good threshold (calibrated on 10% held-out good cells). "
        f"fit s and ms/image (scoring at batch 64) with {payload.get('threads', '?')} torch thread(s) on a shared "
        "machine (other jobs running): compare within one run only. latency = median ms for one image at batch 1.",
        "",
        "Settings: PaDiM 224 px, stages (1, 2, 4), d = 100. Metric-learning nets (part A's detectors): 64 px gray input, 8 epochs, "
        "Adam 1e-3, batch 32, Mahalanobis (Ledoit-Wolf) to the good training embeddings; triplet margin = the "
        "loss's default (euclidean 1.0, cosine 0.4). cnn-classifier: frozen EfficientNet-Lite0 to stage 4 at "
        "224 px + 1x1 conv head (128) trained 40 epochs, no flip augmentation. `input=rt`: the RT-metric "
        "anomaly-degree image (window 8, stride 4) instead of the gray image. The last rows (128 px, "
        "`net=efficientnet`) are extra runs (`--extra`) asking whether more resolution or a pretrained net "
        "closes the gap to PaDiM.",
        "",
    ]
    for data in sorted({r["data"] for r in payload["results"].values()}):
        rows = [r for r in payload["results"].values() if r["data"] == data]
        order = VARIANTS + EXTRA
        rows.sort(key=lambda r: order.index(r["label"]) if r["label"] in order else 99)
        lines += [f"## {data}", "",
                  "| variant | image AUROC | accuracy | fit s | ms/image | latency ms | train images | test rows |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['label']} | failed: {r['error']} | | | | | | |")
                continue
            lines.append(f"| {r['label']} | {fmt(r['image_auroc'])} | {fmt(r['accuracy'], 3)} | "
                         f"{fmt(r['fit_seconds'], 1)} | {fmt(r['ms_per_image'], 1)} | {fmt(r.get('latency_ms'), 1)} | "
                         f"{r['n_train']} | {r['n_test']} |")
        lines.append("")
    MD_PATH.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="mono,poly")
    parser.add_argument("--only", default="", help="'|'-separated substrings: run only matching variants")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency-images", type=int, default=10)
    parser.add_argument("--extra", action="store_true", help="run the EXTRA variants instead of the main ones")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    if args.markdown_only:
        write_markdown(load_results())
        return

    import torch

    from gaikan.compare import compare_detectors, parse_variant
    from gaikan.detectors.base import detector_names
    from gaikan.progress import set_quiet

    torch.set_num_threads(args.threads)
    set_quiet(True)
    known = set(detector_names())
    chosen = [v for v in (EXTRA if args.extra else VARIANTS) if not args.only or any(s in v for s in args.only.split("|"))]
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = load_results()
    payload["machine"] = (f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                          f"{time.strftime('%Y-%m-%d')}")
    payload["threads"] = args.threads
    for kind in args.types.split(","):
        spec = f"elpv:{kind}"
        for label in chosen:
            variant = parse_variant(label)
            if variant.detector not in known:
                print(f"{spec} {label}: detector not available yet, skipped", flush=True)
                continue
            start = time.perf_counter()
            (row,) = compare_detectors(spec, [variant], rows="supervised", latency_images=args.latency_images)
            record = dict(row.__dict__, data=spec, wall_seconds=round(time.perf_counter() - start, 1))
            # re-read before writing: runs for other types may be writing the same file
            payload = {**load_results(), "machine": payload["machine"], "threads": args.threads}
            payload["results"][f"{spec} {label}"] = record
            JSON_PATH.write_text(json.dumps(payload, indent=2) + "\n")
            write_markdown(payload)
            status = row.error or f"AUROC {row.image_auroc:.4f} acc {row.accuracy:.3f} fit {row.fit_seconds:.1f}s"
            print(f"{spec} {label}: {status} ({record['wall_seconds']} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
