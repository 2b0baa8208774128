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
from gaikan.data.images import list_images, read_image
from gaikan.detectors.base import Detector, get_detector_class
from gaikan.errors import DataError, GaikanError, ImageReadError
from gaikan.evaluation.metrics import Evaluation, evaluate_scores, spearman
from gaikan.io.model_io import prepare_output_dir, save_detector
from gaikan.progress import batches, track

RESULTS_CSV = "results.csv"
NG_LIST = "ng_list.txt"
UNREADABLE = "UNREADABLE"


# ---- fit ----------------------------------------------------------------------------------------
def make_detector(name: str, options: dict[str, str] | None = None) -> Detector:
    return get_detector_class(name).from_options(options or {})


def fit_detector(detector: Detector, split: DataSplit, *, validation_fraction: float = 0.1,
                 threshold_method: str = "max-good", false_alarm_rate: float | None = None) -> Detector:
    """Fit on the split's training images (labels passed to supervised detectors)."""
    train = split.train
    keep = np.flatnonzero(train.labels >= 0)
    images = [train.images[i] for i in keep]
    labels = train.labels[keep]
    if not detector.supervised and (labels != 0).any():
        images = [img for img, lab in zip(images, labels) if lab == 0]
        labels = np.zeros(len(images), dtype=np.int64)
    detector.fit(images, labels, validation_fraction=validation_fraction, threshold_method=threshold_method,
                 false_alarm_rate=false_alarm_rate)
    detector.fit_info_["data"] = split.spec
    return detector


def load_split_for(detector_or_class, spec: str, *, seed: int = 0) -> DataSplit:
    """Load ``spec`` with the protocol the detector needs (ELPV ``split_sup`` for supervised ones)."""
    return load_data(spec, supervised=bool(detector_or_class.supervised), seed=seed)


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
                      rows: ImageSet | None = None) -> EvaluationRun:
    """Score the split's test images (or ``rows``) and compute every metric; plots into report_dir."""
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
        write_report(run, detector, test, Path(report_dir))
    return run


def write_report(run: EvaluationRun, detector: Detector, test: ImageSet, report_dir: Path) -> list[Path]:
    """The evaluation's plots (ROC, PR, histogram, confusion), its JSON and per-image scores."""
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
    (report_dir / "metrics.json").write_text(json.dumps(run.to_json(), indent=2) + "\n")
    with open(report_dir / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score", "verdict"])
        for path, label, score in zip(run.paths, run.labels, run.scores):
            writer.writerow([path, int(label), f"{score:.6g}", "NG" if score > ev.threshold else "OK"])
    written += [report_dir / "metrics.json", report_dir / "scores.csv"]
    return written


# ---- predict ------------------------------------------------------------------------------------
@dataclass
class Prediction:
    path: str
    score: float | None
    verdict: str  # "OK", "NG" or "UNREADABLE"
    threshold: float
    error: str = ""
    figure: str = ""
    p_value: float | None = None  # conformal p-value against the model's calibration scores


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files and folders (their images, not recursive) -> image paths; a missing path is an error."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise DataError(f"{p} contains no images")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"{p} does not exist")
    if not paths:
        raise DataError("no input images were given")
    return paths


def predict_files(detector: Detector, inputs: Sequence[str | Path], out_dir: Path, *, force: bool = False,
                  figures: bool = True, batch_size: int = 16) -> list[Prediction]:
    """Score image files; write results.csv, ng_list.txt and one figure per image into ``out_dir``.

    Unreadable files are listed with verdict UNREADABLE and their error; the rest are still scored.
    """
    from gaikan.evaluation.plots import plot_inspection

    paths = expand_inputs(inputs)
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, overwrite=force, what="results directory")
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    threshold = detector.threshold
    predictions: list[Prediction] = []
    used_names: set[str] = set()
    for sl in track(batches(len(paths), batch_size), "predict", total=None):
        readable, images = [], []
        for path in paths[sl]:
            try:
                images.append(read_image(path))
                readable.append(path)
            except ImageReadError as exc:
                predictions.append(Prediction(str(path), None, UNREADABLE, threshold, error=str(exc)))
        if not images:
            continue
        result = detector.score(images)
        p_values = detector.p_values(result.scores)
        for i, (path, image) in enumerate(zip(readable, images)):
            score = float(result.scores[i])
            verdict = "NG" if score > threshold else "OK"
            pred = Prediction(str(path), score, verdict, threshold,
                              p_value=None if p_values is None else float(p_values[i]))
            if figures:
                name = _unique_name(path.stem, used_names)
                amap = None if result.maps is None else result.maps[i]
                hi = max(2.0 * threshold, float(amap.max())) if amap is not None else None
                plot_inspection(image, amap, fig_dir / f"{name}.png", threshold=threshold, score=score,
                                verdict=verdict, title=path.name,
                                map_range=None if amap is None else (float(amap.min()), hi))
                pred.figure = f"figures/{name}.png"
            predictions.append(pred)
    order = {str(p): i for i, p in enumerate(paths)}
    predictions.sort(key=lambda p: order[p.path])
    write_predictions(predictions, out_dir)
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

