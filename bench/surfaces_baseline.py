"""Sanity check of the surfaces benchmark (issue 8): today's default PaDiM and PatchCore on every
category built by bench/surfaces_data.py, through the library (gaikan.pipeline).

    python bench/surfaces_baseline.py [--out bench/.work/surfaces] [--detectors padim,patchcore]
                                      [--categories concrete,rust] [--threads 2]

Per category and detector: fit with the detector's defaults on train/good, evaluate on test/
(image AUROC, pixel AUROC, AUPRO at FPR <= 0.3), and the image AUROC per defect folder (each
defect folder's images against all test goods). Writes bench/results/surfaces_baseline.json and
bench/results/surfaces_baseline.md. This is a check that the set discriminates (neither all 1.0
nor all 0.5), not the benchmark itself (bench/surfaces.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from surfaces_data import CATEGORIES, DEFAULT_OUT, DEFECTS, build_surfaces  # noqa: E402

RESULTS = HERE / "results"


def run_one(spec: str, detector_name: str) -> dict:
    from gaikan.data import load_data
    from gaikan.evaluation.metrics import image_auroc
    from gaikan.pipeline import evaluate_detector, fit_detector, make_detector

    split = load_data(spec)
    det = make_detector(detector_name)
    start = time.perf_counter()
    fit_detector(det, split)
    fit_s = time.perf_counter() - start
    run = evaluate_detector(det, split)
    ev = run.to_json()
    types = np.array(split.test.defect_types)
    per_type = {}
    for t in sorted(set(types) - {"good"}):
        rows = (types == t) | (types == "good")
        per_type[str(t)] = round(float(image_auroc(run.labels[rows], run.scores[rows])), 4)
    return {"image_auroc": round(ev["image_auroc"], 4),
            "pixel_auroc": None if ev["pixel_auroc"] is None else round(ev["pixel_auroc"], 4),
            "aupro": None if ev["aupro"] is None else round(ev["aupro"], 4),
            "fit_s": round(fit_s, 1), "score_s": round(run.seconds, 1), "per_defect": per_type}


def write_markdown(results: dict, path: Path) -> None:
    dets = results["detectors"]
    cats = list(results["categories"])
    lines = ["# Surfaces benchmark: sanity check with today's defaults", "",
             f"Data: bench/surfaces_data.py (seed {results['seed']}), {len(cats)} categories measured, 128 px, "
             "100 train goods, 30 test goods, 45 defective (9 kinds x 5) each. Detectors with their "
             "defaults before issue 8 (gaikan at this branch's base; 224 px working size); "
             f"{results['threads']} torch threads, niced, on a shared 2-core machine under load from other jobs (times are indicative only; accuracy is not "
             "affected by load).", "",
             "Image AUROC / pixel AUROC / AUPRO (FPR <= 0.3); a category missing a detector was not "
             "run for it (the run was stopped for time):", "",
             "| category | " + " | ".join(dets) + " |", "|---|" + "---|" * len(dets)]
    for cat in cats:
        cells = []
        for d in dets:
            r = results["categories"][cat].get(d)
            cells.append("–" if r is None else f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f} / {r['aupro']:.3f}")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    means = []
    for d in dets:
        vals = [results["categories"][c][d] for c in cats if d in results["categories"][c]]
        means.append(" / ".join(f"{np.mean([v[k] for v in vals]):.3f}" for k in ("image_auroc", "pixel_auroc", "aupro")))
    lines.append("| **mean** | " + " | ".join(f"**{m}**" for m in means) + " |")
    kinds = sorted({k for c in cats for d in dets for k in results["categories"][c].get(d, {}).get("per_defect", {})})
    lines += ["", "Image AUROC per defect folder (that folder against all test goods), mean over categories:", "",
              "| defect | " + " | ".join(dets) + " |", "|---|" + "---|" * len(dets)]
    for k in kinds:
        cells = []
        for d in dets:
            vals = [results["categories"][c][d]["per_defect"][k] for c in cats if d in results["categories"][c]]
            cells.append(f"{np.mean(vals):.3f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "By generator (mean of the per-folder AUROCs above): a detector or selection tuned on "
              "gaikan.data.synthetic's defects has a home advantage on the gaikan.data.synthetic row only.", "",
              "| generator | " + " | ".join(dets) + " |", "|---|" + "---|" * len(dets)]
    for gen in sorted({k.generator for k, _ in DEFECTS}):
        folders = [k.folder for k, _ in DEFECTS if k.generator == gen]
        cells = []
        for d in dets:
            vals = [results["categories"][c][d]["per_defect"][f] for c in cats if d in results["categories"][c]
                    for f in folders if f in results["categories"][c][d]["per_defect"]]
            cells.append(f"{np.mean(vals):.3f}" if vals else "–")
        lines.append(f"| {gen} ({', '.join(folders)}) | " + " | ".join(cells) + " |")
    lines += ["", "Fit / scoring seconds per category: see surfaces_baseline.json.", ""]
    path.write_text("\n".join(lines), "utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detectors", default="padim,patchcore")
    parser.add_argument("--categories", default=",".join(c.name for c in CATEGORIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS / "surfaces_baseline.json")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args(argv)
    if args.markdown_only:
        write_markdown(json.loads(args.results.read_text("utf-8")), args.results.with_suffix(".md"))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    wanted = args.categories.split(",")
    cats = tuple(c for c in CATEGORIES if c.name in wanted)
    build_surfaces(args.out, args.seed)  # reuses a build of the same recipe
    specs = {c.name: f"mvtec:{args.out / c.name}" for c in cats}
    dets = args.detectors.split(",")
    results = {"seed": args.seed, "threads": args.threads, "detectors": dets, "machine": platform.machine(),
               "categories": {}}
    for name, spec in specs.items():
        results["categories"][name] = {}
        for d in dets:
            r = run_one(spec, d)
            results["categories"][name][d] = r
            print(f"{name:14s} {d:10s} image {r['image_auroc']:.3f} pixel {r['pixel_auroc']:.3f} "
                  f"aupro {r['aupro']:.3f} (fit {r['fit_s']} s) {r['per_defect']}", flush=True)
            # written after every result, so a stopped run keeps what it measured
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n", "utf-8")
    write_markdown(results, args.results.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
