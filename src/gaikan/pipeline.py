"""The jobs behind the CLI verbs, as library calls: fit a detector on a data spec, evaluate a
fitted detector, predict on files. The CLI, the benchmarks and the service call these; they hold
the I/O glue so that detectors and metrics stay pure.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from gaikan.data.datasets import DataSplit, ImageSet, load_data
from gaikan.data.inputs import SCORED, SKIPPED, UNREADABLE, scan_inputs, score_files
from gaikan.detectors.base import Detector, get_detector_class
from gaikan.errors import DataError, GaikanError
from gaikan.evaluation.metrics import Evaluation, evaluate_scores, spearman
from gaikan.io.model_io import prepare_output_dir, save_detector
from gaikan.progress import batches, track

RESULTS_CSV = "results.csv"
NG_LIST = "ng_list.txt"
# UNREADABLE and SKIPPED (imported above from gaikan.data.inputs) are the verdicts of files not scored


def set_threads(threads: int) -> None:
    """Let torch use ``threads`` CPU threads (intra-op) for the rest of the process; 0 leaves the default."""
    if threads < 0:
        raise GaikanError(f"threads must be >= 0, got {threads}")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


# ---- fit ----------------------------------------------------------------------------------------
def make_detector(name: str, options: dict[str, str] | None = None) -> Detector:
    return get_detector_class(name).from_options(options or {})


EVALUATION_ROWS = ("own", "supervised")


def load_evaluation_split(detector_or_class, spec: str, *, seed: int = 0, rows: str = "own") -> DataSplit:
    """The split to evaluate on: ``rows="own"`` the detector's own protocol (``load_split_for``);
    ``rows="supervised"`` the supervised protocol's split for any detector (ELPV: the ``split_sup ==
    test`` rows), so good-only detectors are scored on exactly the rows of the supervised ones. Its
    train set then also holds defects, which ``fit_detector`` drops for good-only detectors: they fit
    on the same good rows in both protocols."""
    if rows not in EVALUATION_ROWS:
        raise DataError(f"evaluation rows must be one of {', '.join(EVALUATION_ROWS)}, got {rows!r}")
    if rows == "supervised":
        return load_data(spec, supervised=True, seed=seed)
    return load_split_for(detector_or_class, spec, seed=seed)


def fit_detector(detector: Detector, split: DataSplit, *, validation_fraction: float = 0.1,
                 threshold_method: str = "max-good", false_alarm_rate: float | None = None,
                 engine=None) -> Detector:
    """Fit on the split's training images (labels passed to supervised detectors); ``engine``
    (gaikan.engine) runs the training work of the detectors that can share it out."""
    train = split.train
    keep = np.flatnonzero(train.labels >= 0)
    images = [train.images[i] for i in keep]
    labels = train.labels[keep]
    if getattr(detector, "uses_defects", False) and (labels != 0).any():
        # detectors that learn an embedding from defects too get one class per defect type: 1, 2, ...
        types = [train.defect_types[i] for i in keep]
        names = sorted({t for t, lab in zip(types, labels) if lab != 0})
        labels = np.array([0 if lab == 0 else 1 + names.index(t) for t, lab in zip(types, labels)], dtype=np.int64)
    elif not detector.supervised and (labels != 0).any():
        images = [img for img, lab in zip(images, labels) if lab == 0]
        labels = np.zeros(len(images), dtype=np.int64)
    detector.fit(images, labels, validation_fraction=validation_fraction, threshold_method=threshold_method,
                 false_alarm_rate=false_alarm_rate, engine=engine)
    detector.fit_info_["data"] = split.spec
    if engine is not None:
        detector.fit_info_["engine"] = {"name": engine.name, "workers": int(engine.workers)}
    return detector


def fit_auto(split: DataSplit, *, holdout: float = 0.3, budget: float = 5.0, seed: int = 0,
             overrides: dict | None = None, grid=None, validation_fraction: float = 0.1,
             threshold_method: str = "max-good", false_alarm_rate: float | None = None,
             progress=None) -> Detector:
    """``--detector auto``: select a detector and settings on the split's training images only
    (gaikan.auto), then fit the winner like any detector; the table goes into ``fit_info_``."""
    from gaikan.auto import DEFAULT_GRID, select_detector
    from gaikan.backbones.features import tap_cache

    train = split.train
    keep = np.flatnonzero(train.labels >= 0)
    with tap_cache():  # the final fit reuses the selection's backbone passes (same images, same size)
        det, selection = select_detector([train.images[i] for i in keep], train.labels[keep],
                                         grid=grid or DEFAULT_GRID, holdout=holdout, budget=budget, seed=seed,
                                         overrides=overrides, progress=progress)
        with tap_cache(add=False):
            fit_detector(det, split, validation_fraction=validation_fraction, threshold_method=threshold_method,
                         false_alarm_rate=false_alarm_rate)
    det.fit_info_["selection"] = selection.to_dict()
    return det


def load_split_for(detector_or_class, spec: str, *, seed: int = 0) -> DataSplit:
    """Load ``spec`` with the protocol the detector needs (ELPV ``split_sup`` for supervised ones and
    for those that use defective examples when there are some, ``uses_defects``)."""
    wants_defects = bool(detector_or_class.supervised or getattr(detector_or_class, "uses_defects", False))
    return load_data(spec, supervised=wants_defects, seed=seed)


# ---- evaluate -----------------------------------------------------------------------------------
@dataclass
class EvaluationRun:
    """An evaluation with its context; ``to_json`` gives the schema of ``gaikan evaluate --json``."""

    detector: str
    data: str
    evaluation: Evaluation
    seconds: float
    scores: np.ndarray
    labels: np.ndarray
    paths: list[str]
    maps: np.ndarray | None = None
    spearman_probability: float | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        ev = self.evaluation.to_dict()
        out = {
            "detector": self.detector,
            "data": self.data,
            "n_images": ev["n_images"],
            "image_auroc": ev["image_auroc"],
            "pixel_auroc": ev["pixel_auroc"],
            "aupro": ev["aupro"],
            "average_precision": ev["average_precision"],
            "f1_max": ev["f1_max"],
            "thresholds": ev["thresholds"],
            "threshold_method": ev["threshold_method"],
            "threshold": ev["threshold"],
            "confusion": ev["confusion"],
            "seconds": round(self.seconds, 3),
            "ms_per_image": round(1000 * self.seconds / max(len(self.scores), 1), 2),
            "spearman_probability": self.spearman_probability,
        }
        out.update({k: v for k, v in ev.items() if k not in out})
        out.update(self.extra)
        return out


def score_set(detector: Detector, images: Sequence[np.ndarray], *, chunk: int = 64,
              keep_maps: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Score many images in chunks (bounded memory); maps kept as float16 unless keep_maps=False."""
    scores, maps = [], []
    for sl in track(batches(len(images), chunk), f"{detector.name}: scoring", total=None):
        result = detector.score(list(images[sl]))
        scores.append(result.scores)
        if keep_maps and result.maps is not None:
            maps.append(result.maps.astype(np.float16))
    return np.concatenate(scores), (np.concatenate(maps) if maps else None)


