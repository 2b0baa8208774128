"""Toward the hardware limit on the edge (issue 12): PaDiM and PatchCore on ELPV mono, per runtime.

    python bench/edge_limit.py                      # both models at their defaults
    python bench/edge_limit.py --patchcore coreset_fraction=0.01 --latency-runs 40

Runtimes: torch (the saved model), onnxruntime float32, onnxruntime int8 (``gaikan export
--quantize int8``: static QDQ int8 backbone, float head), OpenVINO float32 and OpenVINO int8 (the
same two .onnx files read by OpenVINO, f32 inference precision).

Per model and runtime (bench/results/edge_limit.json + edge_limit.md):

* latency_ms: ``score([image])`` of one ELPV test image (reading excluded, resizing included) at
  batch 1 on 1 thread; all runtimes of a model in ONE process, interleaved round-robin, so that a
  load change on this shared machine hits them alike: median and 10th percentile over the runs.
  ``vs_onnx_f32`` = this runtime's median / onnxruntime float32's median of the same rounds.
* throughput_img_s: best images/s over batch sizes 1, 4, 8, 16 on 2 threads (also interleaved);
  ``best_batch``.
* peak_rss_mb: VmHWM of a fresh process that loads the model and scores test images at the best
  batch on 2 threads: the whole test set for torch and OpenVINO (the same process gives their
  AUROC), 32 images for onnxruntime (its AUROCs come from the export's float/int8 comparison,
  which scored the whole test set with onnxruntime in this run).
* file_mb: model size on disk (torch: the model directory).
* image_auroc on the ELPV mono test rows (489 images), and the int8 vs float comparison that
  ``gaikan export --quantize int8`` made and stored in the file.
* macs: multiply-adds per image of the float graph (Conv: output elements x input channels per
  group x kernel area; MatMul/Gemm: output elements x inner dimension), backbone and head apart.
* profile: onnxruntime's per-node profiler at batch 1 on 1 thread, backbone and head apart, for
  the float32 and int8 graphs (why the whole-model ratio is what it is).
* fraction_of_peak: (backbone MACs / peak_backbone + head MACs / peak_fp32) / latency, where the
  peaks are measured in the same run by a plain matrix-multiply microbenchmark on 1 thread
  (onnxruntime MatMul float32 and MatMulInteger uint8 x int8, 512^3, best of 30; numpy's float32 matmul for
  reference) and peak_backbone is the int8 peak for the int8 runtimes, the fp32 one otherwise.

Each fitted model is kept under bench/.work/edge_limit/ and reused when its settings match (pass
--refit to fit again). Record the load: the 1-minute load average is written per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import dir_size_mb, peak_rss_mb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / ".work" / "edge_limit"
DATA = "elpv:mono"
RUNTIMES = ("torch", "onnx-f32", "onnx-int8", "openvino-f32", "openvino-int8")
BATCHES = (1, 4, 8, 16)


def _settings(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _load():
    return round(os.getloadavg()[0], 1)


# ---- phases (each in its own process) ------------------------------------------------------------
def phase_fit(model: str, settings: dict, calibration_images: int, refit: bool) -> dict:
    import torch

    from gaikan.data import load_data
    from gaikan.detectors.base import load_detector
    from gaikan.export.onnx_export import export_onnx
    from gaikan.export.quantize import quantize_detector
    from gaikan.pipeline import fit_detector, make_detector
    from gaikan.progress import set_quiet

    set_quiet(True)
    torch.set_num_threads(2)
    root = WORK / model
    split = load_data(DATA)
    det = make_detector(model)
    for key, value in settings.items():
        setattr(det, key, tuple(value) if isinstance(value, list) else value)
    wanted = det.settings()
    fit_s = None
    if not refit and (root / "model").is_dir():
        old = load_detector(root / "model")
        if old.settings() == wanted and old.fit_info_.get("data") == DATA:
            det = old
    if not getattr(det, "fitted_", False):
        start = time.perf_counter()
        fit_detector(det, split)
        fit_s = time.perf_counter() - start
        det.save(root / "model", overwrite=True)
    export_onnx(det, root / "f32.onnx", force=True)
    start = time.perf_counter()
    info = quantize_detector(det, split, root / "int8.onnx", n_calibration=calibration_images, force=True)
    quant_s = time.perf_counter() - start
    return {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in det.settings().items()},
            "fit_seconds": fit_s, "quantize_seconds": quant_s, "quantization": info,
            "load": _load()}


def _scorer(model: str, runtime: str, threads: int, batch: int = 1):
    root = WORK / model
    if runtime == "torch":
        import torch

        from gaikan.detectors.base import load_detector

        torch.set_num_threads(threads)
        det = load_detector(root / "model")
        det.batch_size = batch
        return lambda images: det.score(images).scores
    from gaikan.edge import EdgeScorer

    engine, precision = runtime.split("-")
    scorer = EdgeScorer(root / f"{precision}.onnx", threads=threads, batch_size=batch, runtime=engine)
    return lambda images: scorer.score(images)[0]


def phase_speed(model: str, runtimes: list[str], latency_runs: int, batches: tuple[int, ...] = BATCHES) -> dict:
    import numpy as np
    import torch

    from gaikan.data import load_data

    test = load_data(DATA).test.images
    out = {}
    load_before = _load()
    # latency: batch 1, 1 thread, round-robin over the runtimes
    torch.set_num_threads(1)
    scorers = {r: _scorer(model, r, threads=1) for r in runtimes}
    for r, fn in scorers.items():
        for i in range(3):
            fn([test[i]])
    times = {r: [] for r in runtimes}
    for i in range(latency_runs):
        img = [test[i % len(test)]]
        for r, fn in scorers.items():
            t = time.perf_counter()
            fn(img)
            times[r].append(time.perf_counter() - t)
    del scorers
    for r in runtimes:
        ms = np.array(times[r]) * 1000
        out[r] = {"latency_ms": float(np.median(ms)), "latency_p10_ms": float(np.percentile(ms, 10)),
                  "latency_runs": latency_runs}
    # throughput: 2 threads, best batch, interleaved per batch size
    torch.set_num_threads(2)
    for batch in batches:
        scorers = {r: _scorer(model, r, threads=2, batch=batch) for r in runtimes}
        images = test[:batch]
        for fn in scorers.values():
            fn(images)
        best = {r: float("inf") for r in runtimes}
        for _ in range(max(2, 16 // batch)):
            for r, fn in scorers.items():
                t = time.perf_counter()
                fn(images)
                best[r] = min(best[r], time.perf_counter() - t)
        for r in runtimes:
            rate = batch / best[r]
            if rate > out[r].get("throughput_img_s", 0):
                out[r]["throughput_img_s"], out[r]["best_batch"] = rate, batch
        del scorers
    return {"runtimes": out, "load_before": load_before, "load_after": _load()}


def phase_accuracy(model: str, runtime: str, batch: int, n_images: int) -> dict:
    """Score the first ``n_images`` test images (0 = all, then also the AUROC); peak RSS."""
    from gaikan.data import load_data
    from gaikan.evaluation.metrics import image_auroc

    split = load_data(DATA)
    fn = _scorer(model, runtime, threads=2, batch=batch)
    images = split.test.images[:n_images] if n_images else split.test.images
    scores = fn(images)
    auroc = image_auroc(split.test.labels, scores) if not n_images else None
    return {"image_auroc": auroc, "peak_rss_mb": peak_rss_mb(), "scores": [float(s) for s in scores],
            "load": _load()}


def phase_macs(model: str) -> dict:
    """Multiply-adds per image of the float graph, from the shapes of one batch-1 run."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from gaikan.export.quantize import BACKBONE_PREFIX

    m = onnx.load(str(WORK / model / "f32.onnx"))
    init = {i.name: list(i.dims) for i in m.graph.initializer}
    wanted = {t for n in m.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") for t in (*n.input, *n.output)
              if t and t not in init}
    have = {o.name for o in m.graph.output}
    for t in sorted(wanted - have - {i.name for i in m.graph.input}):
        m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    size = json.loads({p.key: p.value for p in m.metadata_props}["input_size"])
    x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: list(v.shape) for n, v in zip(names, sess.run(names, {m.graph.input[0].name: x}))}
    shapes[m.graph.input[0].name] = list(x.shape)
    shapes.update(init)
    macs = {"backbone": 0, "head": 0}
    for n in m.graph.node:
        if n.op_type == "Conv":
            w = shapes[n.input[1]]
            count = int(np.prod(shapes[n.output[0]])) * w[1] * int(np.prod(w[2:]))
        elif n.op_type in ("MatMul", "Gemm"):
            a = shapes[n.input[0]]
            trans_a = any(at.name == "transA" and at.i for at in n.attribute)
            k = a[-2] if trans_a else a[-1]
            count = int(np.prod(shapes[n.output[0]])) * k
        else:
            continue
        macs["backbone" if n.name.startswith(BACKBONE_PREFIX) else "head"] += int(count)
    macs["total"] = macs["backbone"] + macs["head"]
    return macs


