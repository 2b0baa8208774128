"""Scoring on the device with an exported ONNX model: numpy, Pillow and onnxruntime or OpenVINO
only (no torch).

    from gaikan.edge import EdgeScorer
    scorer = EdgeScorer("model.onnx")                  # written by `gaikan export` (float or int8)
    scores, maps = scorer.score(["a.png", "b.png"])    # paths or numpy arrays; maps (N, H, W)
    scorer.verdicts(scores)                            # ["OK", "NG"]: NG iff score > threshold
    EdgeScorer("model.onnx", runtime="openvino")       # the same file through OpenVINO

    python -m gaikan.edge [--runtime onnx|openvino] model.onnx [--recursive] INPUTS...   # path,score,verdict per file

Runtimes (one small interface, ``run(batch) -> (scores, maps)`` plus the file's metadata): "onnx" =
onnxruntime (CPU provider, ORT_ENABLE_ALL), "openvino" = OpenVINO's CPU plugin (f32 inference
precision). The default is onnxruntime when it is installed, else OpenVINO.

Images are read and prepared exactly as the torch path does (``gaikan.data.images.read_image``, then
``to_float01``, alpha dropped, Pillow bilinear resize per channel in mode "F" to the working size,
gray replicated to RGB: ``gaikan.data.images.prepare_image``, shared with the torch path), then fed to the graph as
float32 (N, 3, H, W) in [0, 1]. Folders and per-file errors follow ``gaikan.data.inputs`` (the rules
of ``gaikan predict``: every file found gets a row; a bad file never stops the batch). This module
imports only numpy, Pillow, the runtime and the torch-free parts of gaikan (``gaikan.errors``,
``gaikan.data.images``, ``gaikan.data.inputs``); a test keeps it that way.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from gaikan.data.images import image_problem, prepare_image
from gaikan.data.inputs import SCORED, SKIPPED, read_input, scan_inputs, score_files
from gaikan.errors import GaikanError, ModelFormatError, SettingsError

FORMAT_NAME = "gaikan-onnx"  # = gaikan.export.onnx_export.FORMAT_NAME (not imported: that module needs torch)
READS_FORMAT_VERSIONS = (1,)


def _check_image(img, i: int) -> np.ndarray:
    problem = image_problem(img)
    if problem is not None:
        raise SettingsError(f"image {i} {problem}")
    return img


RUNTIMES = ("onnx", "openvino")


def onnx_session(model, threads: int, *, spin: bool = True):
    """An onnxruntime CPU session for ``model`` (a path, or a serialised model): full graph
    optimisation, ``threads`` intra-op threads (0 = all cores), one inter-op thread; ``spin`` False
    lets idle intra-op threads sleep (for a process whose other threads need the cores).

    ``session.x64quantprecision``: on x86 CPUs without VNNI (AVX2, or AVX-512 alone) onnxruntime
    multiplies uint8 activations by int8 weights with VPMADDUBSW, whose 16-bit sums of two products
    saturate, so an int8 model's scores depend on the CPU. On an AMD EPYC with AVX2 (10th session)
    ELPV mono's int8 PaDiM scored AUROC 0.808 without it and 0.940 with it (the float model 0.942,
    the QDQ graph simulated in float 0.941). With the option onnxruntime computes those products in
    uint8 x uint8 where the weights exceed 7 bits; on CPUs with VNNI, and for float models, it
    changes nothing."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.x64quantprecision", "1")
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class _OnnxRuntime:
    """onnxruntime, CPU execution provider, full graph optimisation (``ORT_ENABLE_ALL``)."""

    name = "onnx"

    def __init__(self, path: Path, threads: int, spin: bool = True):
        import onnxruntime as ort

        try:
            self.session = onnx_session(str(path), threads, spin=spin)
        except Exception as exc:  # noqa: BLE001 - any load failure is the file's problem
            raise ModelFormatError(f"{path}: not a loadable ONNX model ({_short(exc)})") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.version = ort.__version__

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(["score", "anomaly_map"], {self.input_name: batch})
        return scores, maps


