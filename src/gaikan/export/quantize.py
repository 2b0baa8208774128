"""Static int8 quantization of an exported model's backbone (``gaikan export --quantize int8``).

What is quantized, and how (onnxruntime.quantization.quantize_static, QDQ format):

* the nodes of the backbone subgraph only, i.e. the ONNX nodes whose name starts with
  ``/extractor/`` (the EfficientNet-Lite0 convolutions, their ReLU6 clips, the "same" paddings and
  the residual additions); the detector head (PaDiM's per-position whitening products, PatchCore's
  nearest-neighbour distance, the upsampling, the smoothing, the image score) stays float32. The
  head's inputs are DequantizeLinear outputs, i.e. float.
* weights: int8, symmetric, one scale per output channel (``per_channel``);
* activations: 8-bit with one scale and zero point per tensor, from the min/max of the activations
  over the calibration images (``CalibrationMethod.MinMax``): uint8 (the default: with signed int8
  activations onnxruntime 1.32 on x86 left the 1x1 convolutions unfused, float between DQ and Q)
  or int8 (``activations="int8"``).
* the float graph is the one ``gaikan export`` writes (``gaikan.export.graph.clean_graph``:
  onnxruntime's basic optimisation, constant "SAME" pads folded into the convolutions), so that the
  QDQ pairs sit on the convolutions themselves.

Why the head stays float by default (``head=True`` quantizes its products with constant matrices
too, for measurement): on ELPV mono PaDiM's int8 head kept the AUROC (0.9392 vs 0.9389 with the
backbone alone) but made onnxruntime 3.5x slower at batch 1 (its per-position batched product has
no fast int8 kernel); PatchCore's distance is the norm expansion ||q||^2 - 2 q.m + ||m||^2, which
cancels to a small number, so an 8-bit rounding of q.m is a large relative error of the distance.
docs/edge.md has the numbers.

The calibration images are good images (the model was fitted on goods): by default the good
training images of the data set the model was fitted on. The quantized file keeps every
``metadata_props`` entry of the float one and adds ``quantization`` (JSON): what was quantized,
the settings, the calibration images, and the float-vs-int8 comparison made when it was written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gaikan.errors import GaikanError, ModelFormatError, SettingsError
from gaikan.export.graph import clean_graph, save_atomic
from gaikan.export.onnx_export import HEAD_STAGE_PREFIX

BACKBONE_PREFIX = "/extractor/"
#: the map head of every exported scoring module (``gaikan.detectors.scoring._MapHead``, attribute
#: ``head``); in a two-stage graph the head stage's node names carry the stage's prefix too
MAP_PREFIXES = ("/head/", f"{HEAD_STAGE_PREFIX}/head/")
# op types that do arithmetic (the rest move data): reported as quantized / float in the metadata
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Clip", "Relu", "ReduceMin", "ReduceMax",
               "ReduceSum", "Sqrt", "Resize", "AveragePool", "Softmax", "TopK")
ACTIVATION_TYPES = ("int8", "uint8")
DEFAULT_CALIBRATION_IMAGES = 64


def backbone_node_names(model) -> list[str]:
    """Names of the nodes of the backbone subgraph (the exporter names them ``/extractor/...``)."""
    return [n.name for n in model.graph.node if n.name.startswith(BACKBONE_PREFIX)]


def head_product_nodes(model) -> tuple[list[str], int]:
    """The head's MatMul/Gemm nodes with a constant second operand, and that operand's column axis.
    The map's upsampling and smoothing products (``smooth_map``, under ``/head/``) stay float: int8
    there clips the map, whose maximum is the score."""
    init = {i.name: len(i.dims) for i in model.graph.initializer}
    names, ranks = [], set()
    for n in model.graph.node:
        if (n.op_type in ("MatMul", "Gemm") and not n.name.startswith((BACKBONE_PREFIX, *MAP_PREFIXES))
                and n.input[1] in init):
            names.append(n.name)
            ranks.add(init[n.input[1]])
    return names, (max(ranks) - 1 if ranks else 1)


class _Batches:
    """onnxruntime CalibrationDataReader over prepared (N, 3, H, W) images, one image per run."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name = input_name
        self.images = images
        self.i = 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        batch = self.images[self.i:self.i + 1]
        self.i += 1
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self):
        self.i = 0


