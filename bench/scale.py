"""Archive scoring (and PaDiM fitting) on Ray against the local engine (issue 10).

    .venv/bin/python bench/scale.py [--n 200] [--workers 1,2] [--no-fit] [--figures] [--address auto]

Model: PaDiM with default settings fitted on the ELPV mono training cells (the `gaikan demo` model).
Images: the first N mono cells of the fixed split (test then train rows), the same files for every
engine, scored like an archive re-score: `predict --no-figures` (with --figures: one PNG each).

Engines, each through `gaikan.pipeline.predict_with_engine` (what `gaikan predict` runs):
  local torch   this process, torch's default threads (all cores)
  local onnx    this process, the model exported to ONNX, onnxruntime on all cores (runtime auto)
  ray Wk        an actor pool of k scorers, one CPU and one onnxruntime thread each (runtime auto)
For each: the wall time of the whole call for N images (model loading, the driver's ONNX export and
actor start-up included) and for a small warm-up set of 4 images per worker; the steady throughput is
(N - n_small) / (t_N - t_small): what the fixed costs leave. Scaling efficiency = ray W2 / ray W1.
The fit part times `fit --engine local` and `--engine ray` with 1 and 2 workers on the same split and
checks that the models agree.

Writes bench/results/scale.json and bench/results/scale.md. Records the load average: timings on a
shared machine are only an indication.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "scale"


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def fit_models(split, workers: list[int], do_fit: bool) -> tuple[Path, list[dict]]:
    import numpy as np

    from gaikan.detectors.padim import PaDiM
    from gaikan.engine import get_engine
    from gaikan.pipeline import fit_detector

    rows, models = [], {}
    engines = [("local", 1)] + ([("ray", w) for w in workers] if do_fit else [])
    for name, w in engines:
        det = PaDiM()
        with get_engine(name, workers=w) as engine:
            start = time.perf_counter()
            fit_detector(det, split, engine=engine)
            seconds = time.perf_counter() - start
        models[(name, w)] = det
        rows.append({"engine": name, "workers": w, "fit_seconds": round(seconds, 2),
                     "n_train": det.fit_info_["n_train"]})
        print(f"fit {name} x{w}: {seconds:.1f} s", file=sys.stderr)
    base = models[("local", 1)]
    for row in rows:
        det = models[(row["engine"], row["workers"])]
        row["max_abs_mean_diff_vs_local"] = float((det.mean_ - base.mean_).abs().max())
        row["threshold"] = float(det.threshold)
    out = WORK / "model"
    base.save(out, overwrite=True)
    return out, rows


def time_predict(model: Path, paths: list[Path], engine, runtime: str | None, figures: bool) -> tuple[float, list]:
    from gaikan.pipeline import predict_with_engine

    out = WORK / "results"
    start = time.perf_counter()
    preds = predict_with_engine(model, paths, out, engine=engine, runtime=runtime, force=True, figures=figures)
    return time.perf_counter() - start, preds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="images to score per engine")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts")
    parser.add_argument("--no-fit", action="store_true", help="skip the Ray fits (fit locally only)")
    parser.add_argument("--figures", action="store_true", help="draw one figure per image")
    parser.add_argument("--address", default=None, help="a running Ray (e.g. auto) instead of starting one")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",") if w]
    import numpy as np
    import ray

    from gaikan.data import load_data
    from gaikan.engine import get_engine
    from gaikan.engine.ray_engine import start_ray
    from gaikan.progress import set_quiet

    set_quiet(True)
    WORK.mkdir(parents=True, exist_ok=True)
    load_start = load()
    cpus = os.cpu_count() or 1
    start = time.perf_counter()
    start_ray(args.address, num_cpus=cpus)
    ray_init = time.perf_counter() - start
    split = load_data("elpv:mono")
    model, fit_rows = fit_models(split, workers, not args.no_fit)
    paths = [Path(p) for p in (split.test.paths + split.train.paths)[: args.n]]
    runs = [("local", "torch", 1), ("local", "auto", 1)] + [("ray", "auto", w) for w in workers]
    rows, reference = [], None
    for name, runtime, w in runs:
        engine = get_engine(name, workers=w)
        small = paths[: 4 * w]
        t_small, _ = time_predict(model, small, engine, runtime, args.figures)
        t_full, preds = time_predict(model, paths, engine, runtime, args.figures)
        scores = np.array([p.score for p in preds], dtype=np.float64)
        if reference is None:
            reference = scores
        steady = (len(paths) - len(small)) / max(t_full - t_small, 1e-9)
        label = f"{name} {'torch' if runtime == 'torch' else 'onnx'}" + (f" W{w}" if name == "ray" else "")
        rows.append({"engine": label, "workers": w, "runtime": runtime, "n_images": len(paths),
                     "seconds": round(t_full, 2), "images_per_s": round(len(paths) / t_full, 2),
                     "warmup_images": len(small), "warmup_seconds": round(t_small, 2),
                     "steady_images_per_s": round(steady, 2),
                     "max_rel_score_diff_vs_local_torch": float(np.max(np.abs(scores - reference) / np.abs(reference)))})
        print(f"{label}: {t_full:.1f} s for {len(paths)} ({steady:.2f} img/s steady)", file=sys.stderr)
        engine.close()
    ray.shutdown()
    by = {r["engine"]: r for r in rows}
    scaling = {}
    if "ray onnx W1" in by and "ray onnx W2" in by:
        scaling = {"steady_w2_over_w1": round(by["ray onnx W2"]["steady_images_per_s"]
                                              / by["ray onnx W1"]["steady_images_per_s"], 3),
                   "end_to_end_w2_over_w1": round(by["ray onnx W1"]["seconds"] / by["ray onnx W2"]["seconds"], 3),
                   "target": 1.6}
    result = {
        "bench": "scale", "model": "padim default settings, fitted on elpv:mono train", "figures": args.figures,
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version()},
        "load_average_start": load_start, "load_average_end": load(), "nice": os.nice(0),
        "ray_init_seconds": round(ray_init, 2), "fit": fit_rows, "predict": rows, "scaling": scaling,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "scale.md").write_text(markdown(result))
    print(markdown(result))
    shutil.rmtree(WORK / "results", ignore_errors=True)
    return 0


def markdown(r: dict) -> str:
    lines = [
        "# Archive scoring and PaDiM fitting on Ray (bench/scale.py)", "",
        f"{r['model']}; {r['predict'][0]['n_images']} ELPV mono cells per engine, "
        f"{'with' if r['figures'] else 'without'} figures; {r['machine']['cpus']} CPUs; "
        f"load average {r['load_average_start']} at the start, {r['load_average_end']} at the end "
        f"(nice {r['nice']}); Ray start-up {r['ray_init_seconds']} s (not in the times below).", "",
        "| engine | workers | seconds (N images) | images/s | warm-up (images, s) | steady images/s | max rel. score diff vs local torch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in r["predict"]:
        lines.append(f"| {p['engine']} | {p['workers']} | {p['seconds']} | {p['images_per_s']} | "
                     f"{p['warmup_images']}, {p['warmup_seconds']} | {p['steady_images_per_s']} | "
                     f"{p['max_rel_score_diff_vs_local_torch']:.1e} |")
    s = r.get("scaling") or {}
    if s:
        lines += ["", f"Scaling efficiency, 2 Ray workers vs 1: steady {s['steady_w2_over_w1']}x, end to end "
                      f"{s['end_to_end_w2_over_w1']}x (target >= {s['target']}x)."]
    lines += ["", "| fit engine | workers | fit seconds | n_train | max abs mean diff vs local | threshold |",
              "|---|---:|---:|---:|---:|---:|"]
    for f in r["fit"]:
        lines.append(f"| {f['engine']} | {f['workers']} | {f['fit_seconds']} | {f['n_train']} | "
                     f"{f['max_abs_mean_diff_vs_local']:.1e} | {f['threshold']:.5g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