class _OpenVino:
    """OpenVINO's CPU plugin reading the same .onnx file (its ONNX front end).

    Inference precision is pinned to f32: on CPUs with AMX/AVX512-BF16 OpenVINO's default is bf16,
    which would change the float model's numbers. An int8 (QDQ) file runs in int8: OpenVINO turns
    each QuantizeLinear/DequantizeLinear pair into a FakeQuantize and fuses it with the convolution.
    """

    name = "openvino"

    def __init__(self, path: Path, threads: int, spin: bool = True):  # noqa: ARG002 - OpenVINO's threads wait
        try:
            import openvino as ov
        except ImportError:
            raise SettingsError("runtime openvino needs the openvino package (pip install openvino, or "
                                "gaikan's `openvino` extra)") from None
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # noqa: BLE001 - any load failure is the file's problem
            raise ModelFormatError(f"{path}: not a loadable ONNX model ({_short(exc)})") from None
        rt = model.get_rt_info()
        framework = rt["framework"] if "framework" in rt else {}
        # the ONNX front end keeps the file's metadata_props under rt_info["framework"]
        self.metadata = {str(k): (v.astype(str) if hasattr(v, "astype") else str(v)) for k, v in
                         (framework.items() if isinstance(framework, dict) else [])}
        if "quantization" in self.metadata and x86_without_vnni():
            raise SettingsError(f"{path} is an int8 model, and this CPU has no VNNI: OpenVINO's int8 kernels "
                                "saturate on it and would give wrong scores (docs/edge.md); score it with "
                                "--runtime onnx, or the float model with openvino")
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001
            raise ModelFormatError(f"{path}: OpenVINO cannot compile this model ({_short(exc)})") from None
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output("score"), self.compiled.output("anomaly_map")]
        self.version = ov.__version__

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer({0: batch})
        # the request reuses its output buffers: copy before the next run
        return tuple(np.array(result[o], dtype=np.float32, copy=True) for o in self.outputs)


