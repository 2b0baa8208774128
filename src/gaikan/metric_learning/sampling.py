"""Training data for metric learning: classes, synthetic negatives, pairs, triplets and online mining.

Everything works on integer class ids per training item (0 = good; each defect type, or each digit,
its own id) and returns index arrays into the item list, so images are never copied per pair.

Anchors: ``random`` — any item; ``mean`` — the mean image of the anchor's class (the mean good image
for good anchors), appended to the item pool by :func:`add_class_means` so that it is just one more
index.

Online mining works on a distance matrix between anchors (rows) and batch items (columns):
``batch-hard`` (Hermans et al., "In Defense of the Triplet Loss", 2017) takes, for each anchor, the
farthest positive and the nearest negative; ``semi-hard`` (Schroff et al., FaceNet, 2015) takes, for
every anchor-positive pair, the nearest negative that is still farther than the positive (the farthest
negative when none is).
"""

from __future__ import annotations

import numpy as np
import torch

from gaikan.errors import SettingsError

ANCHORS = ("random", "mean")
MINING = ("none", "batch-hard", "semi-hard")


def synthetic_negatives(good: np.ndarray, n: int, rng: np.random.Generator, *, scale: float = 1.0,
                        min_area: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """``n`` defective images made from random good images (N, H, W) in [0, 1] by gaikan.data.synthetic.

    Returns (images (n, H, W) float32, classes (n,) int64): 1 + the index of the defect kind in
    ``DEFECT_KINDS`` (scratch 1, spot 2, cut-and-paste 3), so each kind is its own class.
    """
    from gaikan.data.synthetic import DEFECT_KINDS, _random_defect

    out = np.empty((n,) + good.shape[1:], dtype=np.float32)
    classes = np.empty(n, dtype=np.int64)
    picks = rng.integers(0, len(good), size=n)
    for k, i in enumerate(picks):
        img, _, kind = _random_defect(good[i], rng, scale, min_area)
        out[k] = img
        classes[k] = 1 + DEFECT_KINDS.index(kind)
    return out, classes


def class_means(x: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean item of each class: (K, ...) means and the (K,) sorted class ids."""
    ids = np.unique(classes)
    return np.stack([x[classes == c].mean(axis=0) for c in ids]).astype(x.dtype, copy=False), ids


def add_class_means(x: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """The pool ``x`` followed by the class means; returns it and {class id: index of its mean}."""
    means, ids = class_means(x, classes)
    pool = np.concatenate([x, means])
    return pool, {int(c): len(x) + k for k, c in enumerate(ids)}


def _by_class(classes: np.ndarray) -> dict[int, np.ndarray]:
    return {int(c): np.flatnonzero(classes == c) for c in np.unique(classes)}


def _other_class_items(classes: np.ndarray, anchor_classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each anchor class, one random item of a different class (vectorised by rejection)."""
    n = len(anchor_classes)
    out = rng.integers(0, len(classes), size=n)
    bad = classes[out] == anchor_classes
    for _ in range(100):
        if not bad.any():
            break
        out[bad] = rng.integers(0, len(classes), size=int(bad.sum()))
        bad = classes[out] == anchor_classes
    if bad.any():
        raise SettingsError("training data hold a single class: negatives need a second class")
    return out


def _same_class_items(classes: np.ndarray, anchors: np.ndarray, rng: np.random.Generator,
                      groups: dict[int, np.ndarray], exclude_self: bool) -> np.ndarray:
    out = np.empty(len(anchors), dtype=np.int64)
    for c, members in groups.items():
        sel = np.flatnonzero(classes[anchors] == c)
        if not len(sel):
            continue
        pick = rng.integers(0, len(members), size=len(sel))
        if exclude_self and len(members) > 1:
            clash = members[pick] == anchors[sel]
            pick[clash] = (pick[clash] + 1 + rng.integers(0, len(members) - 1, size=int(clash.sum()))) % len(members)
        out[sel] = members[pick]
    return out


def sample_pairs(classes: np.ndarray, n: int, rng: np.random.Generator, *,
                 mean_index: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` pairs (i, j, same), half same-class, half different-class.

    i is a random item, or the mean of its class when ``mean_index`` (from :func:`add_class_means`)
    is given; j is another item of the same class (same = 1) or of another class (same = 0).
    """
    classes = np.asarray(classes)
    groups = _by_class(classes)
    if len(groups) < 2:
        raise SettingsError("pairs need at least two classes (good and defective)")
    first = rng.integers(0, len(classes), size=n)
    same = (np.arange(n) % 2 == 0).astype(np.int64)
    rng.shuffle(same)
    second = np.where(same == 1, _same_class_items(classes, first, rng, groups, mean_index is None),
                      _other_class_items(classes, classes[first], rng))
    if mean_index is not None:
        first = np.array([mean_index[int(c)] for c in classes[first]], dtype=np.int64)
    return first.astype(np.int64), second.astype(np.int64), same


def sample_triplets(classes: np.ndarray, n: int, rng: np.random.Generator, *,
                    mean_index: dict[int, int] | None = None,
                    anchor_classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` triplets (anchor, positive, negative) of item indices.

    The anchor is a random item (of ``anchor_classes`` when given), or, with ``mean_index``, the mean
    of its class; the positive another item of the anchor's class, the negative an item of another class.
    """
    classes = np.asarray(classes)
    groups = _by_class(classes)
    if len(groups) < 2:
        raise SettingsError("triplets need at least two classes (good and defective)")
    pool = np.arange(len(classes)) if anchor_classes is None else np.flatnonzero(np.isin(classes, anchor_classes))
    anchors = pool[rng.integers(0, len(pool), size=n)]
    positives = _same_class_items(classes, anchors, rng, groups, mean_index is None)
    negatives = _other_class_items(classes, classes[anchors], rng)
    if mean_index is not None:
        anchors = np.array([mean_index[int(c)] for c in classes[anchors]], dtype=np.int64)
    return anchors.astype(np.int64), positives, negatives


# ---- online mining -------------------------------------------------------------------------------
def mine_batch_hard(dist: torch.Tensor, anchor_classes: torch.Tensor, item_classes: torch.Tensor,
                    self_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard: per anchor row, the farthest positive and the nearest negative column.

    dist (A, B); anchor_classes (A,); item_classes (B,); self_index (A,) the column of each anchor
    itself (excluded from its positives), or None for anchors outside the batch (class means).
    Returns (anchor rows, positive columns, negative columns) for anchors that have both.
    """
    same = anchor_classes[:, None] == item_classes[None, :]
    pos = same.clone()
    if self_index is not None:
        pos[torch.arange(len(self_index)), self_index] = False
    neg = ~same
    ok = pos.any(1) & neg.any(1)
    p = torch.where(pos, dist, torch.full_like(dist, -float("inf"))).argmax(1)
    n = torch.where(neg, dist, torch.full_like(dist, float("inf"))).argmin(1)
    rows = torch.nonzero(ok).flatten()
    return rows, p[rows], n[rows]


def mine_semi_hard(dist: torch.Tensor, anchor_classes: torch.Tensor, item_classes: torch.Tensor,
                   self_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semi-hard: for every anchor-positive pair, the nearest negative farther than the positive
    (d_an > d_ap); the farthest negative when there is none. Returns (anchor rows, pos cols, neg cols)."""
    same = anchor_classes[:, None] == item_classes[None, :]
    pos = same.clone()
    if self_index is not None:
        pos[torch.arange(len(self_index)), self_index] = False
    neg = ~same
    a_idx, p_idx = torch.nonzero(pos & neg.any(1, keepdim=True), as_tuple=True)
    if len(a_idx) == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, empty
    d_ap = dist[a_idx, p_idx][:, None]  # (T, 1)
    d_an = dist[a_idx]  # (T, B)
    negs = neg[a_idx]
    semi = negs & (d_an > d_ap)
    nearest_semi = torch.where(semi, d_an, torch.full_like(d_an, float("inf"))).argmin(1)
    farthest = torch.where(negs, d_an, torch.full_like(d_an, -float("inf"))).argmax(1)
    n_idx = torch.where(semi.any(1), nearest_semi, farthest)
    return a_idx, p_idx, n_idx


def check_choice(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise SettingsError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")
    return value
