"""``report.html``: one self-contained page (every image embedded as a base64 data URI, no external
file, script or font) that a quality engineer can hand over.

Sections (their ``id`` in brackets): data and model summary (``summary``), metrics table
(``metrics``), ROC and PR curves (``curves``), score histograms of good and defective parts with the
thresholds drawn (``histogram``), confusion matrix at the model's threshold (``confusion``), the
worst false alarms (``false-alarms``: the good parts with the highest scores) and the worst escapes
(``escapes``: the defective parts with the lowest scores), each as an inspection figure (image,
heat map, predicted mask, boundary), and every other PNG found in the report directory
(``other-figures``: e.g. loss curves or embedding scatters written by metric-learning detectors).

The pure part (:func:`worst_cases`, :func:`build_report_html`) takes numbers and PNG bytes; the
I/O edge (:func:`write_html_report`) reads the PNGs and writes the file.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["REPORT_HTML", "MAIN_FIGURES", "worst_cases", "build_report_html", "write_html_report"]

REPORT_HTML = "report.html"
#: the figures ``gaikan.pipeline.write_report`` writes, by report section
MAIN_FIGURES = {"roc.png": "curves", "pr.png": "curves", "score_histogram.png": "histogram",
                "confusion.png": "confusion"}
CASES_DIR = "cases"

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: .5rem 0 1rem; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; } .row { display: flex; flex-wrap: wrap; gap: 1rem; }
.row figure { flex: 1 1 45%; } .muted { color: #666; } .ng { color: #c62828; font-weight: bold; }
.ok { color: #2e7d32; font-weight: bold; }
"""