_BACKENDS = {"onnx": _OnnxRuntime, "openvino": _OpenVino}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def x86_without_vnni(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU whose flags (Linux's /proc/cpuinfo) show AVX2 but no VNNI: one whose 8-bit
    dot products (VPMADDUBSW) saturate. False elsewhere, and where the flags cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx2" in flags and not any(f in flags for f in VNNI_FLAGS)


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def default_runtime() -> str:
    """onnx when onnxruntime is installed, else openvino when that is (an edge box may have only one)."""
    import importlib.util

    for name, module in (("onnx", "onnxruntime"), ("openvino", "openvino")):
        if importlib.util.find_spec(module) is not None:
            return name
    raise SettingsError("scoring an ONNX model needs onnxruntime or openvino; install one "
                        "(pip install onnxruntime, or pip install openvino)")


class EdgeScorer:
    """An exported gaikan model (.onnx) run on the CPU by onnxruntime or OpenVINO.

    threads: intra-op threads (0 = the runtime's default, all cores).
    batch_size: images per run (memory grows with it: PatchCore's distance block is
        batch x positions x bank size floats).
    runtime: "onnx" (onnxruntime) or "openvino"; None = ``default_runtime()``.
    spin: onnxruntime's idle intra-op threads spin (lowest latency on an otherwise idle CPU);
        False lets them sleep, for a process whose other threads need the cores (the service).
    """

    def __init__(self, path, *, threads: int = 0, batch_size: int = 1, runtime: str | None = None,
                 spin: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such ONNX model file")
        if batch_size < 1 or threads < 0:
            raise SettingsError(f"batch_size must be >= 1 and threads >= 0, got {batch_size} and {threads}")
        runtime = default_runtime() if runtime is None else runtime
        if runtime not in _BACKENDS:
            raise SettingsError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        self.batch_size = int(batch_size)
        self.runtime = runtime
        self.backend = _BACKENDS[runtime](self.path, int(threads), spin=spin)
        meta = self.backend.metadata
        if meta.get("gaikan_format") != FORMAT_NAME:
            raise ModelFormatError(f"{self.path}: not a gaikan ONNX model (no gaikan_format={FORMAT_NAME!r} "
                                   "in its metadata); write it with `gaikan export`")
        version = meta.get("gaikan_format_version", "?")
        if not version.isdigit() or int(version) not in READS_FORMAT_VERSIONS:
            raise ModelFormatError(f"{self.path}: gaikan ONNX format version {version}, this gaikan reads "
                                   f"{', '.join(map(str, READS_FORMAT_VERSIONS))}")
        try:
            self.metadata = dict(meta)
            self.name = meta["detector"]
            self.settings = json.loads(meta["settings"])
            self.input_size = tuple(int(v) for v in json.loads(meta["input_size"]))
            self.threshold = float(meta["threshold"])
            self.threshold_method = meta.get("threshold_method", "")
            self.thresholds = {k: float(v) for k, v in json.loads(meta.get("thresholds", "{}")).items()}
            self.calibration_scores = np.sort(np.asarray(json.loads(meta.get("calibration_scores", "[]")),
                                                         dtype=np.float32))
            self.quantization = json.loads(meta["quantization"]) if "quantization" in meta else None
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelFormatError(f"{self.path}: gaikan metadata is incomplete or malformed ({exc})") from None

    def prepare(self, images: Sequence) -> np.ndarray:
        """Paths or arrays -> float32 (N, 3, H, W) in [0, 1] at the working size."""
        out = np.empty((len(images), 3, *self.input_size), dtype=np.float32)
        for i, img in enumerate(images):
            if isinstance(img, (str, os.PathLike)):
                img = read_input(img)
            out[i] = prepare_image(_check_image(img, i), self.input_size)
        return out

    def score_prepared(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on a prepared (N, 3, H, W) batch -> (scores (N,), maps (N, H, W))."""
        return self.backend.run(np.ascontiguousarray(batch, dtype=np.float32))

    def score(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Image paths or numpy arrays -> (scores (N,) float32, anomaly maps (N, H, W) float32)."""
        images = list(images)
        if not images:
            raise SettingsError("no images were given")
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            s, m = self.score_prepared(self.prepare(images[start:start + self.batch_size]))
            scores.append(s)
            maps.append(m)
        return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)

    def verdicts(self, scores) -> list[str]:
        """'NG' iff score > threshold, else 'OK'."""
        return ["NG" if float(s) > self.threshold else "OK" for s in np.atleast_1d(scores)]

    def p_values(self, scores) -> np.ndarray | None:
        """Conformal p-values (1 + #{s_i >= s}) / (n + 1) against the stored calibration scores."""
        cal = self.calibration_scores
        if len(cal) == 0:
            return None
        s = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        greater_equal = len(cal) - np.searchsorted(cal.astype(np.float64), s, side="left")
        return (1.0 + greater_equal) / (len(cal) + 1.0)


USAGE = ("usage: python -m gaikan.edge [--runtime onnx|openvino] MODEL.onnx [--recursive] INPUT [INPUT ...]\n"
         "INPUT: image files and/or folders of images (--recursive: their sub-folders too).\n"
         "prints path,score,verdict, one row for every file found: OK / NG (NG iff score > the model's\n"
         "threshold), UNREADABLE or SKIPPED (the reason on stderr)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gaikan.edge model.onnx [--recursive] INPUTS...``: one CSV row path,score,verdict for
    every file found (the accounting rules of ``gaikan.data.inputs``, as in ``gaikan predict``): OK /
    NG for a scored image, ``path,,UNREADABLE`` (its error on stderr, exit code 1) or ``path,,SKIPPED``
    (e.g. an unsupported file type; the reason on stderr, exit code unchanged). Notes (sub-folders not
    searched) go to stderr. Exit code 2 when the model cannot be loaded or no file is found."""
    import csv

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0
    runtime = None
    if argv and argv[0].startswith("--runtime"):
        if "=" in argv[0]:
            runtime, argv = argv[0].split("=", 1)[1], argv[1:]
        elif len(argv) > 1:
            runtime, argv = argv[1], argv[2:]
    recursive = any(a in ("-r", "--recursive") for a in argv)
    argv = [a for a in argv if a not in ("-r", "--recursive")]
    if len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        scorer = EdgeScorer(argv[0], runtime=runtime)
        scan = scan_inputs(argv[1:], recursive=recursive)
    except GaikanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in scan.notes:
        print(note, file=sys.stderr)
    status = 0
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["path", "score", "verdict"])
    for out in score_files(scan.rows, scorer.score, batch_size=scorer.batch_size):
        if out.status == SCORED:
            writer.writerow([out.path, f"{out.score:.6g}", scorer.verdicts([out.score])[0]])
            continue
        writer.writerow([out.path, "", out.status])
        print(f"{'skipped' if out.status == SKIPPED else 'error'}: {out.reason}", file=sys.stderr)
        if out.status != SKIPPED:
            status = 1
        sys.stdout.flush()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
