"""Siamese network (Bromley et al., NIPS 1993; contrastive loss of Hadsell, Chopra & LeCun, CVPR 2006).

Two copies of one embedding net see a pair of images; the contrastive loss pulls same-class pairs
together and pushes different-class pairs at least ``margin`` apart (Euclidean distance). Pairs are
half same-class, half different-class; the first image is a random one, or the mean image of its
class (``anchor="mean"``: the mean good image for good pairs). Classes: good, each defect type given
at fit time, or the synthetic defect kinds when only good images are given. A part scores the
Mahalanobis distance of its embedding to the good training embeddings (see embedding_md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from gaikan.detectors.base import register
from gaikan.detectors.embedding_md import EmbeddingDetector
from gaikan.metric_learning.losses import contrastive_loss
from gaikan.metric_learning.sampling import ANCHORS, check_choice, sample_pairs


@register("siamese")
class SiameseDetector(EmbeddingDetector):
    """Settings: net (mlp | cnn | efficientnet), image_size (working size, pixels), input (raw | rt),
    epochs, batch_size (pairs per step), lr, margin, anchor (random | mean), seed, scoring
    (mahalanobis | knn), shrinkage (ledoit-wolf or a number in [0, 1]), k (for knn), augment,
    negatives (auto | synthetic | real | both), synthetic_ratio (synthetic negatives per good image),
    defect_scale, patience (early stopping; 0 off), val_fraction, hidden (MLP layers), embedding_dim,
    stage and finetune (efficientnet), rt_window and rt_stride (input=rt)."""

    def __init__(self, net: str = "cnn", image_size: int = 64, input: str = "raw", epochs: int = 15,
                 batch_size: int = 32, lr: float = 1e-3, margin: float = 1.0, anchor: str = "random", seed: int = 0,
                 scoring: str = "mahalanobis", shrinkage: str = "ledoit-wolf", k: int = 3, augment: bool = False,
                 negatives: str = "auto", synthetic_ratio: float = 1.0, defect_scale: float = 1.0, patience: int = 0,
                 val_fraction: float = 0.15, hidden: Sequence[int] = (256, 256), embedding_dim: int = 128,
                 stage: int = 4, finetune: bool = False, rt_window: int = 8, rt_stride: int = 2):
        self._init_common(net=net, image_size=image_size, input=input, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, scoring=scoring, shrinkage=shrinkage, k=k, augment=augment, negatives=negatives,
                          synthetic_ratio=synthetic_ratio, defect_scale=defect_scale, patience=patience,
                          val_fraction=val_fraction, hidden=hidden, embedding_dim=embedding_dim, stage=stage,
                          finetune=finetune, rt_window=rt_window, rt_stride=rt_stride)
        self.margin = float(margin)
        self.anchor = check_choice(str(anchor), ANCHORS, "anchor")

    def _pair_loss(self, pool, i, j, same, rng=None, augment=False):
        a = pool[torch.from_numpy(i)]
        b = pool[torch.from_numpy(j)]
        emb = self._forward(torch.cat([a, b]), augment=augment, rng=rng)
        return contrastive_loss(emb[: len(i)], emb[len(i):], torch.from_numpy(same), self.margin)

    def _train_net(self, xt, ct, xv, cv):
        return self._train_sampled(xt, ct, xv, cv, sample_pairs, self._pair_loss, 2, f"siamese ({self.net}): epochs")
