"""Does the higher-order triplet distance help? Triplet detector, same data and seeds, by loss.

    .venv/bin/python bench/higher_order.py [--seeds 3] [--epochs 10] [--scale 1.0] [--nets mlp,cnn] [--tag NAME]

Task: textured parts with small injected defects (gaikan.data.synthetic.make_defect_dataset, scale 1.0,
min_area 0.3 % -- smaller than the test fixture's), 96 px resized to 64 px; the detectors learn from the
good images only (synthetic negatives). Also the digits task (sklearn digits: 3 good, 8 defective, with
40 labelled 8s). Writes bench/results/higher_order.json and .md (mean and min image AUROC over seeds).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.flatnonzero(d.target == 3))
    b = rng.permutation(np.flatnonzero(d.target == 8))
    tr, te = np.r_[g[:100], b[:40]], np.r_[g[100:], b[40:]]
    return [x[i] for i in tr], (d.target[tr] == 8).astype(int), [x[i] for i in te], (d.target[te] == 8).astype(int)


def textures(seed: int, scale: float = 1.0):
    from gaikan.data.synthetic import make_defect_dataset

    s = make_defect_dataset(60, 40, 40, size=96, seed=100 + seed, scale=scale, min_area=0.003 * scale ** 2)
    return s.train.images, None, s.test.images, s.test.labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--scale", type=float, default=1.0, help="defect size scale of the texture task")
    ap.add_argument("--nets", default="mlp,cnn")
    ap.add_argument("--tag", default="", help="suffix of the result files (higher_order_TAG.json/.md)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from gaikan.detectors.triplet import TripletDetector
    from gaikan.evaluation.metrics import image_auroc
    from gaikan.progress import set_quiet

    set_quiet(True)
    tasks = {f"textures, defects x{args.scale:g} (good only)": (lambda s: textures(s, args.scale), dict(image_size=64)),
             "digits 3 vs 8 (40 labelled 8s)": (digits, dict(image_size=16))}
    rows = []
    for task, (make, size) in tasks.items():
        for net in args.nets.split(","):
            for loss in ("euclidean", "higher-order", "cosine"):
                aurocs, secs = [], []
                for seed in range(args.seeds):
                    train_x, train_y, test_x, test_y = make(seed)
                    det = TripletDetector(net=net, loss=loss, epochs=args.epochs, batch_size=16, seed=seed, **size)
                    t = time.perf_counter()
                    det.fit(train_x, train_y)
                    secs.append(time.perf_counter() - t)
                    aurocs.append(image_auroc(test_y, det.score(test_x).scores))
                rows.append(dict(task=task, net=net, loss=loss, auroc_mean=round(float(np.mean(aurocs)), 4),
                                 auroc_min=round(float(np.min(aurocs)), 4), aurocs=[round(a, 4) for a in aurocs],
                                 fit_s=round(float(np.mean(secs)), 1)))
                print(rows[-1], flush=True)
    meta = dict(seeds=args.seeds, epochs=args.epochs, batch_size=16, scale=args.scale, machine=f"{platform.machine()}, torch 1 thread",
                date=time.strftime("%Y-%m-%d"))
    (HERE / "results").mkdir(exist_ok=True)
    name = "higher_order" + (f"_{args.tag}" if args.tag else "")
    (HERE / "results" / f"{name}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    lines = [f"Triplet detector by loss; {args.seeds} seeds, {args.epochs} epochs, batch 16, default margins "
             f"({meta['machine']}, {meta['date']}). Image AUROC on the task's test images.", "",
             "| task | net | loss | AUROC mean | AUROC min | fit s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['net']} | {r['loss']} | {r['auroc_mean']:.4f} | {r['auroc_min']:.4f} | {r['fit_s']} |"
              for r in rows]
    (HERE / "results" / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
