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

``--patch`` (issue 11) runs the patch-level comparison instead: patch-metric vs PatchCore vs PaDiM vs
cnn-classifier in two protocols, into bench/results/patch_metric.{json,md}:

* ``good-only``: the fixed split (``split`` column): fit on the good ``train`` rows, AUROC on the
  ``test`` rows; patch-metric learns from synthetic defects only.
* ``split_sup``: the supervised rows (as above); patch-metric also takes the ``split_sup == train``
  defective cells as negatives, cnn-classifier learns OK/NG from them, PatchCore / PaDiM use the goods.

The backbone features of every image are computed once per process and kept on disk under
bench/.work/features/ (keyed by the SHA-1 of the backbone's input tensor and the stages), so the
variants of one type share them; the numbers are those of the uncached detectors.
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


# ---- issue 11: patch-level metric learning ---------------------------------------------------------
PATCH_JSON = RESULTS / "patch_metric.json"
PATCH_MD = RESULTS / "patch_metric.md"
CACHE_DIR = HERE / ".work" / "features"
PATCH_VARIANTS = [  # (protocol, variant)
    ("good-only", "patchcore"),
    ("good-only", "patch-metric"),
    ("split_sup", "patchcore"),
    ("split_sup", "patch-metric"),
    ("split_sup", "cnn-classifier[image_size=224,augment=false]"),
    ("good-only", "padim"),
    ("split_sup", "padim"),
]
PROTOCOLS = ("good-only", "split_sup")


def cached_extractor(extractor, stages, backbone: str = "lite0"):
    """Wrap a FeatureExtractor so that each image's taps are computed once (memory + disk cache)."""
    import hashlib

    import numpy as np
    import torch

    key = "-".join(str(s) for s in stages) + ("" if backbone == "lite0" else f"-{backbone}")
    folder = CACHE_DIR / key
    folder.mkdir(parents=True, exist_ok=True)
    memo: dict = cached_extractor.__dict__.setdefault("memo", {})

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = extractor

        @property
        def channels(self):
            return self.inner.channels

        @property
        def strides(self):
            return self.inner.strides

        def forward(self, x):
            rows = x.detach().contiguous().numpy()
            names = [f"{key}/" + hashlib.sha1(r.tobytes()).hexdigest() for r in rows]
            missing = []
            for i, name in enumerate(names):
                if name not in memo:
                    path = CACHE_DIR / f"{name}.npz"
                    if path.exists():
                        with np.load(path, allow_pickle=False) as f:
                            memo[name] = [torch.from_numpy(f[f"t{t}"]) for t in range(len(stages))]
                    else:
                        missing.append(i)
            if missing:
                with torch.no_grad():
                    taps = self.inner(x[missing])
                for j, i in enumerate(missing):
                    memo[names[i]] = [t[j].contiguous() for t in taps]
                    np.savez(CACHE_DIR / f"{names[i]}.npz", **{f"t{t}": v[j].numpy() for t, v in enumerate(taps)})
            return [torch.stack([memo[n][t] for n in names]) for t in range(len(stages))]

    return Cached()


def attach_cache(det) -> None:
    """Give detectors with a lazily built ``_extractor`` the cached one (same taps, same numbers).
    patch-metric with a tuned head runs the backbone in two parts (trunk, then the frozen and the
    tuned rest), which the cache of whole passes cannot serve: it runs uncached."""
    if getattr(det, "tuned", False):
        return
    if hasattr(det, "_extractor") and hasattr(det, "extractor"):
        from gaikan.backbones.features import FeatureExtractor

        stages = tuple(det.stages) if hasattr(det, "stages") else (det.stage,)
        backbone = getattr(det, "backbone", "lite0")
        det._extractor = cached_extractor(FeatureExtractor(stages, backbone), stages, backbone)


def run_patch_variant(spec: str, protocol: str, label: str, latency_images: int) -> dict:
    """Fit and evaluate one variant in one protocol; the row fields of gaikan.compare.CompareRow."""
    from gaikan import pipeline
    from gaikan.compare import _latency_ms, parse_variant
    from gaikan.data.datasets import load_data
    from gaikan.errors import GaikanError

    from gaikan.detectors.base import load_detector

    variant = parse_variant(label)
    det = variant.make()
    attach_cache(det)
    split = load_data(spec, supervised=protocol == "split_sup")
    row = {"label": label, "protocol": protocol, "data": spec, "error": ""}
    # good-only detectors fit on the same good cells with the same seed in both protocols: the same
    # model, so the second protocol reloads the first one's (its fit s are the first fit's)
    same_model = not (det.supervised or getattr(det, "uses_defects", False))
    saved = HERE / ".work" / "models" / "".join(c if c.isalnum() or c in "-_=." else "_" for c in f"{spec}-{label}")
    try:
        start = time.perf_counter()
        if same_model and (saved / "manifest.json").exists():
            det = load_detector(saved)
            attach_cache(det)
            row["fit_seconds"] = det.fit_info_.get("seconds")
            row["model_reused"] = True
        else:
            pipeline.fit_detector(det, split)
            row["fit_seconds"] = round(time.perf_counter() - start, 2)
            det.fit_info_["seconds"] = row["fit_seconds"]
            if same_model:
                det.save(saved, overwrite=True)
        run = pipeline.evaluate_detector(det, split)
        out = run.to_json()
        row.update(image_auroc=out["image_auroc"], accuracy=out["confusion"].get("accuracy"),
                   ms_per_image=out["ms_per_image"], n_train=int(det.fit_info_["n_train"]),
                   n_train_defective=int(det.fit_info_.get("n_train_defective", 0)), n_test=int(out["n_images"]),
                   fit_parts={k: round(v, 2) for k, v in getattr(det, "fit_seconds_", {}).items()},
                   history={k: [round(x, 5) for x in v] for k, v in (getattr(det, "history_", None) or {}).items()})
        if "fusion" in det.fit_info_:  # patch-metric's supervised head: the distance's weight and its CV
            row["fusion"] = det.fit_info_["fusion"]
        if latency_images:
            row["latency_ms"] = round(_latency_ms(det, split.test.images, latency_images), 2)
    except GaikanError as exc:
        row["error"] = str(exc)
    return row


#: ``fusion.chosen_by`` of the rows fitted before the cross-validation fitted whole fold models
EARLIER_CV = "2-fold cross-validation"


def write_patch_markdown(payload: dict) -> None:
    lines = [
        "# patch-metric vs PatchCore, PaDiM and cnn-classifier on ELPV (issue 11)",
        "",
        f"{payload.get('machine', '')}. Written by `bench/metric_learning.py --patch`. Two protocols: "
        "**good-only** = the fixed split (fit on the good `train` cells, AUROC on the `test` rows: mono 176 good + "
        "313 defective, poly 276 + 402); **split_sup** = the supervised rows (fit on the `split_sup == train` "
        "cells: goods, plus the defective ones for patch-metric (as negative patches) and cnn-classifier; AUROC on "
        "the `split_sup == test` rows: mono 176 + 157, poly 276 + 201). The good training cells are the same 412 "
        "(mono) / 644 (poly) in both protocols; 10% of them are held out for the max-good threshold (accuracy). "
        "fit s and ms/image with the torch threads and under the 1-minute load average of each row (columns "
        "threads / load; rows without them: 1 thread, load average 15-33 from other jobs): seconds compare "
        "within rows of equal threads and similar load only. Backbone features are cached across the variants of one type "
        "(bench/.work/features): the first variant to see an image pays its backbone pass, later ones read it. "
        "supervised head: patch-metric's head on the labelled defect cells (docs/patch_metric.md), with the "
        "distance's weight its cross-validation chose; rows marked 'none (before it)' were fitted before the head "
        "existed (it is trained by default whenever defective cells are given); 'earlier cross-validation' "
        "(and 'not recorded'): the weight was chosen by the rule before 2026-12-02, whose folds shared the final "
        "adaptor, trained on the very defect cells they held out (docs/patch_metric.md, \"Fusion\").",
        "",
    ]
    for data in sorted({r["data"] for r in payload["results"].values()}):
        rows = [r for r in payload["results"].values() if r["data"] == data]
        order = [f"{p} {v}" for p, v in PATCH_VARIANTS]
        rows.sort(key=lambda r: (PROTOCOLS.index(r["protocol"]),
                                 order.index(f"{r['protocol']} {r['label']}") if f"{r['protocol']} {r['label']}" in order else 99,
                                 r["label"]))
        lines += [f"## {data}", "",
                  "| protocol | variant | image AUROC | accuracy | fit s | ms/image | train (defective) | test rows "
                  "| threads | load | supervised head |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['protocol']} | {r['label']} | failed: {r['error']} | | | | | | | | |")
                continue
            head = (f"yes, distance weight {r['fusion']['distance_weight']}" if "fusion" in r
                    else r.get("head_note", ""))
            if "fusion" in r and r["fusion"].get("chosen_by") == EARLIER_CV:
                head += " (earlier cross-validation)"
            lines.append(f"| {r['protocol']} | {r['label']} | {fmt(r['image_auroc'])} | {fmt(r['accuracy'], 3)} | "
                         f"{fmt(r['fit_seconds'], 1)} | {fmt(r['ms_per_image'], 1)} | "
                         f"{r['n_train']} ({r.get('n_train_defective', 0)}) | {r['n_test']} | "
                         f"{r.get('threads', 1)} | {r.get('loadavg', '15-33')} | {head} |")
        lines.append("")
    PATCH_MD.write_text("\n".join(lines))


def main_patch(args) -> None:
    import torch

    from gaikan.progress import set_quiet

    torch.set_num_threads(args.threads)
    set_quiet(True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    extra = [tuple(item.split(" ", 1)) for item in args.variant]
    chosen = [(p, v) for p, v in PATCH_VARIANTS
              if not args.only or any(s in f"{p} {v}" for s in args.only.split("|"))] + extra
    machine = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    for kind in args.types.split(","):
        spec = f"elpv:{kind}"
        for protocol, label in chosen:
            if protocol not in PROTOCOLS:
                raise SystemExit(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
            start = time.perf_counter()
            row = run_patch_variant(spec, protocol, label, args.latency_images)
            row["wall_seconds"] = round(time.perf_counter() - start, 1)
            row["threads"], row["loadavg"] = args.threads, round(os.getloadavg()[0], 1)
            payload = json.loads(PATCH_JSON.read_text()) if PATCH_JSON.exists() else {"results": {}}
            payload.update(machine=machine, threads=args.threads)
            payload["results"][f"{spec} {protocol} {label}"] = row
            PATCH_JSON.write_text(json.dumps(payload, indent=2) + "\n")
            write_patch_markdown(payload)
            status = row["error"] or f"AUROC {row['image_auroc']:.4f} fit {row['fit_seconds']:.1f}s"
            print(f"{spec} {protocol} {label}: {status} ({row['wall_seconds']} s)", flush=True)


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
    parser.add_argument("--only", default="", help="'|'-separated substrings: run only matching variants (with --patch: of 'PROTOCOL VARIANT')")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency-images", type=int, default=10)
    parser.add_argument("--extra", action="store_true", help="run the EXTRA variants instead of the main ones")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown from the JSON")
    parser.add_argument("--patch", action="store_true", help="the patch-level comparison of issue 11 (patch_metric.md)")
    parser.add_argument("--variant", action="append", default=[],
                        help="with --patch: an extra 'PROTOCOL VARIANT' to run (e.g. 'good-only patch-metric[loss=hypersphere]')")
    args = parser.parse_args()
    if args.markdown_only:
        write_markdown(load_results())
        if PATCH_JSON.exists():
            write_patch_markdown(json.loads(PATCH_JSON.read_text()))
        return
    if args.patch:
        return main_patch(args)

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