def phase_profile(model: str, runs: int = 20) -> dict:
    """onnxruntime's profiler, batch 1, 1 thread: ms per image in the backbone (nodes /extractor/...,
    and the Q/DQ nodes at its border) and in the head, float32 and int8 graphs."""
    import collections

    import numpy as np
    import onnxruntime as ort

    out = {}
    for precision in ("f32", "int8"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(WORK / model / f"profile-{precision}")
        sess = ort.InferenceSession(str(WORK / model / f"{precision}.onnx"), options,
                                    providers=["CPUExecutionProvider"])
        size = sess.get_inputs()[0].shape[2:]
        x = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
        for _ in range(3):
            sess.run(None, {"image": x})
        prof = Path(sess.end_profiling())
        sess = ort.InferenceSession(str(WORK / model / f"{precision}.onnx"), options,
                                    providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, {"image": x})
        prof.unlink(missing_ok=True)
        prof = Path(sess.end_profiling())
        parts, ops = collections.Counter(), collections.Counter()
        for event in json.loads(prof.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                name = event["name"][: -len("_kernel_time")]
                part = "backbone" if "/extractor/" in name else "head"
                parts[part] += event["dur"]
                ops[f"{part}:{event['args'].get('op_name')}"] += event["dur"]
        prof.unlink(missing_ok=True)
        out[precision] = {"backbone_ms": parts["backbone"] / runs / 1000, "head_ms": parts["head"] / runs / 1000,
                          "top_ops_ms": {k: v / runs / 1000 for k, v in ops.most_common(6)}}
    out["load"] = _load()
    return out


def phase_peak() -> dict:
    """Single-thread matrix-multiply peaks: onnxruntime float32 MatMul and uint8 x int8 MatMulInteger
    (the kernels the runtimes use), numpy float32 for reference; MACs per second, best of 30 runs of
    512^3 (short runs: on a loaded machine the best one is the one that had the core to itself)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = 512
    rng = np.random.default_rng(0)

    def session(op, dtype_a, dtype_b, dtype_out):
        node = helper.make_node(op, ["A", "B"], ["Y"])
        graph = helper.make_graph([node], "mm", [helper.make_tensor_value_info("A", dtype_a, [n, n]),
                                                 helper.make_tensor_value_info("B", dtype_b, [n, n])],
                                  [helper.make_tensor_value_info("Y", dtype_out, [n, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])

    def best(fn, reps=30):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return n ** 3 / min(times)

    f32 = session("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    i8 = session("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
    qa = rng.integers(0, 256, (n, n), dtype=np.uint8)
    qb = rng.integers(-128, 128, (n, n), dtype=np.int8)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return {"onnx_f32_macs_per_s": best(lambda: f32.run(None, {"A": a, "B": b})),
            "onnx_int8_macs_per_s": best(lambda: i8.run(None, {"A": qa, "B": qb})),
            "numpy_f32_macs_per_s": best(lambda: a @ b), "n": n, "load": _load()}


# ---- driver -----------------------------------------------------------------------------------------
def run_phase(args: list[str], threads: int | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"phase {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_flags() -> dict:
    flags = set()
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    keys = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"model": model, **{k: k in flags for k in keys}}


def fmt(v, digits=1):
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_markdown(doc: dict) -> None:
    meta = doc["meta"]
    peak = doc["peak"]
    cpu = meta["cpu"]
    lines = [
        "# Toward the hardware limit: int8 and OpenVINO on ELPV mono (issue 12)",
        "",
        f"{cpu['model']} ({meta['machine']}; AVX-512 {cpu['avx512f']}, AVX512-VNNI {cpu['avx512_vnni']}, "
        f"AMX-INT8 {cpu['amx_int8']}), Python {meta['python']}, torch {meta['torch']}, onnxruntime "
        f"{meta['onnxruntime']}, OpenVINO {meta['openvino']}, {meta['date']}.",
        "",
        f"**Load**: {meta['load_note']}",
        "",
        f"Re-make: `{meta['command']}`",
        "",
        f"Matrix-multiply peak on 1 thread ({peak['n']}^3, best of 30): onnxruntime float32 "
        f"{peak['onnx_f32_macs_per_s'] / 1e9:.1f} GMAC/s, onnxruntime uint8 x int8 "
        f"{peak['onnx_int8_macs_per_s'] / 1e9:.1f} GMAC/s, numpy float32 {peak['numpy_f32_macs_per_s'] / 1e9:.1f} "
        "GMAC/s.",
        "",
        "| model | runtime | ms/img batch 1, 1 thread (median; p10) | vs onnx f32 | img/s 2 threads (batch) "
        "| peak RSS MB | file MB | image AUROC | GMAC/img (backbone + head) | fraction of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in doc["models"].items():
        macs = m["macs"]
        for r in RUNTIMES:
            row = m["runtimes"].get(r)
            if row is None:
                continue
            lines.append(
                f"| {name} | {r} | {fmt(row['latency_ms'])} ({fmt(row['latency_p10_ms'])}) | "
                f"{row['vs_onnx_f32']:.2f} | {fmt(row.get('throughput_img_s'))} ({row.get('best_batch')}) | "
                f"{fmt(row.get('peak_rss_mb'), 0)} | {fmt(row['file_mb'], 1)} | {fmt(row['image_auroc'], 4)} | "
                f"{macs['total'] / 1e9:.3f} ({macs['backbone'] / 1e9:.3f} + {macs['head'] / 1e9:.3f}) | "
                f"{100 * row['fraction_of_peak']:.1f}% |")
    lines += ["", "Settings (ELPV mono, fixed split; fit on the train goods, 10% held out for thresholds):", ""]
    for name, m in doc["models"].items():
        q = m["quantization"]
        c = q["check"]
        lines.append(f"* **{name}** `{json.dumps(m['settings'])}`; int8: {q['weights']}, {q['activations']}, "
                     f"{q['calibration']['source']}; quantized ops {q['quantized_ops']}, float ops {q['float_ops']}; "
                     f"int8 vs float on {c['images']} test images: median score change "
                     f"{100 * c['median_rel_score_diff']:.2f}%, max {100 * c['max_rel_score_diff']:.1f}%, same "
                     f"verdict on {c['verdicts_equal']}, AUROC {c['auroc_float']:.4f} -> {c['auroc_int8']:.4f}; "
                     f"OpenVINO vs onnxruntime, max relative score difference: float "
                     f"{m['openvino_vs_onnx'].get('f32', float('nan')):.2g}, int8 "
                     f"{m['openvino_vs_onnx'].get('int8', float('nan')):.2g}.")
        pr = m.get("profile")
        if pr:
            lines.append(f"  onnxruntime profile, batch 1, 1 thread (ms/img): float32 backbone "
                         f"{pr['f32']['backbone_ms']:.1f} + head {pr['f32']['head_ms']:.1f}; int8 backbone "
                         f"{pr['int8']['backbone_ms']:.1f} + head {pr['int8']['head_ms']:.1f} (backbone x"
                         f"{pr['int8']['backbone_ms'] / pr['f32']['backbone_ms']:.2f}); largest ops float32 "
                         f"{ {k: round(v, 1) for k, v in pr['f32']['top_ops_ms'].items()} }.")
    lines += ["", "Latencies of one model come from one process, the runtimes interleaved round-robin, so the "
              "`vs onnx f32` ratios hold under load even where the absolute times do not. Fraction of peak = "
              "(backbone MACs / backbone peak + head MACs / float32 peak) / latency, with the int8 peak for the "
              "backbone of the int8 runtimes.", ""]
    (RESULTS / "edge_limit.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="padim,patchcore")
    parser.add_argument("--padim", default="", help="PaDiM settings KEY=VALUE,... (default: its defaults)")
    parser.add_argument("--patchcore", default="", help="PatchCore settings KEY=VALUE,... (default: its defaults)")
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--refit", action="store_true")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes tried for throughput")
    parser.add_argument("--auroc-runtimes", default="torch,openvino-f32,openvino-int8",
                        help="runtimes whose AUROC is measured by scoring the whole test set in their own process "
                             "(onnxruntime's come from the export's comparison; the others score 32 images for "
                             "the peak RSS and get no AUROC)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset of " + ",".join(RUNTIMES))
    args = parser.parse_args()
    settings = {"padim": _settings(args.padim), "patchcore": _settings(args.patchcore)}
    runtimes = [r for r in args.runtimes.split(",") if r]
    if args.phase:
        result = {
            "fit": lambda: phase_fit(args.model, settings[args.model], args.calibration_images, args.refit),
            "speed": lambda: phase_speed(args.model, runtimes, args.latency_runs,
                                         tuple(int(b) for b in args.batches.split(","))),
            "accuracy": lambda: phase_accuracy(args.model, args.runtime, args.batch, args.images),
            "macs": lambda: phase_macs(args.model),
            "peak": phase_peak,
            "profile": lambda: phase_profile(args.model),
        }[args.phase]()
        print(json.dumps(result))
        return

    import numpy as np
    import onnxruntime
    import torch

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
        runtimes = [r for r in runtimes if not r.startswith("openvino")]
    RESULTS.mkdir(exist_ok=True)
    loads = [_load()]
    common = [f"--{k}={v}" for k, v in (("padim", args.padim), ("patchcore", args.patchcore)) if v]
    doc = {"meta": {}, "models": {}}
    cmd = "python bench/edge_limit.py" + "".join(f" {c}" for c in common) + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("latency_runs", args.latency_runs), ("batches", args.batches),
                                                    ("auroc_runtimes", args.auroc_runtimes))
        if v != parser.get_default(k))

    def save() -> None:
        doc["meta"] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "cpu": cpu_flags(),
            "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": ov_version, "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": cmd, "loads": loads,
            "load_note": f"1-minute load average {min(loads):.1f} to {max(loads):.1f} during the run "
                         f"({os.cpu_count()} cores; the benchmark's own processes load about 1-2, above that other jobs "
                         "shared the machine: absolute times inflated, the ratios much less).",
        }
        (RESULTS / "edge_limit.json").write_text(json.dumps(doc, indent=2) + "\n")
        write_markdown(doc)

    print(f"[peak] matrix-multiply microbenchmark (load {_load()})", file=sys.stderr, flush=True)
    doc["peak"] = run_phase(["--phase", "peak"], threads=1)
    for model in [m for m in args.models.split(",") if m]:
        print(f"[{model}] fit/export/quantize (load {_load()})", file=sys.stderr, flush=True)
        fit = run_phase(["--phase", "fit", "--model", model, "--calibration-images", str(args.calibration_images),
                         *common, *(["--refit"] if args.refit else [])])
        macs = run_phase(["--phase", "macs", "--model", model])
        profile = run_phase(["--phase", "profile", "--model", model])
        loads.append(profile["load"])
        print(f"[{model}] latency + throughput, runtimes interleaved (load {_load()})", file=sys.stderr, flush=True)
        speed = run_phase(["--phase", "speed", "--model", model, "--latency-runs", str(args.latency_runs),
                           "--runtimes", ",".join(runtimes), "--batches", args.batches, *common])
        loads += [speed["load_before"], speed["load_after"]]
        rows = speed["runtimes"]
        scores = {}
        check = fit["quantization"]["check"]
        for r in runtimes:
            # onnxruntime's AUROCs come from the float/int8 comparison of the export (same runtime, same
            # 489 images, this run); its process here scores 32 images for the peak RSS and the
            # OpenVINO comparison
            n_images = 0 if r in args.auroc_runtimes.split(",") else 32
            print(f"[{model}] {r}: {'AUROC + ' if not n_images else ''}peak RSS (load {_load()})", file=sys.stderr,
                  flush=True)
            acc = run_phase(["--phase", "accuracy", "--model", model, "--runtime", r, "--images", str(n_images),
                             "--batch", str(rows[r].get("best_batch", 8)), *common])
            loads.append(acc["load"])
            scores[r] = np.array(acc.pop("scores"))
            auroc = acc["image_auroc"] if not n_images else (
                check["auroc_" + ("int8" if r.endswith("int8") else "float")] if r.startswith("onnx") else None)
            rows[r].update(image_auroc=auroc, peak_rss_mb=acc["peak_rss_mb"])
            root = WORK / model
            rows[r]["file_mb"] = (dir_size_mb(root / "model") if r == "torch"
                                  else (root / f"{r.split('-')[1]}.onnx").stat().st_size / 1e6)
        base = rows["onnx-f32"]["latency_ms"]
        for r in runtimes:
            rows[r]["vs_onnx_f32"] = rows[r]["latency_ms"] / base
            backbone_peak = doc["peak"]["onnx_int8_macs_per_s"] if r.endswith("int8") else doc["peak"]["onnx_f32_macs_per_s"]
            ideal = macs["backbone"] / backbone_peak + macs["head"] / doc["peak"]["onnx_f32_macs_per_s"]
            rows[r]["fraction_of_peak"] = ideal / (rows[r]["latency_ms"] / 1000)
        ov = {}
        for p in ("f32", "int8"):
            if f"openvino-{p}" in scores and f"onnx-{p}" in scores:
                a, b = scores[f"onnx-{p}"], scores[f"openvino-{p}"][:len(scores[f"onnx-{p}"])]
                ov[p] = float(np.max(np.abs(b - a) / np.maximum(np.abs(a), 1e-12)))
        doc["models"][model] = {"settings": fit["settings"], "fit_seconds": fit["fit_seconds"],
                                "quantize_seconds": fit["quantize_seconds"], "quantization": fit["quantization"],
                                "macs": macs, "runtimes": rows, "openvino_vs_onnx": ov, "profile": profile}
        save()  # after each model: a run stopped later keeps what it measured
    print((RESULTS / "edge_limit.md").read_text())


if __name__ == "__main__":
    main()
