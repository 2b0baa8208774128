"""Side-by-side comparison of several detectors (and named variants of one) on the same split:
the library behind ``gaikan compare`` and ``bench/metric_learning.py``.

Variants are written ``NAME[KEY=VALUE,KEY=VALUE]``, e.g. ``triplet[loss=cosine,anchor=mean]``; the
whole string is the variant's label in the table. A list separates variants with commas outside
brackets: ``"padim,triplet[loss=cosine,anchor=mean],triplet[loss=euclidean]"``. Options given as
``DETECTOR.KEY=VALUE`` (or ``LABEL.KEY=VALUE``) apply to every variant of that detector (or to that
variant); options in brackets win over them.

Rows: ``rows="auto"`` evaluates everyone on the supervised protocol's test rows as soon as one
detector is supervised (ELPV ``split_sup == test``), so supervised and good-only detectors are scored
on identical images; unsupervised detectors still fit on the good training images only (the same
good rows in both protocols). ``rows="own"`` gives each detector its own protocol, ``rows="supervised"``
forces the supervised rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from gaikan.detectors.base import Detector, get_detector_class
from gaikan.errors import GaikanError, SettingsError

ROWS = ("auto", "own", "supervised")


@dataclass
class Variant:
    """One column of a comparison: a detector name, its options and the label shown in tables."""

    label: str
    detector: str
    options: dict[str, str] = field(default_factory=dict)

    def make(self) -> Detector:
        return get_detector_class(self.detector).from_options(self.options)


@dataclass
class CompareRow:
    """One line of the comparison table (None where the run failed; ``error`` then says why)."""

    label: str
    detector: str
    options: dict[str, str]
    rows: str
    n_train: int | None = None
    n_test: int | None = None
    image_auroc: float | None = None
    accuracy: float | None = None
    threshold_method: str | None = None
    threshold: float | None = None
    f1_max: float | None = None
    fit_seconds: float | None = None
    ms_per_image: float | None = None
    latency_ms: float | None = None  # median of single-image scoring (batch 1), when asked for
    confusion: dict | None = None
    error: str = ""


def split_variants(text: str) -> list[str]:
    """Split ``"a,b[x=1,y=2],c"`` at the commas outside brackets; refuses unbalanced brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SettingsError(f"--detectors {text!r}: ']' without '['")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise SettingsError(f"--detectors {text!r}: '[' without ']'")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_variant(text: str) -> Variant:
    """``"triplet[loss=cosine,anchor=mean]"`` -> Variant(label=text, detector="triplet", options=...)."""
    text = text.strip()
    name, bracket, rest = text.partition("[")
    name = name.strip()
    options: dict[str, str] = {}
    if bracket:
        if not rest.endswith("]"):
            raise SettingsError(f"detector variant {text!r}: expected NAME[KEY=VALUE,...]")
        for item in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise SettingsError(f"detector variant {text!r}: {item!r} is not KEY=VALUE")
            options[key.strip().replace("-", "_")] = value.strip()
    if not name:
        raise SettingsError(f"detector variant {text!r} names no detector")
    return Variant(label=text, detector=name, options=options)


def parse_variants(text: str, options: dict[str, str] | None = None) -> list[Variant]:
    """The variants of a ``--detectors`` list, with ``DETECTOR.KEY=VALUE`` options merged in (bracket
    options win). Every variant is built once here, so unknown detectors and settings fail early."""
    variants = [parse_variant(p) for p in split_variants(text)]
    if not variants:
        raise SettingsError("--detectors names no detector")
    labels = [v.label for v in variants]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise SettingsError(f"--detectors lists {', '.join(dupes)} more than once")
    scoped: dict[str, dict[str, str]] = {}
    for key, value in (options or {}).items():
        target, dot, setting = key.rpartition(".")
        if not dot or not target:
            raise SettingsError(f"--option {key}={value}: expected DETECTOR.KEY=VALUE in compare")
        scoped.setdefault(target, {})[setting.replace("-", "_")] = value
    known = {v.detector for v in variants} | set(labels)
    unknown = sorted(set(scoped) - known)
    if unknown:
        raise SettingsError(f"--option for {', '.join(unknown)}, which is not among --detectors ({', '.join(labels)})")
    for v in variants:
        merged = {**scoped.get(v.detector, {}), **scoped.get(v.label, {}), **v.options}
        v.options = merged
        v.make()  # validates the detector name and every setting
    return variants


