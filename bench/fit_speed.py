"""Fit cost and speed at the defaults (issue 8, item 4): PatchCore beside PaDiM on elpv:mono, in one run.

    .venv/bin/python bench/fit_speed.py            # about 8 min on an idle 2-core machine
    .venv/bin/python bench/fit_speed.py --exact-up-to 4   # also the exact selection at 4x (+5 min)

Writes bench/results/fit_speed.json and bench/results/fit_speed.md. Steps, all in this one process,
one after the other (nothing else should run on the machine):

1. PaDiM and PatchCore with the library defaults: fit on the `train` good rows of elpv:mono (10% held
   out for the thresholds) with 2 threads (what a user gets) and again with 1 thread; fit seconds
   (PatchCore: features / coreset split), image AUROC on the `test` rows.
2. PatchCore with the default coreset fraction but the exact (quadratic) selection over all patches
   (coreset_sample=0): its AUROC beside the default pre-sampled selection's, and the selection
   seconds of both.
3. Coreset selection seconds at 1x, 2x and 4x the patch count (1x: the default features of every
   training cell; 2x, 4x: plus copies of them with a little noise), the default (greedy on a random
   pre-sample of coreset_sample patches) against exact, 1 thread.
4. Latency at batch 1 with 1 thread through onnxruntime (gaikan.edge) of both exported models,
   median of 50 after 5 warm-ups, from the decoded 300x300 cell.
5. Nearest-neighbour search over the default bank for one image's patches: our exact chunked search
   (torch) against faiss-cpu IndexFlatL2 (exact) and IndexHNSWFlat (approximate), 1 thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "fit_speed"


def _median_ms(fn, items, warmup=5):
    for item in items[:warmup]:
        fn(item)
    times = []
    for item in items[warmup:]:
        t = time.perf_counter()
        fn(item)
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="elpv:mono")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--exact-up-to", type=int, default=2, choices=(1, 2, 4),
                        help="time the exact (quadratic) selection up to this multiple of the patches "
                             "(4: about 5 more minutes)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from gaikan.data import load_data
    from gaikan.detectors.padim import PaDiM
    from gaikan.detectors.patchcore import MemoryBank, PatchCore, greedy_coreset
    from gaikan.edge import EdgeScorer
    from gaikan.evaluation.metrics import image_auroc
    from gaikan.export.onnx_export import export_onnx
    from gaikan.progress import set_quiet

    set_quiet(True)
    WORK.mkdir(parents=True, exist_ok=True)
    split = load_data(args.data)
    train, test = split.train.images, split.test
    rows, notes = [], []
    load0 = os.getloadavg()[0]

    def fit_row(label, det, threads):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        det.fit(train)
        seconds = time.perf_counter() - t
        torch.set_num_threads(2)
        auroc = image_auroc(test.labels, det.score(test.images).scores)
        row = {"label": label, "detector": det.name, "threads": threads, "fit_s": round(seconds, 2),
               "image_auroc": round(float(auroc), 4), "settings": det.settings()}
        if hasattr(det, "fit_seconds_"):
            row.update({k + "_s": round(v, 2) for k, v in det.fit_seconds_.items()})
            row["bank_size"] = int(det.bank_.shape[0])
            row["n_patches"] = int(det.n_patches_)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
        return det

    # 1. defaults, 2 threads then 1 thread
    padim = fit_row("padim (defaults)", PaDiM(), 2)
    patchcore = fit_row("patchcore (defaults)", PatchCore(), 2)
    fit_row("padim (defaults)", PaDiM(), 1)
    fit_row("patchcore (defaults)", PatchCore(), 1)
    # 2. exact selection at the same fraction
    fit_row("patchcore (defaults, exact selection: coreset_sample=0)", PatchCore(coreset_sample=0), 2)

    # 3. selection cost against the patch count: the default features of every training cell (1x),
    # and 2x / 4x as many (copies of them with a little noise: the same distribution, more patches)
    torch.set_num_threads(1)
    features = PatchCore().patch_features(train)  # the default features, (N * h * w, D)
    n_img = len(train)
    per_image = features.shape[0] // n_img
    scaling = []
    fraction, sample = PatchCore().coreset_fraction, PatchCore().coreset_sample
    gen = torch.Generator().manual_seed(0)
    for times in (1, 2, 4):
        sub = torch.cat([features] + [features + 0.01 * torch.randn(features.shape, generator=gen)
                                      for _ in range(times - 1)])
        entry = {"times": times, "patches": int(sub.shape[0])}
        for name, k in (("default", sample), ("exact", 0)):
            if name == "exact" and times > args.exact_up_to:
                continue
            t = time.perf_counter()
            greedy_coreset(sub, fraction, sample=k, projection_dim=PatchCore().projection_dim)
            entry[f"{name}_s"] = round(time.perf_counter() - t, 2)
        scaling.append(entry)
        print(json.dumps(entry), flush=True)
        del sub

    # 4. onnxruntime latency, batch 1, 1 thread
    latency = {}
    cells = [np.asarray(img) for img in test.images[: args.latency_runs + 5]]
    for name, det in (("padim", padim), ("patchcore", patchcore)):
        path = export_onnx(det, WORK / f"{name}.onnx", force=True)
        scorer = EdgeScorer(path, threads=1)
        latency[name] = {"onnx_ms_batch1_1thread": round(_median_ms(lambda c: scorer.score([c]), cells), 2),
                         "onnx_mb": round(path.stat().st_size / 1e6, 1)}
        print(name, latency[name], flush=True)

    # 5. nearest-neighbour search over the default bank
    nn = {}
    bank = patchcore.bank_
    queries = features[:per_image].float()
    memory = MemoryBank(bank)
    nn["torch_exact_ms"] = round(_median_ms(lambda q: memory.nearest(q), [queries] * 25), 2)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
        xb = np.ascontiguousarray(bank.numpy().astype(np.float32))
        xq = np.ascontiguousarray(queries.numpy())
        flat = faiss.IndexFlatL2(xb.shape[1])
        flat.add(xb)
        nn["faiss_flat_ms"] = round(_median_ms(lambda q: flat.search(q, 1), [xq] * 25), 2)
        hnsw = faiss.IndexHNSWFlat(xb.shape[1], 32)
        hnsw.add(xb)
        nn["faiss_hnsw_ms"] = round(_median_ms(lambda q: hnsw.search(q, 1), [xq] * 25), 2)
        exact = np.sqrt(flat.search(xq, 1)[0][:, 0])
        approx = np.sqrt(hnsw.search(xq, 1)[0][:, 0])
        nn["faiss_hnsw_max_rel_error"] = float(np.max((approx - exact) / np.maximum(exact, 1e-6)))
        nn["faiss_version"] = faiss.__version__
    except ImportError:
        nn["faiss"] = "not installed"
    print(nn, flush=True)

    out = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "python": platform.python_version(),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "data": args.data,
                    "n_train": n_img, "loadavg_1min_start": round(load0, 2),
                    "loadavg_1min_end": round(os.getloadavg()[0], 2), "command": " ".join(sys.argv)},
           "fits": rows, "selection_scaling": scaling, "latency": latency, "nearest_neighbour": nn}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fit_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Fit cost and speed at the defaults ({args.data}, one run)", "",
          f"{out['meta']['machine']}, torch {torch.__version__}, {out['meta']['date']}; 1-minute load average "
          f"{out['meta']['loadavg_1min_start']} at the start, {out['meta']['loadavg_1min_end']} at the end. "
          f"Fit on {n_img} `train` good cells (10% of them held out for the thresholds), AUROC on the `test` rows.",
          "", "| detector | threads | fit s | features s | coreset s | bank | image AUROC |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['label']} | {r['threads']} | {r['fit_s']} | {r.get('features_s', '–')} | "
                  f"{r.get('coreset_s', '–')} | {r.get('bank_size', '–')} | {r['image_auroc']} |")
    md += ["", f"Coreset selection seconds against the patch count (fraction {fraction}, 1 thread; 2x and 4x: the "
           f"1x patches plus copies with noise of sd 0.01). Default: greedy on a seeded random pre-sample of "
           f"coreset_sample = {sample} patches, still picking fraction x N (cost S x f N, linear in N); exact: "
           "over all patches (f N^2):", "",
           "| patches | x | default s | / 1x | exact s | / 1x |", "|---|---|---|---|---|---|"]
    for e in scaling:
        exact = (f"| {e['exact_s']} | {e['exact_s'] / scaling[0]['exact_s']:.2f} |" if "exact_s" in e
                 else "| – (not timed, --exact-up-to) | – |")
        md.append(f"| {e['patches']} | {e['times']} | {e['default_s']} | {e['default_s'] / scaling[0]['default_s']:.2f} "
                  + exact)
    md += ["", "onnxruntime (gaikan.edge), batch 1, 1 thread, median ms:", "",
           "| model | ms | ONNX MB |", "|---|---|---|"]
    for name, v in latency.items():
        md.append(f"| {name} | {v['onnx_ms_batch1_1thread']} | {v['onnx_mb']} |")
    md += ["", f"Nearest-neighbour search, one image's {per_image} patches against the default bank "
           f"({bank.shape[0]} x {bank.shape[1]}), 1 thread: " + ", ".join(f"{k} {v}" for k, v in nn.items())]
    (RESULTS / "fit_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