def _op_counts(model, quantized: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(quantized compute nodes by op type, float compute nodes by op type) of a QDQ model.

    A node counts as quantized when it sits between a DequantizeLinear (its data input, the first)
    and a QuantizeLinear (its output), the pattern a runtime fuses into an int8 kernel; float
    otherwise (the head's nodes read DequantizeLinear outputs, i.e. float, and feed no quantizer)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    quantizer_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    q, f = Counter(), Counter()
    for n in model.graph.node:
        if n.op_type not in COMPUTE_OPS:
            continue
        first = producer.get(n.input[0]) if n.input else None
        from_dq = first is not None and first.op_type == "DequantizeLinear"
        int8 = from_dq and n.output[0] in quantizer_inputs and n.name in quantized
        (q if int8 else f)[n.op_type] += 1
    return dict(sorted(q.items())), dict(sorted(f.items()))


def quantize_int8(float_model, out, calibration_images: np.ndarray, *, activations: str = "uint8",
                  per_channel: bool = True, head: bool = False, calibration_source: str = "",
                  force: bool = False) -> Path:
    """Write the static int8 (QDQ) version of the exported ``float_model`` (.onnx) to ``out``.

    calibration_images: prepared float32 (N, 3, H, W) good images in [0, 1] at the model's working
    size (``gaikan.edge.EdgeScorer.prepare``). Only the backbone subgraph is quantized (see the
    module doc). ``out`` is refused if it exists, unless ``force``; it is written to a temporary
    sibling and renamed.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    float_model, out = Path(float_model), Path(out)
    if not float_model.is_file():
        raise ModelFormatError(f"{float_model}: no such ONNX model file")
    if out.exists() and not force:
        raise GaikanError(f"{out} already exists; use --force to replace it")
    if out.resolve() == float_model.resolve():
        raise GaikanError(f"{out}: the int8 model must not replace the float model it is made from")
    if activations not in ACTIVATION_TYPES:
        raise SettingsError(f"activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}")
    images = np.asarray(calibration_images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3 or len(images) == 0:
        raise SettingsError(f"calibration images: expected a non-empty (N, 3, H, W) batch, got shape {images.shape}")
    source = onnx.load(str(float_model))
    meta = {p.key: p.value for p in source.metadata_props}
    if meta.get("gaikan_format") != "gaikan-onnx":
        raise ModelFormatError(f"{float_model}: not a gaikan ONNX model (write it with `gaikan export`)")
    if "quantization" in meta:
        raise ModelFormatError(f"{float_model}: already quantized; quantize the float model")
    size = json.loads(meta["input_size"])
    if list(images.shape[2:]) != list(size):
        raise SettingsError(f"calibration images are {images.shape[2]}x{images.shape[3]}, the model's working "
                            f"size is {size[0]}x{size[1]}")
    input_name, doc = source.graph.input[0].name, source.doc_string
    del source

    with tempfile.TemporaryDirectory(prefix="gaikan-quant-") as tmp:
        # the graph as `gaikan export` writes it (cleaned: constant pads folded into the convolutions);
        # clean_graph is idempotent, so a file exported by an older gaikan gets the same treatment
        model = clean_graph(onnx.load(str(float_model)))
        nodes = backbone_node_names(model)
        if not nodes:
            raise ModelFormatError(f"{float_model}: no backbone nodes (named {BACKBONE_PREFIX}...) to quantize")
        extra = {}
        if head:
            products, axis = head_product_nodes(model)
            nodes += products
            # (the weight-scale adjustment for int32 biases fails on Gemm's (1, M) bias in onnxruntime 1.32)
            extra = {"QDQOpTypePerChannelSupportToAxis": {"MatMul": axis, "Gemm": axis},
                     "QDQDisableWeightAdjustForInt32Bias": True}
        cleaned, quantized_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(model, str(cleaned))
        del model
        act = QuantType.QInt8 if activations == "int8" else QuantType.QUInt8
        with _quiet_quantizer():
            quantize_static(
                str(cleaned), str(quantized_path), _Batches(input_name, images), quant_format=QuantFormat.QDQ,
                per_channel=per_channel, activation_type=act, weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, **extra},
            )
        qmodel = onnx.load(str(quantized_path))
    barriers = 0 if head else insert_float_barriers(qmodel)
    quantized_ops, float_ops = _op_counts(qmodel, set(nodes))
    info = {
        "scheme": "static int8, QDQ (onnxruntime.quantization.quantize_static)",
        "onnxruntime": onnxruntime.__version__,
        "quantized_part": f"backbone (nodes {BACKBONE_PREFIX}*): EfficientNet-Lite0 up to the deepest tap"
                          + (", and the head's products with constant matrices (MatMul/Gemm)" if head else ""),
        "float_part": ("rest of the detector head (upsampling, smoothing, score)" if head else
                       "detector head (distance / Mahalanobis products, upsampling, smoothing, score)"),
        "quantized_ops": quantized_ops,
        "float_ops": float_ops,
        "weights": "int8 symmetric, " + ("per output channel" if per_channel else "per tensor"),
        "activations": f"{activations} asymmetric per tensor, MinMax calibration",
        "calibration": {"images": int(len(images)), "source": calibration_source or "good images"},
        "float_barriers": barriers,
    }
    del qmodel.metadata_props[:]
    for key, value in {**meta, "quantization": json.dumps(info)}.items():
        entry = qmodel.metadata_props.add()
        entry.key, entry.value = key, value
    qmodel.doc_string = f"{doc} [int8 backbone{' and head products' if head else ''}]"
    return save_atomic(qmodel, out)


def insert_float_barriers(model) -> int:
    """Keep the float head float in every runtime: ``Max(x, x)`` on each DequantizeLinear output
    that a head node reads. Returns how many were inserted.

    ``Max(x, x) == x`` exactly, and onnxruntime runs the head as it would without it. OpenVINO's
    low-precision transformations, however, move a dequantization (the ``(q - z) * s`` of a
    DequantizeLinear) forward through the precision-preserving ops that follow it (pooling,
    resize, concat, reshape, transpose, a subtraction of a constant) down to the next matrix
    product, which then runs in int8: measured on ELPV mono, that put PatchCore's
    nearest-neighbour distance (``||q||^2 - 2 q.m + ||m||^2``, which cancels to a small number) in
    int8 and dropped its image AUROC from 0.956 to 0.351. An elementwise maximum of two
    non-constant inputs is not one of the ops the transformations pass through, so the
    dequantization stops there and the head stays float (AUROC 0.956 again, as in onnxruntime).
    """
    from onnx import helper

    producers = {o: n for n in model.graph.node for o in n.output}
    barrier_of: dict[str, str] = {}
    for node in model.graph.node:
        if node.name.startswith(BACKBONE_PREFIX) or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            src = producers.get(name)
            if src is not None and src.op_type == "DequantizeLinear":
                barrier_of.setdefault(name, f"{name}/float_barrier")
                node.input[k] = barrier_of[name]
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for out in node.output:
            if out in barrier_of:
                nodes.append(helper.make_node("Max", [out, out], [barrier_of[out]],
                                              name=f"/float_barrier/{len(nodes)}"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(barrier_of)


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs a 'consider pre-processing' warning on the root logger; we
    pre-process ourselves (clean_graph), so it is silenced for the call."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def calibration_batch(scorer, images: Sequence, n: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """A seeded sample of ``n`` of ``images`` (arrays or paths), prepared for ``scorer``'s model."""
    if n < 1:
        raise SettingsError(f"the number of calibration images must be >= 1, got {n}")
    images = list(images)
    if not images:
        raise SettingsError("no calibration images")
    pick = np.sort(np.random.default_rng(seed).permutation(len(images))[: min(n, len(images))])
    return scorer.prepare([images[i] for i in pick])


def compare_scores(float_scores, int8_scores, labels: Iterable[int] | None = None,
                   threshold: float | None = None) -> dict:
    """Float vs int8 scores of the same images: deviations, verdict agreement, AUROC of each."""
    a = np.asarray(float_scores, dtype=np.float64)
    b = np.asarray(int8_scores, dtype=np.float64)
    rel = np.abs(b - a) / np.maximum(np.abs(a), 1e-12)
    result = {"images": int(len(a)), "max_rel_score_diff": float(rel.max()), "median_rel_score_diff":
              float(np.median(rel)), "spearman": float(_spearman(a, b))}
    if threshold is not None:
        result["verdicts_equal"] = int(((a > threshold) == (b > threshold)).sum())
    if labels is not None:
        from sklearn.metrics import roc_auc_score

        y = np.asarray(list(labels))
        if len(np.unique(y)) == 2:
            result["auroc_float"] = float(roc_auc_score(y, a))
            result["auroc_int8"] = float(roc_auc_score(y, b))
    return result


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return spearmanr(a, b).statistic if len(a) > 2 else float("nan")


def _held_out_split(detector, n_good: int) -> np.ndarray:
    """Indices (into the good training images) of the goods that ``Detector.fit`` held out to
    calibrate the thresholds: the same seeded draw (``detector.seed``, ``validation_fraction``)."""
    fraction = float(detector.fit_info_.get("validation_fraction", 0.0))
    n_val = int(round(fraction * n_good))
    if fraction > 0 and n_val < 1:
        n_val = 1
    rng = np.random.default_rng(getattr(detector, "seed", 0))
    return np.sort(rng.permutation(np.arange(n_good))[:n_val])


def _rank_thresholds(float_cal: np.ndarray, int8_cal: np.ndarray, values: dict[str, float]) -> dict[str, float]:
    """Every gaikan threshold is an order statistic of the calibration scores (max-good = the
    largest, quantile = an observed score, conformal = the k-th smallest): the int8 model's
    threshold of each method is the int8 score of the same rank."""
    float_cal, int8_cal = np.sort(float_cal), np.sort(int8_cal)
    out = {}
    for method, value in values.items():
        k = int(np.argmin(np.abs(float_cal - value)))
        out[method] = float(int8_cal[k])
    return out


def quantize_detector(detector, split, out, *, n_calibration: int = DEFAULT_CALIBRATION_IMAGES,
                      activations: str = "uint8", force: bool = False, threads: int = 0) -> dict:
    """Export ``detector`` (fitted, exportable) with an int8 backbone to ``out`` and compare it with
    the float export on ``split`` (the data set it was fitted on), in one go:

    1. the float graph is exported to a temporary file;
    2. calibration: a seeded sample of ``n_calibration`` good *training* images (not the held-out
       ones) sets the activation ranges; the backbone is quantized (``quantize_int8``);
    3. thresholds: the held-out good images that calibrated the float thresholds (the same seeded
       draw as ``Detector.fit``) are scored by both models; the float scores must reproduce the
       stored calibration scores (else the split is not the fit's and we refuse), and each
       threshold of the int8 model is the int8 score of the same rank (so max-good still gives no
       false alarm on its calibration set; the conformal guarantee still holds);
    4. the test images of ``split`` are scored by both models: score deviations, verdict agreement
       and image AUROC of each go into the int8 file's ``quantization`` metadata and are returned.
    """
    from gaikan.edge import EdgeScorer
    from gaikan.export.onnx_export import export_onnx

    out = Path(out)
    if out.exists() and not force:
        raise GaikanError(f"{out} already exists; use --force to replace it")
    train = split.train
    good = [img for img, lab in zip(train.images, train.labels) if lab == 0]
    if len(good) < 2:
        raise SettingsError(f"{split.spec}: too few good training images to calibrate the quantization")
    held = _held_out_split(detector, len(good))
    if len(held) == 0:
        raise SettingsError("this model was fitted without held-out good images (validation_fraction=0): its "
                            "thresholds cannot be re-calibrated for the int8 model")
    rest = np.setdiff1d(np.arange(len(good)), held)
    stored = np.sort(np.asarray(detector.calibration_scores_, dtype=np.float64))
    with tempfile.TemporaryDirectory(prefix="gaikan-int8-") as tmp:
        float_path = export_onnx(detector, Path(tmp) / "float.onnx")
        fmodel = EdgeScorer(float_path, threads=threads, batch_size=8, runtime="onnx")
        held_images = [good[i] for i in held]
        float_held, _ = fmodel.score(held_images)
        if len(float_held) != len(stored) or not np.allclose(np.sort(float_held), stored, rtol=1e-3, atol=1e-6):
            raise SettingsError(f"{split.spec} is not the data this model was fitted on (its held-out good images "
                                "do not give the stored calibration scores): quantize with the data given to "
                                "`gaikan fit` (--calibration DATA)")
        calibration = calibration_batch(fmodel, [good[i] for i in rest], n_calibration, seed=0)
        int8_path = quantize_int8(float_path, Path(tmp) / "int8.onnx", calibration, activations=activations,
                                  calibration_source=f"{len(calibration)} good training images of {split.spec} "
                                  "(seeded sample, none of the held-out calibration images)")
        qmodel = EdgeScorer(int8_path, threads=threads, batch_size=8, runtime="onnx")
        int8_held, _ = qmodel.score(held_images)
        values = dict(fmodel.thresholds)
        int8_values = _rank_thresholds(np.asarray(float_held), np.asarray(int8_held), values)
        method = fmodel.threshold_method or next(iter(values))
        check = {"data": split.spec}
        if len(split.test):
            fs, _ = fmodel.score(split.test.images)
            qs, _ = qmodel.score(split.test.images)
            check.update(compare_scores(fs, qs, split.test.labels if len(np.unique(split.test.labels)) == 2
                                        else None, fmodel.threshold))
        info = dict(qmodel.quantization)
        info["thresholds"] = {"float": values, "int8": int8_values,
                              "how": "int8 score of the same rank among the held-out good images"}
        info["check"] = check
        import onnx

        model = onnx.load(str(int8_path))
        props = {p.key: p.value for p in model.metadata_props}
        props.update({"quantization": json.dumps(info), "thresholds": json.dumps(int8_values),
                      "threshold": repr(float(int8_values[method])),
                      "calibration_scores": json.dumps([float(s) for s in np.sort(int8_held)])})
        del model.metadata_props[:]
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        save_atomic(model, out)
    return info