def compare_detectors(spec: str, variants: Sequence[Variant], *, rows: str = "auto", seed: int = 0,
                      validation_fraction: float = 0.1, threshold_method: str = "max-good",
                      models_dir: Path | None = None, on_result=None, latency_images: int = 0) -> list[CompareRow]:
    """Fit and evaluate every variant on ``spec``; one CompareRow each (a failed run keeps its error).

    ``models_dir``: also save each fitted model there (one folder per variant). ``on_result`` is
    called with each row as soon as it is done (progress output). ``latency_images`` > 0: also time
    scoring one image at a time on that many test images (after one warm-up) and report the median.
    """
    from gaikan import pipeline
    from gaikan.data.datasets import load_data

    if rows not in ROWS:
        raise SettingsError(f"rows must be one of {', '.join(ROWS)}, got {rows!r}")
    detectors = [v.make() for v in variants]
    any_supervised = any(_learns_from_defects(d) for d in detectors)
    splits: dict[bool, object] = {}
    results = []
    for variant, det in zip(variants, detectors):
        sup_rows = rows == "supervised" or (rows == "auto" and any_supervised) or _learns_from_defects(det)
        row = CompareRow(label=variant.label, detector=variant.detector, options=dict(variant.options),
                         rows="supervised" if sup_rows else "own")
        if sup_rows not in splits:
            splits[sup_rows] = load_data(spec, supervised=sup_rows, seed=seed)
        split = splits[sup_rows]
        try:
            start = time.perf_counter()
            pipeline.fit_detector(det, split, validation_fraction=validation_fraction,
                                  threshold_method=threshold_method)
            row.fit_seconds = round(time.perf_counter() - start, 2)
            det.fit_info_["seconds"] = row.fit_seconds
            run = pipeline.evaluate_detector(det, split)
            out = run.to_json()
            row.n_train = int(det.fit_info_["n_train"])
            row.n_test = int(out["n_images"])
            row.image_auroc = out["image_auroc"]
            row.accuracy = out["confusion"].get("accuracy")
            row.threshold_method = out["threshold_method"]
            row.threshold = out["threshold"]
            row.f1_max = out["f1_max"]
            row.ms_per_image = out["ms_per_image"]
            row.confusion = {k: out["confusion"][k] for k in ("tn", "fp", "fn", "tp")}
            if latency_images > 0:
                row.latency_ms = round(_latency_ms(det, split.test.images, latency_images), 2)
            if models_dir is not None:
                det.save(Path(models_dir) / _safe(variant.label))
        except GaikanError as exc:
            row.error = str(exc)
        results.append(row)
        if on_result is not None:
            on_result(row)
    return results


def _learns_from_defects(det: Detector) -> bool:
    return bool(det.supervised or getattr(det, "uses_defects", False))


def _latency_ms(det: Detector, images: Sequence[np.ndarray], n: int) -> float:
    det.score([images[0]])  # warm-up
    times = []
    for img in list(images)[:n]:
        start = time.perf_counter()
        det.score([img])
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)[:120]


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_COLUMNS = ("variant", "image AUROC", "accuracy at threshold", "fit s", "ms/image", "train", "test rows")


def table_rows(results: Sequence[CompareRow]) -> list[list[str]]:
    return [[r.label, _fmt(r.image_auroc), _fmt(r.accuracy, 3), _fmt(r.fit_seconds, 1), _fmt(r.ms_per_image, 1),
             _fmt(r.n_train), f"{_fmt(r.n_test)} ({r.rows})" if not r.error else f"failed: {r.error}"]
            for r in results]


def markdown_table(results: Sequence[CompareRow], title: str = "") -> str:
    lines = [title, ""] if title else []
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(TABLE_COLUMNS))
    for cells in table_rows(results):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(results: Sequence[CompareRow], out_dir: Path, *, spec: str, meta: dict | None = None
                     ) -> tuple[Path, Path]:
    """``compare.json`` (every field of every row + ``meta``) and ``compare.md`` (the table) in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"data": spec, **(meta or {}), "results": [asdict(r) for r in results]}
    json_path, md_path = out_dir / "compare.json", out_dir / "compare.md"
    json_path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    md_path.write_text(markdown_table(results, title=f"Detectors compared on `{spec}`"))
    return json_path, md_path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