def evaluate_detector(detector: Detector, split: DataSplit, *, report_dir: Path | None = None,
                      rows: ImageSet | None = None, projection: str = "pca") -> EvaluationRun:
    """Score the split's test images (or ``rows``) and compute every metric; plots into report_dir
    (for detectors with ``embed``/``history_`` also the embedding scatter, by ``projection``, and the
    loss curves)."""
    from gaikan.data.images import resize_mask

    test = rows if rows is not None else split.test
    keep = np.flatnonzero(test.labels >= 0)
    test = test.subset(keep)
    if len(np.unique(test.labels)) < 2:
        raise DataError(f"{split.spec}: evaluation needs good and defective test images, "
                        f"found only label {test.labels[0] if len(test) else 'none'}")
    start = time.perf_counter()
    scores, maps = score_set(detector, test.images)
    seconds = time.perf_counter() - start
    masks = None
    if test.has_masks and maps is not None and all(m is not None for m in test.masks):
        size = maps.shape[1:]
        masks = np.stack([resize_mask(m, size) for m in test.masks])
    thresholds = dict(detector.thresholds.values)
    evaluation = evaluate_scores(test.labels, scores, masks=masks,
                                 maps=None if masks is None else maps.astype(np.float32),
                                 thresholds=thresholds, threshold_method=detector.thresholds.default_method)
    rho = None
    if split.extra is not None and split.extra.probabilities is not None and test.probabilities is not None:
        extra_scores, _ = score_set(detector, split.extra.images, keep_maps=False)
        rho = spearman(np.concatenate([scores, extra_scores]),
                       np.concatenate([test.probabilities, split.extra.probabilities]))
    run = EvaluationRun(detector=detector.name, data=split.spec, evaluation=evaluation, seconds=seconds,
                        scores=scores, labels=test.labels, paths=test.paths, maps=maps, spearman_probability=rho)
    if report_dir is not None:
        write_report(run, detector, test, Path(report_dir), train=split.train, projection=projection)
    return run