def worst_cases(labels, scores, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` good parts with the highest scores (worst false alarms, highest first)
    and of the ``k`` defective parts with the lowest scores (worst escapes, lowest first).
    Ties are broken by index (stable), so the choice is deterministic."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    good, bad = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    fa = good[np.argsort(-s[good], kind="stable")][:k]
    esc = bad[np.argsort(s[bad], kind="stable")][:k]
    return fa, esc


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.4g}"
    return str(v)


def _kv_table(rows: Mapping[str, object]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def _figure(png: bytes, caption: str, alt: str) -> str:
    return (f'<figure><img src="{_data_uri(png)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


_METRIC_ROWS = [
    ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR ≤ 0.3)"),
    ("average_precision", "average precision"), ("f1_max", "best F1"),
    ("detection_rate_at_1pct", "detection rate at 1 % false alarms"),
    ("detection_rate_at_5pct", "detection rate at 5 % false alarms"),
    ("spearman_probability", "Spearman ρ (score vs defect probability)"), ("ms_per_image", "scoring ms / image"),
]


def _selection_section(selection: Mapping) -> str:
    """The table ``--detector auto`` chose the model from (gaikan.auto.Selection.to_dict())."""
    head = ("<tr><th>candidate</th><th>image AUROC</th><th>pixel AUROC</th><th>seconds</th>"
            "<th>scoring ms / image</th><th>status</th></tr>")
    body = ""
    for row in selection.get("rows", []):
        chosen = row.get("label") == selection.get("chosen")
        cells = "".join(f"<td class='num'>{html.escape(_fmt(row.get(k)))}</td>"
                        for k in ("image_auroc", "pixel_auroc", "seconds", "score_ms"))
        mark = " <b>(chosen)</b>" if chosen else ""
        body += (f"<tr><td>{html.escape(str(row.get('label')))}{mark}</td>{cells}"
                 f"<td>{html.escape(str(row.get('status', '')))}</td></tr>")
    explain = (f"chosen by <code>--detector auto</code> from the training images only: fitted on "
               f"{selection.get('n_fit')} goods, checked on {selection.get('n_check_good')} held-out goods, "
               f"{selection.get('n_synthetic')} synthetic defects and {selection.get('n_real_defects')} real "
               f"defective training images; {_fmt(selection.get('seconds'))} s")
    return (f"<section id='selection'><h2>How this detector was chosen</h2><p class='muted'>{html.escape(explain)}"
            f"</p><table>{head}{body}</table></section>")


def build_report_html(*, metrics: Mapping, model_summary: Mapping, data_summary: Mapping,
                      figures: Mapping[str, bytes], false_alarms: Sequence[tuple[bytes, str]],
                      escapes: Sequence[tuple[bytes, str]], other_figures: Sequence[tuple[bytes, str]] = (),
                      title: str | None = None, selection: Mapping | None = None) -> str:
    """The HTML text. ``figures``: PNG bytes by name (``roc.png``, ``pr.png``, ``score_histogram.png``,
    ``confusion.png``); the case and other figures are (PNG bytes, caption) pairs."""
    detector, data = metrics.get("detector", "?"), metrics.get("data", "?")
    title = title or f"gaikan evaluation: {detector} on {data}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='muted'>written {html.escape(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by gaikan</p>"]

    parts.append("<section id='summary'><h2>Data and model</h2><div class='row'><div><h3>Data</h3>"
                 f"{_kv_table(data_summary)}</div><div><h3>Model</h3>{_kv_table(model_summary)}</div></div></section>")

    if selection:
        parts.append(_selection_section(selection))

    rows = {label: metrics.get(key) for key, label in _METRIC_ROWS if key in metrics}
    thresholds = metrics.get("thresholds", {}) or {}
    model_method = metrics.get("threshold_method")
    th_rows = "".join(
        f"<tr><td>{html.escape(str(m))}{' <b>(model)</b>' if m == model_method else ''}</td>"
        f"<td class='num'>{html.escape(_fmt(v))}</td></tr>" for m, v in thresholds.items())
    parts.append("<section id='metrics'><h2>Metrics</h2><div class='row'><div>"
                 + _kv_table(rows).replace("<td>", "<td class='num'>")
                 + "</div><div><table><tr><th>threshold method</th><th>value</th></tr>"
                 + th_rows + "</table></div></div></section>")

    def fig_or_missing(name: str, caption: str) -> str:
        return _figure(figures[name], caption, name) if name in figures else f"<p class='muted'>({name} missing)</p>"

    parts.append("<section id='curves'><h2>ROC and precision-recall curves</h2><div class='row'>"
                 + fig_or_missing("roc.png", "ROC curve (image level)")
                 + fig_or_missing("pr.png", "precision-recall curve (image level)") + "</div></section>")
    parts.append("<section id='histogram'><h2>Score histograms</h2>"
                 + fig_or_missing("score_histogram.png", "scores of good and defective parts, with the "
                                  "thresholds drawn") + "</section>")
    c = metrics.get("confusion", {}) or {}
    conf_table = ""
    if c:
        conf_table = ("<table><tr><th></th><th>verdict OK</th><th>verdict NG</th></tr>"
                      f"<tr><th>good part</th><td class='num'>{c.get('tn')}</td><td class='num'>{c.get('fp')}</td></tr>"
                      f"<tr><th>defective part</th><td class='num'>{c.get('fn')}</td>"
                      f"<td class='num'>{c.get('tp')}</td></tr></table>")
    parts.append(f"<section id='confusion'><h2>Confusion matrix at the model's threshold "
                 f"({html.escape(str(model_method))} = {html.escape(_fmt(metrics.get('threshold')))})</h2>"
                 f"<div class='row'><div>{conf_table}</div>"
                 + fig_or_missing("confusion.png", "confusion matrix") + "</div></section>")

    def cases(section: str, heading: str, explain: str, items) -> str:
        body = "".join(_figure(png, cap, cap) for png, cap in items) or "<p class='muted'>none</p>"
        return f"<section id='{section}'><h2>{heading}</h2><p class='muted'>{explain}</p>{body}</section>"

    parts.append(cases("false-alarms", "Worst false alarms",
                       "good parts with the highest scores (flagged NG if above the threshold)", false_alarms))
    parts.append(cases("escapes", "Worst escapes",
                       "defective parts with the lowest scores (missed if not above the threshold)", escapes))
    if other_figures:
        parts.append("<section id='other-figures'><h2>Other figures</h2>"
                     + "".join(_figure(png, cap, cap) for png, cap in other_figures) + "</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html_report(report_dir, *, metrics: Mapping, model_summary: Mapping, data_summary: Mapping,
                      labels, scores, threshold: float, images: Sequence[np.ndarray] | None = None,
                      maps: np.ndarray | None = None, paths: Sequence[str] | None = None,
                      n_cases: int = 3, selection: Mapping | None = None) -> Path:
    """Draw the worst-case figures into ``report_dir/cases/`` and write ``report_dir/report.html``.

    The main figures are read from ``report_dir`` (see :data:`MAIN_FIGURES`); every other ``*.png``
    in ``report_dir`` (and its subfolders, except ``cases/``) goes into "Other figures".
    """
    from gaikan.evaluation.plots import plot_inspection

    report_dir = Path(report_dir)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    fa_idx, esc_idx = worst_cases(labels, scores, n_cases)
    case_dir = report_dir / CASES_DIR
    case_dir.mkdir(parents=True, exist_ok=True)

    def draw(indices, prefix: str) -> list[tuple[bytes, str]]:
        out = []
        for rank, i in enumerate(indices, 1):
            s = float(scores[i])
            verdict = "NG" if s > threshold else "OK"
            name = paths[i] if paths is not None else f"image {i}"
            caption = f"#{rank}: {name}: score {s:.4g}, verdict {verdict} (threshold {threshold:.4g})"
            if images is None:
                continue
            amap = None if maps is None else np.asarray(maps[i], dtype=np.float32)
            path = case_dir / f"{prefix}_{rank}.png"
            hi = None if amap is None else (float(amap.min()), max(2.0 * threshold, float(amap.max())))
            plot_inspection(images[i], amap, path, threshold=threshold, score=s, verdict=verdict,
                            title=Path(str(name)).name, map_range=hi)
            out.append((path.read_bytes(), caption))
        return out

    false_alarms = draw(fa_idx, "false_alarm")
    escapes = draw(esc_idx, "escape")
    figures = {name: (report_dir / name).read_bytes() for name in MAIN_FIGURES if (report_dir / name).is_file()}
    others = [(p.read_bytes(), str(p.relative_to(report_dir)))
              for p in sorted(report_dir.rglob("*.png"))
              if p.relative_to(report_dir).parts[0] != CASES_DIR and p.name not in MAIN_FIGURES]
    text = build_report_html(metrics=metrics, model_summary=model_summary, data_summary=data_summary,
                             figures=figures, false_alarms=false_alarms, escapes=escapes, other_figures=others,
                             selection=selection)
    out = report_dir / REPORT_HTML
    out.write_text(text, encoding="utf-8")
    return out
