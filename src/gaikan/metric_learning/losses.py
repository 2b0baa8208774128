"""Distances and losses for metric learning (formulas in docs/metric_learning.md).

Distances between embeddings (rows of a and b, shape (B, D)), all torch, differentiable:

* ``euclidean``:    d(a, b) = ||a - b||_2^2                         (squared, as in FaceNet)
* ``cosine``:       d(a, b) = 1 - <a, b> / (||a|| ||b||)             in [0, 2]
* ``higher-order``: d(a, b) = sqrt(D) * ||a - b||_4^2 = sqrt(D * sum_i (a_i - b_i)^4)

The higher-order distance equals the squared Euclidean one when the difference is spread evenly over
the D components and grows up to sqrt(D) times larger when the same energy sits in one component
(||d||_4^2 lies between ||d||_2^2 / sqrt(D) and ||d||_2^2), so a strong local difference counts
more than a weak spread one.

Losses:

* contrastive (Hadsell, Chopra & LeCun, CVPR 2006), with the Euclidean distance e = ||a - b||_2:
  L = mean( y e^2 + (1 - y) max(0, m - e)^2 ) / 2, y = 1 for a same-class pair.
* triplet (Schroff et al., FaceNet, CVPR 2015): L = mean( max(0, d(a, p) - d(a, n) + m) ),
  margin m = 1.0 for ``euclidean`` and ``higher-order``, 0.4 for ``cosine``.
* hypersphere (after CFA, Lee et al., IEEE Access 2022, with true negatives): good embeddings g are
  pulled inside the sphere of radius r around their centre c, negatives n pushed beyond r^2 + m:
  L = mean( max(0, ||g - c_g||^2 - r^2) ) + mean( max(0, r^2 + m - ||n - c_n||^2) ).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from gaikan.errors import SettingsError

DISTANCES = ("euclidean", "cosine", "higher-order")
DEFAULT_MARGIN = {"euclidean": 1.0, "cosine": 0.4, "higher-order": 1.0}


def _check(kind: str) -> None:
    if kind not in DISTANCES:
        raise SettingsError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")


def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "euclidean") -> torch.Tensor:
    """Row-wise distances between a (B, D) and b (B, D) -> (B,)."""
    _check(kind)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    diff = a - b
    if kind == "euclidean":
        return diff.square().sum(-1)
    return (diff.square().square().sum(-1) * diff.shape[-1]).clamp_min(1e-12).sqrt()


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, kind: str = "euclidean") -> torch.Tensor:
    """All distances between rows of a (A, D) and rows of b (B, D) -> (A, B)."""
    _check(kind)
    if kind == "cosine":
        return 1.0 - F.normalize(a, dim=-1, eps=1e-8) @ F.normalize(b, dim=-1, eps=1e-8).T
    if kind == "euclidean":
        d = a.square().sum(-1)[:, None] + b.square().sum(-1)[None, :] - 2.0 * a @ b.T
        return d.clamp_min(0.0)
    diff = a[:, None, :] - b[None, :, :]
    return (diff.square().square().sum(-1) * a.shape[-1]).clamp_min(1e-12).sqrt()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Hadsell et al. 2006: mean(y e^2 + (1 - y) max(0, m - e)^2) / 2 with e = ||a - b||_2."""
    e = (a - b).square().sum(-1).clamp_min(1e-12).sqrt()
    y = same.to(a.dtype)
    return 0.5 * (y * e.square() + (1.0 - y) * F.relu(margin - e).square()).mean()


def triplet_from_distances(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float) -> torch.Tensor:
    return F.relu(d_ap - d_an + margin).mean()


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, kind: str = "euclidean",
                 margin: float | None = None) -> torch.Tensor:
    """FaceNet triplet loss mean(max(0, d(a, p) - d(a, n) + m)) with the chosen distance."""
    m = DEFAULT_MARGIN[kind] if margin is None else float(margin)
    return triplet_from_distances(distance(anchor, positive, kind), distance(anchor, negative, kind), m)


def hypersphere_loss(good: torch.Tensor, good_centres: torch.Tensor, negative: torch.Tensor,
                     negative_centres: torch.Tensor, radius: float = 0.5, margin: float = 1.0) -> torch.Tensor:
    """CFA-like attraction / repulsion: mean(max(0, ||g - c||^2 - r^2)) + mean(max(0, r^2 + m - ||n - c||^2))."""
    r2 = float(radius) ** 2
    attract = F.relu((good - good_centres).square().sum(-1) - r2).mean()
    repel = F.relu(r2 + float(margin) - (negative - negative_centres).square().sum(-1)).mean()
    return attract + repel


def default_margin(kind: str) -> float:
    _check(kind)
    return DEFAULT_MARGIN[kind]


__all__ = ["DISTANCES", "distance", "pairwise_distance", "contrastive_loss", "triplet_loss",
           "triplet_from_distances", "hypersphere_loss", "default_margin"]