def write_training_plots(detector: Detector, test: ImageSet, report_dir: Path, *, train: ImageSet | None = None,
                         projection: str = "pca", max_points: int = 2000) -> list[Path]:
    """Plots of the metric-learning detectors: ``embedding_train.png`` / ``embedding_test.png`` (2-D
    projection of ``detector.embed``, coloured by class; the test plot uses the train projection) and
    ``loss_curves.png`` (``detector.history_``: training and validation loss per epoch). Detectors
    without ``embed`` / ``history_`` get none. At most ``max_points`` images per set (seeded sample)."""
    from gaikan.evaluation import plots
    from gaikan.evaluation.embedding import project_2d

    written: list[Path] = []
    history = getattr(detector, "history_", None) or {}
    series = {("train" if k == "train_loss" else "validation" if k == "val_loss" else k): list(v)
              for k, v in history.items() if len(v)}
    if series:
        written.append(plots.plot_loss_curves(series, report_dir / "loss_curves.png", title=f"{detector.name}: loss"))
    if not callable(getattr(detector, "embed", None)):
        return written
    rng = np.random.default_rng(0)

    def sample(images_set: ImageSet) -> ImageSet:
        keep = np.flatnonzero(images_set.labels >= 0)
        if len(keep) > max_points:
            keep = np.sort(rng.choice(keep, max_points, replace=False))
        return images_set.subset(keep)

    test_s = sample(test)
    base = sample(train) if train is not None and len(train) else test_s
    emb_base = np.asarray(detector.embed(base.images), dtype=np.float64)
    emb_test = np.asarray(detector.embed(test_s.images), dtype=np.float64)
    p_base, p_test = project_2d(emb_base, emb_test, projection)
    how = "PCA" if projection == "pca" else "t-SNE"
    if train is not None and len(train):
        written.append(plots.plot_embedding_scatter(p_base, base.defect_types, report_dir / "embedding_train.png",
                                                    title=f"{detector.name}: training embeddings ({how})"))
    written.append(plots.plot_embedding_scatter(p_test, test_s.defect_types, report_dir / "embedding_test.png",
                                                title=f"{detector.name}: test embeddings ({how})"))
    return written


