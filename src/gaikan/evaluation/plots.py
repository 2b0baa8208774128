"""Figures for reports and ``gaikan predict``: each function writes one PNG and returns its path.

Rendering is headless with the Agg backend. We build ``matplotlib.figure.Figure`` objects and render
them with ``FigureCanvasAgg`` directly instead of going through ``pyplot``: that needs no global
backend switch (so importing gaikan never changes a Jupyter user's backend), keeps no figure in a
global registry (nothing to leak or close), and is safe from the threads of the inspection service,
which pyplot is not.

Every ``*_figure`` builder returns the Figure (for tests or embedding); the ``plot_*`` functions
save it to ``path`` (a file path, parent folders created, or a binary file object).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Mapping, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gaikan.evaluation.metrics import Confusion, _as_labels, _as_scores

PathLike = Union[str, os.PathLike, IO[bytes]]

__all__ = [
    "plot_roc",
    "plot_pr",
    "plot_score_histogram",
    "plot_confusion",
    "plot_inspection",
    "inspection_figure",
    "plot_loss_curves",
    "plot_embedding_scatter",
]

_DPI = 100
_LINE_STYLES = ["--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> PathLike:
    if isinstance(path, (str, os.PathLike)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    fig.clear()
    return path


def _labelled(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(labels, allow_unknown=True)
    s = _as_scores(scores)
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    keep = y != -1
    return y[keep], s[keep]


# ------------------------------------------------------------------------------------------------
# score-level plots
# ------------------------------------------------------------------------------------------------
def plot_roc(labels, scores, path: PathLike, title: str = "ROC curve (image level)") -> PathLike:
    """ROC curve (detection rate vs false-alarm rate) with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = _labelled(labels, scores)
    fpr, tpr, _ = roc_curve(y, s)
    auc = roc_auc_score(y, s)
    fig = _new_figure(5, 5)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls="--", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-alarm rate (good flagged NG)",
           ylabel="detection rate (defects flagged NG)", title=title)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_pr(labels, scores, path: PathLike, title: str = "Precision-recall (image level)") -> PathLike:
    """Precision-recall curve with the average precision and the defect prevalence."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, s = _labelled(labels, scores)
    precision, recall, _ = precision_recall_curve(y, s)
    ap = average_precision_score(y, s)
    fig = _new_figure(5, 5)
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", lw=2, label=f"AP = {ap:.4f}")
    ax.axhline(y.mean(), color="gray", lw=1, ls="--", label=f"prevalence = {y.mean():.3f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (detection rate)", ylabel="precision",
           title=title)
    ax.legend(loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_score_histogram(
    labels,
    scores,
    path: PathLike,
    thresholds: Mapping[str, float] | None = None,
    title: str = "Image scores",
) -> PathLike:
    """Histograms of good and defective scores on shared bins, with labelled threshold lines.

    Rows labelled -1 (unknown) are drawn as a third, outlined histogram when present.
    """
    y = _as_labels(labels, allow_unknown=True)
    s = _as_scores(scores)
    if len(y) != len(s):
        raise ValueError(f"{len(y)} labels but {len(s)} scores")
    values = [float(v) for v in (thresholds or {}).values()]
    lo = min([float(s.min())] + values) if s.size else 0.0
    hi = max([float(s.max())] + values) if s.size else 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    fig = _new_figure(7, 4.5)
    ax = fig.add_subplot()
    for lab, name, color in ((0, "good (OK)", "tab:green"), (1, "defective (NG)", "tab:red")):
        part = s[y == lab]
        if part.size:
            ax.hist(part, bins=bins, alpha=0.55, color=color, label=f"{name}  n={part.size}")
    unknown = s[y == -1]
    if unknown.size:
        ax.hist(unknown, bins=bins, histtype="step", color="gray", label=f"unlabelled  n={unknown.size}")
    for i, (name, value) in enumerate((thresholds or {}).items()):
        ax.axvline(float(value), color=f"C{(i + 4) % 10}", lw=1.5, ls=_LINE_STYLES[i % len(_LINE_STYLES)],
                   label=f"{name} = {float(value):.4g}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="score (higher = more defective; NG iff score > threshold)", ylabel="images",
           title=title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(confusion: Confusion, path: PathLike, title: str | None = None) -> PathLike:
    """The 2x2 confusion matrix (rows true OK/NG, columns predicted OK/NG) with counts and rates."""
    mat = confusion.as_matrix()
    fig = _new_figure(4.5, 4)
    ax = fig.add_subplot()
    row_tot = mat.sum(axis=1, keepdims=True)
    frac = np.divide(mat, row_tot, out=np.zeros(mat.shape), where=row_tot > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{mat[i, j]}\n({frac[i, j]:.1%})", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=12)
    ax.set_xticks([0, 1], ["OK", "NG"])
    ax.set_yticks([0, 1], ["OK", "NG"])
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title or f"accuracy {confusion.accuracy:.3f}  F1 {confusion.f1:.3f}")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# per-image inspection figure
# ------------------------------------------------------------------------------------------------
def _display_image(image: np.ndarray) -> tuple[np.ndarray, dict]:
    """The image ready for imshow (gray or RGB in [0, 1]) and the imshow keyword arguments."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"image has shape {np.asarray(image).shape}, expected (H, W) or (H, W, 1|3|4)")
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    elif np.issubdtype(img.dtype, np.integer):
        out = img.astype(np.float32) / max(1.0, float(np.iinfo(img.dtype).max))
    else:
        out = img.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:  # not a [0, 1] image: stretch for display
            out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if out.ndim == 2 else {}
    return np.clip(out, 0.0, 1.0), kwargs


