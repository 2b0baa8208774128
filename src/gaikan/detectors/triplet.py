"""Triplet network (Hoffer & Ailon, 2015; FaceNet, Schroff et al., CVPR 2015).

One embedding net sees an anchor, a positive (same class) and a negative (another class); the
triplet loss max(0, d(a, p) - d(a, n) + margin) asks the negative to be farther than the positive by
the margin. Distances: ``loss=euclidean`` (squared Euclidean, margin 1.0), ``cosine`` (1 - cos,
margin 0.4), ``higher-order`` (sqrt(D) ||a - b||_4^2, margin 1.0; strong local differences count
more). Anchors: ``random`` items or the ``mean`` image of the anchor's class. Mining: ``none``
(random triplets), ``batch-hard`` or ``semi-hard`` (online, within each batch of images). A part
scores the Mahalanobis distance of its embedding to the good training embeddings.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from gaikan.detectors.base import register
from gaikan.detectors.embedding_md import EmbeddingDetector
from gaikan.metric_learning.losses import DISTANCES, default_margin, pairwise_distance, triplet_from_distances, triplet_loss
from gaikan.metric_learning.sampling import (ANCHORS, MINING, check_choice, mine_batch_hard, mine_semi_hard,
                                             sample_triplets)
from gaikan.metric_learning.training import train_network
from gaikan.progress import batches


@register("triplet")
class TripletDetector(EmbeddingDetector):
    """Settings: net (mlp | cnn | efficientnet), image_size, input (raw | rt), epochs, batch_size
    (triplets, or images when mining), lr, loss (euclidean | cosine | higher-order), margin (0: the
    loss's default), anchor (random | mean), mining (none | batch-hard | semi-hard), seed, scoring
    (mahalanobis | knn), shrinkage, k, augment, negatives (auto | synthetic | real | both),
    synthetic_ratio, defect_scale, patience, val_fraction, hidden, embedding_dim, stage, finetune,
    rt_window, rt_stride."""

    def __init__(self, net: str = "cnn", image_size: int = 64, input: str = "raw", epochs: int = 15,
                 batch_size: int = 32, lr: float = 1e-3, loss: str = "euclidean", margin: float = 0.0,
                 anchor: str = "random", mining: str = "none", seed: int = 0, scoring: str = "mahalanobis",
                 shrinkage: str = "ledoit-wolf", k: int = 3, augment: bool = False, negatives: str = "auto",
                 synthetic_ratio: float = 1.0, defect_scale: float = 1.0, patience: int = 0,
                 val_fraction: float = 0.15, hidden: Sequence[int] = (256, 256), embedding_dim: int = 128,
                 stage: int = 4, finetune: bool = False, rt_window: int = 8, rt_stride: int = 2):
        self._init_common(net=net, image_size=image_size, input=input, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, scoring=scoring, shrinkage=shrinkage, k=k, augment=augment, negatives=negatives,
                          synthetic_ratio=synthetic_ratio, defect_scale=defect_scale, patience=patience,
                          val_fraction=val_fraction, hidden=hidden, embedding_dim=embedding_dim, stage=stage,
                          finetune=finetune, rt_window=rt_window, rt_stride=rt_stride)
        self.loss = check_choice(str(loss), DISTANCES, "loss")
        self.margin = float(margin)
        self.anchor = check_choice(str(anchor), ANCHORS, "anchor")
        self.mining = check_choice(str(mining), MINING, "mining")

    @property
    def margin_value(self) -> float:
        return self.margin if self.margin > 0 else default_margin(self.loss)

    # random triplets ---------------------------------------------------------------------------
    def _triplet_loss(self, pool, a, p, n, rng=None, augment=False):
        x = pool[torch.from_numpy(np.concatenate([a, p, n]))]
        emb = self._forward(x, augment=augment, rng=rng)
        k = len(a)
        return triplet_loss(emb[:k], emb[k:2 * k], emb[2 * k:], self.loss, self.margin_value)

    # online mining -----------------------------------------------------------------------------
    def _mined_loss(self, items, classes, means, mean_ids, rng=None, augment=False):
        """Embed a batch of items (and the class means as anchors, anchor=mean), mine, return the loss."""
        x = items if means is None else torch.cat([items, means])
        emb = self._forward(x, augment=augment, rng=rng)
        c = torch.from_numpy(classes)
        if means is None:
            anchors, a_classes, self_index = emb, c, torch.arange(len(items))
        else:
            emb, anchors = emb[: len(items)], emb[len(items):]
            a_classes, self_index = torch.from_numpy(mean_ids), None
        with torch.no_grad():
            dist = pairwise_distance(anchors, emb, self.loss)
        mine = mine_batch_hard if self.mining == "batch-hard" else mine_semi_hard
        rows, pos, neg = mine(dist, a_classes, c, self_index)
        if len(rows) == 0:
            return emb.sum() * 0.0
        full = pairwise_distance(anchors, emb, self.loss)
        return triplet_from_distances(full[rows, pos], full[rows, neg], self.margin_value)

    def _train_net(self, xt, ct, xv, cv):
        if self.mining != "none":
            return self._train_mined(xt, ct, xv, cv)
        return self._train_sampled(xt, ct, xv, cv, sample_triplets, self._triplet_loss, 3,
                                   f"triplet ({self.net}, {self.loss}): epochs")

    def _train_mined(self, xt, ct, xv, cv):
        means = mean_ids = None
        if self.anchor == "mean":
            mean_ids = np.unique(ct)
            means = torch.stack([xt[torch.from_numpy(ct == c)].mean(0) for c in mean_ids])

        def make_batches(rng):
            order = rng.permutation(len(ct))
            return [order[sl] for sl in batches(len(ct), self.batch_size) if sl.stop - sl.start >= 2]

        def batch_loss(idx, rng):
            return self._mined_loss(xt[torch.from_numpy(idx)], ct[idx], means, mean_ids, rng=rng, augment=True)

        val_loss = None
        if xv is not None:
            def val_loss():
                return float(self._mined_loss(xv, cv, means, mean_ids))

        return train_network(self.net_, make_batches, batch_loss, val_loss, self._train_settings(),
                             f"triplet ({self.net}, {self.loss}, {self.mining}): epochs")