def write_report(run: EvaluationRun, detector: Detector, test: ImageSet, report_dir: Path, *,
                 train: ImageSet | None = None, projection: str = "pca") -> list[Path]:
    """The evaluation's plots (ROC, PR, histogram, confusion; embedding scatter and loss curves for
    metric-learning detectors, see ``write_training_plots``), its JSON and per-image scores."""
    from gaikan.evaluation import plots

    report_dir.mkdir(parents=True, exist_ok=True)
    ev = run.evaluation
    written = [
        plots.plot_roc(run.labels, run.scores, report_dir / "roc.png", title=f"{run.detector} on {run.data}"),
        plots.plot_pr(run.labels, run.scores, report_dir / "pr.png"),
        plots.plot_score_histogram(run.labels, run.scores, report_dir / "score_histogram.png",
                                   thresholds=ev.thresholds),
        plots.plot_confusion(ev.confusion, report_dir / "confusion.png"),
    ]
    written += write_training_plots(detector, test, report_dir, train=train, projection=projection)
    (report_dir / "metrics.json").write_text(json.dumps(run.to_json(), indent=2) + "\n")
    with open(report_dir / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score", "verdict"])
        for path, label, score in zip(run.paths, run.labels, run.scores):
            writer.writerow([path, int(label), f"{score:.6g}", "NG" if score > ev.threshold else "OK"])
    written += [report_dir / "metrics.json", report_dir / "scores.csv"]
    # report.html last: it embeds every PNG in report_dir, including plots added above
    written.append(write_html_report_for(run, detector, test, report_dir))
    return written


def write_html_report_for(run: EvaluationRun, detector: Detector, test: ImageSet, report_dir: Path) -> Path:
    """``report.html`` (self-contained) for an evaluation run; see gaikan.evaluation.report."""
    from collections import Counter

    from gaikan.evaluation.report import write_html_report

    types = Counter(test.defect_types) if getattr(test, "defect_types", None) else {}
    data_summary = {"data": run.data, "test images": len(run.labels), "good": int((run.labels == 0).sum()),
                    "defective": int((run.labels == 1).sum()),
                    "defect types": ", ".join(f"{k}: {v}" for k, v in sorted(types.items()) if k != "good") or "n/a",
                    "pixel masks": "yes" if test.has_masks else "no"}
    manifest = getattr(detector, "manifest_", None) or {}
    fit = getattr(detector, "fit_info_", {}) or {}
    model_summary = {"detector": detector.name,
                     "settings": ", ".join(f"{k}={v}" for k, v in detector.settings().items()),
                     "input size": "x".join(str(v) for v in detector.input_size),
                     "threshold": f"{detector.thresholds.default_method} = {detector.threshold:.6g}",
                     "calibration": f"{fit.get('n_calibration', '?')} {fit.get('calibrated_on', '')}".strip(),
                     "trained on": f"{fit.get('n_train', '?')} images of {fit.get('data', '?')}"}
    if manifest:
        from gaikan.io.model_io import model_id

        model_summary["model id"] = model_id(manifest)
        model_summary["saved"] = manifest.get("created", "?")
    return write_html_report(report_dir, metrics=run.to_json(), model_summary=model_summary,
                             data_summary=data_summary, labels=run.labels, scores=run.scores,
                             threshold=float(run.evaluation.threshold), images=test.images, maps=run.maps,
                             paths=run.paths, selection=fit.get("selection"))


# ---- predict ------------------------------------------------------------------------------------
@dataclass
class Prediction:
    path: str
    score: float | None
    verdict: str  # "OK", "NG", "UNREADABLE" or "SKIPPED" (error then holds the reason)
    threshold: float
    error: str = ""
    figure: str = ""
    p_value: float | None = None  # conformal p-value against the model's calibration scores


RUNTIMES = ("torch", "onnx", "openvino", "auto")


def load_scorer(model: str | Path, runtime: str = "torch", *, threads: int = 0):
    """What ``predict`` scores with: a saved model directory (runtime "torch"), an exported ``.onnx``
    file run by onnxruntime (runtime "onnx") or OpenVINO (runtime "openvino"), both through
    gaikan.export.runtime.OnnxDetector, or "auto": a model directory exported to ONNX in memory and run
    by onnxruntime where it exports, else torch."""
    if runtime == "torch":
        from gaikan.detectors.base import load_detector

        if Path(model).is_file() and Path(model).suffix.lower() == ".onnx":
            raise GaikanError(f"{model} is an ONNX file: use --runtime onnx to score with it")
        return load_detector(model)
    if runtime in ("onnx", "openvino"):
        from gaikan.export.runtime import OnnxDetector

        if Path(model).is_dir():
            raise GaikanError(f"{model} is a model directory; --runtime {runtime} takes the .onnx file written "
                              "by `gaikan export` (or use --runtime auto)")
        return OnnxDetector(model, threads=threads, runtime=runtime)
    if runtime == "auto":
        if Path(model).is_file() and Path(model).suffix.lower() == ".onnx":
            return load_scorer(model, "onnx", threads=threads)
        detector = load_scorer(model, "torch")
        data = exported_onnx(detector)
        return detector if data is None else onnx_scorer_from_bytes(data, threads=threads)
    raise GaikanError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def exported_onnx(detector) -> bytes | None:
    """The detector's whole scoring path as ONNX bytes (``gaikan export``), or None where it does not
    export (detectors without a scoring module, tiled models, onnx not installed)."""
    import tempfile

    try:
        from gaikan.export.onnx_export import export_onnx
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="gaikan-onnx-") as tmp:
        try:
            export_onnx(detector, Path(tmp) / "model.onnx")
        except (GaikanError, ImportError):
            return None
        return (Path(tmp) / "model.onnx").read_bytes()