def _resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    if amap.ndim != 2:
        raise ValueError(f"anomaly map has shape {np.asarray(anomaly_map).shape}, expected (H, W)")
    if amap.shape == tuple(size):
        return amap
    h, w = size
    return np.asarray(Image.fromarray(np.ascontiguousarray(amap)).resize((w, h), Image.BILINEAR))


def inspection_figure(
    image: np.ndarray,
    anomaly_map: np.ndarray | None,
    *,
    threshold: float,
    score: float,
    verdict: str,
    title: str | None = None,
    map_range: tuple[float, float] | None = None,
    map_threshold: float | None = None,
) -> Figure:
    """The figure of :func:`plot_inspection` (4 panels + colour bar, or 1 panel without a map)."""
    img, img_kw = _display_image(image)
    h, w = img.shape[:2]
    verdict = str(verdict)
    color = "tab:red" if verdict.upper() == "NG" else "tab:green"
    headline = f"{verdict}   score {float(score):.4g}   threshold {float(threshold):.4g}"
    if anomaly_map is None:
        fig = _new_figure(4.5, 4.8)
        ax = fig.add_subplot()
        ax.imshow(img, **img_kw)
        ax.set_title("image")
        ax.axis("off")
    else:
        amap = _resize_map(anomaly_map, (h, w))
        t_map = float(threshold if map_threshold is None else map_threshold)
        vmin, vmax = map_range if map_range is not None else (float(amap.min()), float(amap.max()))
        if vmax <= vmin:
            vmax = vmin + 1e-6
        mask = amap > t_map
        fig = _new_figure(16, 4.6)
        axes = fig.subplots(1, 4)
        axes[0].imshow(img, **img_kw)
        axes[0].set_title("image")
        heat = axes[1].imshow(amap, cmap="jet", vmin=vmin, vmax=vmax)
        axes[1].set_title("anomaly map")
        cbar = fig.colorbar(heat, ax=axes[1], fraction=0.046, pad=0.04)
        if vmin <= t_map <= vmax:
            cbar.ax.axhline(t_map, color="white", lw=2)
            cbar.ax.axhline(t_map, color="black", lw=1, ls="--")
        axes[2].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title(f"predicted mask (map > {t_map:.4g})")
        axes[3].imshow(img, **img_kw)
        if mask.any() and not mask.all():
            fill = np.zeros((h, w, 4), dtype=np.float32)
            fill[mask] = (1.0, 0.0, 0.0, 0.25)
            axes[3].imshow(fill)
            axes[3].contour(mask.astype(np.float32), levels=[0.5], colors="red", linewidths=1.5)
        elif mask.all():
            axes[3].patch.set_edgecolor("red")
        axes[3].set_title("defect boundary")
        for ax in axes:
            ax.axis("off")
    fig.suptitle(headline if title is None else f"{title}\n{headline}", color=color,
                 fontsize=12, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_inspection(
    image: np.ndarray,
    anomaly_map: np.ndarray | None,
    path: PathLike,
    *,
    threshold: float,
    score: float,
    verdict: str,
    title: str | None = None,
    map_range: tuple[float, float] | None = None,
    map_threshold: float | None = None,
) -> PathLike:
    """One figure per inspected image: image | heat map + colour bar | predicted mask | boundary.

    image: (H, W) or (H, W, 1|3|4), uint8 or float. anomaly_map: (h, w) at any size (resized
    bilinearly to the image size) or None for detectors without maps (then only the image is drawn,
    with the score and verdict). The predicted mask is ``map > map_threshold`` (default
    ``threshold``, right when the image score is the map maximum); the boundary of that mask is drawn
    on the image. ``map_range`` fixes the colour scale (vmin, vmax) so several figures compare.
    """
    fig = inspection_figure(image, anomaly_map, threshold=threshold, score=score, verdict=verdict,
                            title=title, map_range=map_range, map_threshold=map_threshold)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# training plots (metric-learning detectors)
# ------------------------------------------------------------------------------------------------
def plot_loss_curves(history: Mapping[str, Sequence[float]], path: PathLike,
                     title: str = "Training") -> PathLike:
    """One line per series in ``history`` (e.g. ``{"train": [...], "val": [...]}``) against epoch 1..n."""
    fig = _new_figure(6, 4)
    ax = fig.add_subplot()
    for name, values in history.items():
        v = np.asarray(values, dtype=np.float64)
        if v.size:
            ax.plot(np.arange(1, v.size + 1), v, marker="o" if v.size <= 30 else None, ms=3, label=name)
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    if history:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _class_name(c, class_names) -> str:
    if class_names is None:
        return str(c)
    if isinstance(class_names, Mapping):
        return str(class_names.get(c, c))
    if np.issubdtype(np.asarray(c).dtype, np.integer) and 0 <= int(c) < len(class_names):
        return str(class_names[int(c)])
    return str(c)


def plot_embedding_scatter(
    points2d,
    labels,
    path: PathLike,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    title: str = "Embedding (2-D projection)",
) -> PathLike:
    """Scatter of 2-D embedding points (e.g. PCA of the metric-learning embeddings), one colour per class."""
    pts = np.asarray(points2d, dtype=np.float64)
    lab = np.asarray(labels)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points2d must be (N, 2), got {pts.shape}")
    if len(lab) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(lab)} labels")
    fig = _new_figure(6, 5.5)
    ax = fig.add_subplot()
    for i, c in enumerate(np.unique(lab)):
        name = _class_name(c, class_names)
        sel = lab == c
        ax.scatter(pts[sel, 0], pts[sel, 1], s=12, alpha=0.7, color=f"C{i % 10}",
                   label=f"{name} ({sel.sum()})")
    ax.set(xlabel="component 1", ylabel="component 2", title=title)
    ax.legend(fontsize="small", markerscale=1.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
