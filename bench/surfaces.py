"""The broad benchmark of real surfaces (issue 8): every detector setting on every category.

    .venv/bin/python bench/surfaces.py                              # every config on every category
    .venv/bin/python bench/surfaces.py --configs padim,auto --categories concrete,elpv-mono
    .venv/bin/python bench/surfaces.py --markdown-only

Categories: the textured surfaces built by bench/surfaces_data.py (real photographs and scans from
Debian packages, synthetic defects of two independent generators with masks; docs/surfaces.md) and
ELPV mono / poly with their real defects (fixed split, `test` rows, image level only). Each config is
fitted on the category's good training images through the library (as `gaikan fit` does: 10% of
them held out for the thresholds) and scored on its test images: image AUROC, pixel AUROC and AUPRO
(FPR <= 0.3, where there are masks), fit and scoring seconds. ``auto`` is `gaikan fit --detector auto`
(gaikan.pipeline.fit_auto): it sees the training images only.

Results accumulate in bench/results/surfaces.json by (category, config): a rerun of some replaces
those rows and keeps the others; the markdown table (bench/results/surfaces.md) is rewritten from the
JSON each time. Configs marked "today" are the defaults before issue 8 (same settings, spelled out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
JSON = RESULTS / "surfaces.json"

# label -> (detector or "auto", settings)
CONFIGS: dict[str, tuple[str, dict]] = {
    "padim (today's defaults)": ("padim", {"backbone": "lite0", "stages": (1, 2, 4), "n_features": 100,
                                           "gaussian": "per-position", "image_size": 224}),
    "patchcore (today's defaults)": ("patchcore", {"backbone": "lite0", "stages": (2, 4), "coreset_fraction": 0.1,
                                                   "coreset_chunk": 0, "coreset_sample": 0, "projection_dim": 128,
                                                   "image_size": 224}),
    "padim": ("padim", {}),
    "patchcore": ("patchcore", {}),
    "patchcore coreset_fraction=0.01 projection_dim=32": ("patchcore", {"coreset_fraction": 0.01,
                                                                        "projection_dim": 32}),
    "padim stages=1,2,3 n_features=144 image_size=256": ("padim", {"stages": (1, 2, 3), "n_features": 144,
                                                                   "image_size": 256}),
    "padim n_features=0": ("padim", {"n_features": 0}),
    "padim gaussian=shared n_features=0": ("padim", {"gaussian": "shared", "n_features": 0}),
    "padim gaussian=shared n_features=0 stages=1,2,3": ("padim", {"gaussian": "shared", "n_features": 0,
                                                                  "stages": (1, 2, 3)}),
    "padim backbone=lite1": ("padim", {"backbone": "lite1"}),
    "padim backbone=lite2": ("padim", {"backbone": "lite2"}),
    "patchcore stages=1,2,4": ("patchcore", {"stages": (1, 2, 4)}),
    "patchcore stages=1,2,4 coreset_fraction=0.01": ("patchcore", {"stages": (1, 2, 4), "coreset_fraction": 0.01}),
    "patchcore stages=1,2,4 coreset_fraction=0.005": ("patchcore", {"stages": (1, 2, 4), "coreset_fraction": 0.005}),
    "patchcore stages=1,2": ("patchcore", {"stages": (1, 2)}),
    "patchcore stages=2,3": ("patchcore", {"stages": (2, 3)}),
    "patchcore backbone=lite1": ("patchcore", {"backbone": "lite1"}),
    "patchcore backbone=lite2": ("patchcore", {"backbone": "lite2"}),
    "patchcore image_size=320": ("patchcore", {"image_size": 320}),
    "patchcore backbone=lite2 image_size=320 projection_dim=32": ("patchcore", {"backbone": "lite2", "image_size": 320,
                                                                                "projection_dim": 32}),
    "patchcore coreset_fraction=0.1": ("patchcore", {"coreset_fraction": 0.1}),
    "patch-metric": ("patch-metric", {}),
    "patch-metric coreset_fraction=0.02": ("patch-metric", {"coreset_fraction": 0.02}),
    "patch-metric init=rca epochs=0": ("patch-metric", {"init": "rca", "epochs": 0}),
    # PatchCore with patch-metric's memory settings: patch-metric without its adaptor (a control)
    "patchcore coreset_fraction=0.01 projection_dim=128 coreset_sample=524288": (
        "patchcore", {"coreset_fraction": 0.01, "projection_dim": 128, "coreset_sample": 524288}),
    "auto": ("auto", {}),
    "auto budget=10": ("auto", {"budget": 10.0}),
}
ELPV = {"elpv-mono": "elpv:mono", "elpv-poly": "elpv:poly"}


def category_specs(names: list[str] | None) -> dict[str, str]:
    from surfaces_data import DEFAULT_OUT, build_surfaces

    specs = {Path(s.split(":", 1)[1]).name: s for s in build_surfaces(Path(DEFAULT_OUT))}
    specs.update(ELPV)
    if names:
        unknown = set(names) - set(specs)
        if unknown:
            raise SystemExit(f"unknown categories {sorted(unknown)}; known: {', '.join(specs)}")
        specs = {k: v for k, v in specs.items() if k in names}
    return specs


def run_one(spec: str, config: str) -> dict:
    from gaikan.data import load_data
    from gaikan.detectors.base import get_detector_class
    from gaikan.pipeline import evaluate_detector, fit_auto, fit_detector

    name, settings = CONFIGS[config]
    split = load_data(spec)
    start = time.perf_counter()
    if name == "auto":
        det = fit_auto(split, **settings)
    else:
        det = get_detector_class(name)(**settings)
        fit_detector(det, split)
    fit_s = time.perf_counter() - start
    run = evaluate_detector(det, split)
    ev = run.to_json()
    row = {"image_auroc": round(ev["image_auroc"], 4),
           "pixel_auroc": None if ev["pixel_auroc"] is None else round(ev["pixel_auroc"], 4),
           "aupro": None if ev["aupro"] is None else round(ev["aupro"], 4),
           "fit_s": round(fit_s, 1), "score_s": round(run.seconds, 1), "detector": det.name,
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in det.settings().items()}}
    if name == "auto":
        sel = det.fit_info_["selection"]
        row["auto_chosen"] = sel["chosen"]
        row["auto_table"] = [{k: r[k] for k in ("label", "image_auroc", "pixel_auroc", "seconds", "score_ms", "status")}
                             for r in sel["rows"]]
    return row


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def write_markdown(results: dict) -> None:
    cats = [c for c in results["order"] if c in results["rows"]]
    surfaces = [c for c in cats if c not in ELPV]
    configs = [c for c in CONFIGS if any(c in results["rows"][cat] for cat in cats)]

    def cell(r):
        if r is None:
            return "–"
        parts = [f"{r['image_auroc']:.3f}"]
        if r.get("pixel_auroc") is not None:
            parts += [f"{r['pixel_auroc']:.3f}", f"{r['aupro']:.3f}"]
        return " / ".join(parts)

    meta = results["meta"]
    lines = ["# Surfaces benchmark (issue 8)", "",
             f"{meta.get('machine')}, torch {meta.get('torch')}; rows taken {meta.get('dates')}. "
             "Data: bench/surfaces_data.py (docs/surfaces.md: real textures from Debian packages, 128 px, 100 "
             "train goods, 30 test goods, 45 defective of 9 kinds x sizes each, two independent defect "
             "generators) and ELPV mono/poly (fixed split, `test` rows, real defects, no masks). Fit as "
             "`gaikan fit` does (10% of the goods held out for the thresholds); `auto` chose on the training "
             "goods only. Each cell: image AUROC / pixel AUROC / AUPRO (FPR <= 0.3); ELPV: image AUROC.", "",
             "| config | " + " | ".join(cats) + " | **mean surfaces** (image / pixel / AUPRO) |",
             "|---|" + "---|" * (len(cats) + 1)]
    for c in configs:
        rows = [results["rows"][cat].get(c) for cat in surfaces]
        complete = all(r is not None for r in rows)
        got = [r for r in rows if r is not None]
        mean = " / ".join("–" if _mean(got, k) is None else f"{_mean(got, k):.3f}"
                          for k in ("image_auroc", "pixel_auroc", "aupro"))
        if not complete:
            mean += f" ({len(got)} of {len(surfaces)})"
        lines.append(f"| {c} | " + " | ".join(cell(results["rows"][cat].get(c)) for cat in cats)
                     + f" | **{mean}** |")
    autos = [c for c in CONFIGS if CONFIGS[c][0] == "auto" and any(c in results["rows"][cat] for cat in cats)]
    if autos:
        def chosen(cat, c):
            r = results["rows"][cat].get(c)
            if r is None:
                return "– | –"
            pc = results["rows"][cat].get("patchcore")
            ratio = f" ({r['fit_s'] / pc['fit_s']:.1f}x)" if pc and pc.get("fit_s") else ""
            return f"{r['auto_chosen']} | {r['fit_s']}{ratio}"

        lines += ["", "What `auto` chose (by image AUROC on held-out goods + synthetic defects; its own table is in "
                  "each model's manifest), and its fit seconds, selection included (x the `patchcore` row's fit):", "",
                  "| category | " + " | ".join(f"{c}: chosen | fit s" for c in autos) + " |",
                  "|---|" + "---|---|" * len(autos)]
        lines += [f"| {cat} | " + " | ".join(chosen(cat, c) for c in autos) + " |" for cat in cats
                  if any(c in results["rows"][cat] for c in autos)]
    lines += ["", "Seconds (fit / scoring of the test set, 2 threads) per config, mean over the surfaces:", "",
              "| config | fit s | score s |", "|---|---|---|"]
    for c in configs:
        got = [results["rows"][cat][c] for cat in surfaces if c in results["rows"][cat]]
        if got:
            lines.append(f"| {c} | {_mean(got, 'fit_s'):.1f} | {_mean(got, 'score_s'):.1f} |")
    for note in meta.get("notes", []):
        lines += ["", note]
    (RESULTS / "surfaces.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="", help="comma-separated config labels (default: all)")
    parser.add_argument("--categories", default="", help="comma-separated categories (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", default="", help="a line for the markdown (e.g. the load)")
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--skip-done", action="store_true", help="keep rows already in the JSON")
    args = parser.parse_args()

    results = json.loads(JSON.read_text()) if JSON.is_file() else {"meta": {}, "rows": {}, "order": []}
    if not args.markdown_only:
        import torch

        from gaikan.progress import set_quiet

        set_quiet(True)
        torch.set_num_threads(args.threads)
        configs = [c.strip() for c in args.configs.split("|" if "|" in args.configs else ",") if c.strip()] \
            if args.configs else list(CONFIGS)
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown:
            raise SystemExit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
        specs = category_specs([c for c in args.categories.split(",") if c] or None)
        results["order"] = list(dict.fromkeys(results["order"] + list(specs)))
        meta = results["meta"]
        meta.update({"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
                     "python": platform.python_version()})
        meta.setdefault("dates", "")
        today = time.strftime("%Y-%m-%d")
        if today not in meta["dates"]:
            meta["dates"] = (meta["dates"] + ", " if meta["dates"] else "") + today
        if args.note:
            meta.setdefault("notes", []).append(args.note)
        for cat, spec in specs.items():
            for config in configs:
                if args.skip_done and config in results["rows"].get(cat, {}):
                    continue
                t = time.perf_counter()
                row = run_one(spec, config)
                row["loadavg"] = round(os.getloadavg()[0], 1)
                # re-read before writing: several runs (other categories) may share the file
                if JSON.is_file():
                    on_disk = json.loads(JSON.read_text())
                    results["rows"] = {**on_disk["rows"], **{c: {**on_disk["rows"].get(c, {}), **r}
                                                             for c, r in results["rows"].items()}}
                    results["order"] = list(dict.fromkeys(on_disk["order"] + results["order"]))
                results["rows"].setdefault(cat, {})[config] = row
                print(f"{cat:14s} {config:50s} {row['image_auroc']:.3f} {row.get('pixel_auroc')} {row.get('aupro')} "
                      f"({time.perf_counter() - t:.0f} s){' -> ' + row['auto_chosen'] if 'auto_chosen' in row else ''}",
                      flush=True)
                RESULTS.mkdir(exist_ok=True)
                JSON.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results)
    print((RESULTS / "surfaces.md").read_text())


if __name__ == "__main__":
    main()