def onnx_scorer_from_bytes(data: bytes, *, threads: int = 0):
    """An OnnxDetector for ONNX bytes (written to a temporary file that onnxruntime reads once)."""
    import tempfile

    from gaikan.export.runtime import OnnxDetector

    with tempfile.TemporaryDirectory(prefix="gaikan-onnx-") as tmp:
        (Path(tmp) / "model.onnx").write_bytes(data)
        return OnnxDetector(Path(tmp) / "model.onnx", threads=threads)


def expand_inputs(inputs: Sequence[str | Path], *, recursive: bool = False) -> list[Path]:
    """Files and folders -> the image paths to read (``gaikan.data.inputs.scan_inputs``'s PENDING rows);
    a batch job that must account for every file found uses ``scan_inputs`` itself."""
    return [Path(r.path) for r in scan_inputs(inputs, recursive=recursive).pending()]


def predict_files(detector: Detector, inputs: Sequence[str | Path], out_dir: Path, *, force: bool = False,
                  figures: bool = True, batch_size: int = 16, recursive: bool = False,
                  notes: list[str] | None = None) -> list[Prediction]:
    """Score image files with a loaded detector in this process; write results.csv, ng_list.txt and
    one figure per image into ``out_dir``. The same job as :func:`predict_with_engine` (same rows),
    scored here instead of on an engine."""

    def score(paths, names, fig_dir):
        predictions: list[Prediction] = []
        for sl in track(batches(len(paths), batch_size), "predict", total=None):
            predictions += score_paths(detector, paths[sl], names[sl], fig_dir, figures=figures)
        return predictions

    return _predict(inputs, out_dir, score, force=force, recursive=recursive, notes=notes,
                    threshold=float(detector.threshold))


def predict_with_engine(model: str | Path, inputs: Sequence[str | Path], out_dir: Path, *, engine,
                        runtime: str | None = None, threads: int = 0, force: bool = False, figures: bool = True,
                        batch_size: int = 16, recursive: bool = False,
                        notes: list[str] | None = None) -> list[Prediction]:
    """``gaikan predict``: the same results.csv, ng_list.txt and figures whichever engine scores
    (gaikan.engine: ``local`` in this process, ``ray`` on an actor pool). ``model`` is a model
    directory (or an .onnx file with runtime "onnx"); the engine loads it where it scores."""

    def score(paths, names, fig_dir):
        return engine.predict(model, paths, names, fig_dir, runtime=runtime, threads=threads, figures=figures,
                              batch_size=batch_size)

    return _predict(inputs, out_dir, score, force=force, recursive=recursive, notes=notes)


