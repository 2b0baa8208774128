"""Evaluation: metrics (image/pixel ROC AUC, AUPRO, AP, F1, confusion), thresholds, plots.

Scores point one way (higher = more defective) and the verdict rule is NG iff score > threshold.
The plot functions live in :mod:`gaikan.evaluation.plots`; they are also reachable from here, but
matplotlib is imported only when one of them is first used.
"""

from gaikan.evaluation.metrics import (
    Confusion,
    Evaluation,
    aupro,
    average_precision,
    best_f1,
    confusion_at,
    detection_rate_at_false_alarm,
    evaluate_scores,
    image_auroc,
    pixel_auroc,
    pro_curve,
    resize_maps,
    spearman,
)
from gaikan.evaluation.thresholds import (
    THRESHOLD_METHODS,
    ThresholdMethod,
    compute_thresholds,
    conformal,
    conformal_p_value,
    f1_optimal,
    max_good,
    no_escape,
    quantile,
)

_PLOTS = {
    "plot_roc",
    "plot_pr",
    "plot_score_histogram",
    "plot_confusion",
    "plot_inspection",
    "inspection_figure",
    "plot_loss_curves",
    "plot_embedding_scatter",
}

__all__ = [
    "Confusion",
    "Evaluation",
    "aupro",
    "average_precision",
    "best_f1",
    "confusion_at",
    "detection_rate_at_false_alarm",
    "evaluate_scores",
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "resize_maps",
    "spearman",
    "THRESHOLD_METHODS",
    "ThresholdMethod",
    "compute_thresholds",
    "conformal",
    "conformal_p_value",
    "f1_optimal",
    "max_good",
    "no_escape",
    "quantile",
    *sorted(_PLOTS),
]


def __getattr__(name: str):
    if name in _PLOTS:
        from gaikan.evaluation import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'gaikan.evaluation' has no attribute {name!r}")
