"""The anomaly map's upsampling and smoothing in onnxruntime: convolutions against matrix products.

    .venv/bin/python bench/map_head.py        # under a minute on an idle 2-core machine

Every patch detector ends its graph with the same step: a (B, h, w) grid of patch scores upsampled
bilinearly to the working size and smoothed by a Gaussian (sigma 4). Written as in
``gaikan.detectors.maps.gaussian_blur(upsample(.))`` it exports as a Resize and two 1-channel
convolutions with their padding; ``smooth_map`` writes the same linear operator as two small
products with constant matrices. This script exports both for the grids of the defaults (PaDiM 56 x 56
and PatchCore 28 x 28 at 224 px) and times them side by side in one process, onnxruntime on one
thread, batch 1 and 8, median of 50 runs after 5 warm-ups. It also checks that the two give the same
maps. Then the whole exported graphs of PaDiM and PatchCore at their defaults (fitted on the elpv:mono
`train` goods), once with each map step, scored from the decoded cells at batch 1 on one thread
through gaikan.edge, in alternating rounds. Writes bench/results/map_head.json and
bench/results/map_head.md.
"""

from __future__ import annotations

import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GRIDS = {"PaDiM defaults (56 x 56 -> 224)": (56, 56), "PatchCore defaults (28 x 28 -> 224)": (28, 28)}
SIZE, SIGMA = (224, 224), 4.0


def main() -> None:
    import numpy as np
    import onnxruntime as ort
    import torch

    from gaikan.detectors.maps import gaussian_blur, smooth_map, upsample

    class Convolutions(torch.nn.Module):
        @staticmethod
        def path(grid, size, sigma):  # the map step before smooth_map
            return gaussian_blur(upsample(grid, size), sigma)

        def forward(self, grid):
            return self.path(grid, SIZE, SIGMA)

    class Products(torch.nn.Module):
        def forward(self, grid):
            return smooth_map(grid, SIZE, SIGMA)

    def session(module, grid_shape):
        buffer = io.BytesIO()
        torch.onnx.export(module, (torch.zeros(1, *grid_shape),), buffer, input_names=["grid"],
                          output_names=["map"], dynamic_axes={"grid": {0: "batch"}}, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    rows = []
    rng = np.random.default_rng(0)
    for label, grid_shape in GRIDS.items():
        conv, prod = session(Convolutions(), grid_shape), session(Products(), grid_shape)
        for batch in (1, 8):
            x = rng.random((batch, *grid_shape), dtype=np.float32)
            diff = float(np.abs(conv.run(None, {"grid": x})[0] - prod.run(None, {"grid": x})[0]).max())
            # alternate the two, so that a drift of the machine's speed hits both alike
            a, b = [], []
            for _ in range(3):
                a.append(median_ms([lambda: conv.run(None, {"grid": x})] * 20))
                b.append(median_ms([lambda: prod.run(None, {"grid": x})] * 20))
            rows.append({"grid": label, "batch": batch, "convolutions_ms": round(statistics.median(a), 3),
                         "products_ms": round(statistics.median(b), 3), "max_abs_difference": diff})
            print(rows[-1], flush=True)
    graphs = whole_graphs(Convolutions)
    payload = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, onnxruntime {ort.__version__}, "
                          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, load average "
                          f"{os.getloadavg()[0]:.1f}", "threads": 1, "sigma": SIGMA, "size": SIZE, "rows": rows,
               "whole_graphs": graphs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "map_head.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# The map's upsampling and smoothing in onnxruntime (bench/map_head.py)", "",
             f"{payload['machine']}. One thread, median ms per run (3 alternating rounds of 20 runs, after "
             "warm-ups). The maps of the two graphs agree to the last column's difference (maps in [0, 1]).", "",
             "| grid | batch | Resize + two 1-channel convolutions, ms | two matrix products (smooth_map), ms | "
             "max abs difference |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['grid']} | {r['batch']} | {r['convolutions_ms']:.2f} | {r['products_ms']:.2f} | "
              f"{r['max_abs_difference']:.1e} |" for r in rows]
    lines += ["", "Whole exported graphs at the defaults (fitted on elpv:mono), gaikan.edge, batch 1, one thread, "
              "median over 5 alternating rounds of the median ms per decoded cell (30 cells); the last columns: the rounds "
              "where the products were faster", "",
              "| model | convolution map step, ms | matrix-product map step, ms | max score difference | "
              "products faster in |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {g['model']} | {g['convolutions_ms']:.2f} | {g['products_ms']:.2f} | {g['max_score_difference']:.1e} | "
              f"{g['products_faster_in_rounds']} of 5 rounds |" for g in graphs]
    (RESULTS / "map_head.md").write_text("\n".join(lines) + "\n")


def median_ms(calls, warmup=5):
    """Median ms of each call of ``calls`` (zero-argument callables), after running the first
    ``warmup`` of them once untimed."""
    for call in calls[:warmup]:
        call()
    times = []
    for call in calls:
        t = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def whole_graphs(Convolutions) -> list[dict]:
    import numpy as np
    import torch

    import gaikan.detectors.scoring as scoring
    from gaikan import pipeline
    from gaikan.data.datasets import load_data
    from gaikan.detectors.base import get_detector_class
    from gaikan.edge import EdgeScorer
    from gaikan.export.onnx_export import export_onnx
    from gaikan.progress import set_quiet

    set_quiet(True)
    torch.set_num_threads(2)
    split = load_data("elpv:mono")
    cells = [np.asarray(img) for img in split.test.images[:30]]
    work = HERE / ".work" / "map_head"
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for name in ("padim", "patchcore"):
        det = get_detector_class(name)()
        pipeline.fit_detector(det, split)
        new = export_onnx(det, work / f"{name}-products.onnx", force=True)
        original = scoring.smooth_map
        scoring.smooth_map = lambda grid, size, sigma: Convolutions.path(grid, size, sigma)
        try:
            old = export_onnx(det, work / f"{name}-convolutions.onnx", force=True)
        finally:
            scoring.smooth_map = original
        a_scorer, b_scorer = EdgeScorer(old, threads=1), EdgeScorer(new, threads=1)
        diff = float(np.abs(a_scorer.score(cells[:8])[0] - b_scorer.score(cells[:8])[0]).max())
        a, b = [], []
        for _ in range(5):
            a.append(median_ms([lambda c=c: a_scorer.score([c]) for c in cells]))
            b.append(median_ms([lambda c=c: b_scorer.score([c]) for c in cells]))
        out.append({"model": f"{name} (defaults)", "convolutions_ms": round(statistics.median(a), 2),
                    "products_ms": round(statistics.median(b), 2), "max_score_difference": diff,
                    "rounds_ms": {"convolutions": [round(x, 2) for x in a], "products": [round(x, 2) for x in b]},
                    "products_faster_in_rounds": sum(y < x for x, y in zip(a, b))})
        print(out[-1], flush=True)
    return out


if __name__ == "__main__":
    main()
