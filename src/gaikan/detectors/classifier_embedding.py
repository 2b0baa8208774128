"""Softmax classifier embedding: an embedding net followed by a linear softmax layer is trained with
cross-entropy to tell the classes apart (good, each defect type; or good and the synthetic defect
kinds when only good images are given). The classifier is then dropped and its penultimate layer
(the embedding net's D-dimensional output) is the embedding; a part scores the Mahalanobis distance
of its embedding to the good training embeddings (see embedding_md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaikan.detectors.base import register
from gaikan.detectors.embedding_md import EmbeddingDetector
from gaikan.metric_learning.training import train_network
from gaikan.progress import batches


@register("classifier-embedding")
class ClassifierEmbeddingDetector(EmbeddingDetector):
    """Settings: net (mlp | cnn | efficientnet), image_size, input (raw | rt), epochs, batch_size, lr,
    seed, scoring (mahalanobis | knn), shrinkage, k, augment, negatives (auto | synthetic | real | both),
    synthetic_ratio, defect_scale, patience, val_fraction, hidden, embedding_dim, stage, finetune,
    rt_window, rt_stride."""

    def __init__(self, net: str = "cnn", image_size: int = 64, input: str = "raw", epochs: int = 15,
                 batch_size: int = 32, lr: float = 1e-3, seed: int = 0, scoring: str = "mahalanobis",
                 shrinkage: str = "ledoit-wolf", k: int = 3, augment: bool = False, negatives: str = "auto",
                 synthetic_ratio: float = 1.0, defect_scale: float = 1.0, patience: int = 0,
                 val_fraction: float = 0.15, hidden: Sequence[int] = (256, 256), embedding_dim: int = 128,
                 stage: int = 4, finetune: bool = False, rt_window: int = 8, rt_stride: int = 2):
        self._init_common(net=net, image_size=image_size, input=input, epochs=epochs, batch_size=batch_size, lr=lr,
                          seed=seed, scoring=scoring, shrinkage=shrinkage, k=k, augment=augment, negatives=negatives,
                          synthetic_ratio=synthetic_ratio, defect_scale=defect_scale, patience=patience,
                          val_fraction=val_fraction, hidden=hidden, embedding_dim=embedding_dim, stage=stage,
                          finetune=finetune, rt_window=rt_window, rt_stride=rt_stride)

    def _ce(self, x, targets, rng=None, augment=False):
        logits = self.classifier_(self._forward(x, augment=augment, rng=rng))
        return F.cross_entropy(logits, targets)

    def _train_net(self, xt, ct, xv, cv):
        self.class_ids_ = np.unique(ct)
        self.classifier_ = nn.Linear(self.embedding_dim, len(self.class_ids_))
        # the classifier trains with the net: register it as a sub-module for the optimiser
        self.net_.add_module("classifier", self.classifier_)
        yt = torch.from_numpy(np.searchsorted(self.class_ids_, ct))

        def make_batches(rng):
            order = rng.permutation(len(ct))
            return [order[sl] for sl in batches(len(ct), self.batch_size) if sl.stop - sl.start >= 2]

        def batch_loss(idx, rng):
            t = torch.from_numpy(idx)
            return self._ce(xt[t], yt[t], rng=rng, augment=True)

        val_loss = None
        if xv is not None:
            known = np.isin(cv, self.class_ids_)
            xv_k = xv[torch.from_numpy(known)]
            yv = torch.from_numpy(np.searchsorted(self.class_ids_, cv[known]))

            def val_loss():
                return float(self._ce(xv_k, yv))

        history = train_network(self.net_, make_batches, batch_loss, val_loss, self._train_settings(),
                                f"classifier-embedding ({self.net}): epochs")
        return history

    def _extra_state(self):
        return {"class_ids": self.class_ids_.astype(np.int64)}

    def _load_extra_state(self, state):
        self.class_ids_ = state["class_ids"]
        self.classifier_ = nn.Linear(self.embedding_dim, len(self.class_ids_))
        self.net_.add_module("classifier", self.classifier_)