def _predict(inputs, out_dir: Path, score, *, force: bool, recursive: bool, notes: list[str] | None,
             threshold: float | None = None) -> list[Prediction]:
    """The one predict path: every file found gets a row (``gaikan.data.inputs``: scanning, reading,
    per-file errors): verdict OK / NG for a scored image, UNREADABLE (the error names the file and the
    problem: corrupt, truncated, too small, too large, ...) or SKIPPED (e.g. an unsupported file type),
    in input order; one bad file never stops the batch. ``recursive`` searches sub-folders; the
    one-line notes (e.g. sub-folders not searched) are appended to ``notes``. ``out_dir`` is written
    atomically: on a failure (a full disk) it is left as it was and a GaikanError says so.
    ``score(paths, figure names, fig_dir)`` scores the readable candidates (:func:`score_paths` on
    some engine) and returns one Prediction per path."""
    from gaikan.io.atomic import atomic_dir, check_output_dir

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite=force, what="results directory")
    scan = scan_inputs(inputs, recursive=recursive)
    if notes is not None:
        notes.extend(scan.notes)
    pending = [Path(r.path) for r in scan.pending()]
    with atomic_dir(out_dir, overwrite=force, what="results directory") as tmp:
        fig_dir = tmp / "figures"
        fig_dir.mkdir()
        scored = score(pending, figure_names(pending), fig_dir) if pending else []
        by_path = {p.path: p for p in scored}
        if len(scored) != len(pending) or set(by_path) != {str(p) for p in pending}:
            raise GaikanError(f"internal error: {len(pending)} files to score but {len(scored)} results")
        predictions = []
        for row in scan.rows:
            if row.status == SKIPPED or row.status == UNREADABLE:
                predictions.append(Prediction(row.path, None, row.status, float("nan"), error=row.reason))
            else:
                predictions.append(by_path[str(Path(row.path))])
        threshold = next((p.threshold for p in scored), threshold)
        for p in predictions:  # rows never scored carry the model's threshold like the others
            if p.score is None and threshold is not None:
                p.threshold = threshold
        write_predictions(predictions, tmp)
    return predictions


def figure_names(paths: Sequence[Path]) -> list[str]:
    """One unique figure name per input path, in input order (fixed before scoring, so that every
    engine names the figures alike whatever order its batches finish in)."""
    used: set[str] = set()
    return [_unique_name(Path(p).stem, used) for p in paths]


def score_paths(detector, paths: Sequence[Path], names: Sequence[str], fig_dir: Path | None, *,
                figures: bool = True) -> list[Prediction]:
    """Read, score and (optionally) draw one batch of files: one Prediction per path, in order;
    UNREADABLE with the error for a file that cannot be read or scored (gaikan.data.inputs.score_files:
    a failing batch is rescored image by image). The unit of work of every engine."""
    from gaikan.data.inputs import InputRow
    from gaikan.evaluation.plots import plot_inspection

    threshold = detector.threshold

    def score_fn(images):
        result = detector.score(images)
        return result.scores, result.maps

    outcomes = list(score_files([InputRow(str(p)) for p in paths], score_fn, batch_size=max(1, len(paths))))
    scored = [o.score for o in outcomes if o.status == SCORED]
    p_values = detector.p_values(np.asarray(scored, dtype=np.float64)) if scored else None
    predictions: list[Prediction] = []
    k = 0
    for out, name in zip(outcomes, names):
        if out.status != SCORED:
            predictions.append(Prediction(out.path, None, out.status, threshold, error=out.reason))
            continue
        verdict = "NG" if out.score > threshold else "OK"
        pred = Prediction(out.path, out.score, verdict, threshold,
                          p_value=None if p_values is None else float(p_values[k]))
        k += 1
        if figures and fig_dir is not None:
            amap = out.map
            hi = max(2.0 * threshold, float(amap.max())) if amap is not None else None
            plot_inspection(out.image, amap, Path(fig_dir) / f"{name}.png", threshold=threshold, score=out.score,
                            verdict=verdict, title=Path(out.path).name,
                            map_range=None if amap is None else (float(amap.min()), hi))
            pred.figure = f"figures/{name}.png"
        predictions.append(pred)
    return predictions


def write_predictions(predictions: Sequence[Prediction], out_dir: Path) -> None:
    with open(out_dir / RESULTS_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "verdict", "threshold", "error", "figure", "p_value"])
        for p in predictions:
            writer.writerow([p.path, "" if p.score is None else f"{p.score:.6g}", p.verdict, f"{p.threshold:.6g}",
                             p.error, p.figure, "" if p.p_value is None else f"{p.p_value:.6g}"])
    (out_dir / NG_LIST).write_text("".join(f"{p.path}\n" for p in predictions if p.verdict == "NG"))


def _unique_name(stem: str, used: set[str]) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:100] or "image"
    name, k = safe, 2
    while name in used:
        name, k = f"{safe}_{k}", k + 1
    used.add(name)
    return name

