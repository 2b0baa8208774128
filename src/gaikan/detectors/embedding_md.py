"""Scoring by distance to the good parts in a learned embedding, and the base class of the
metric-learning detectors (siamese, triplet, classifier-embedding).

Unit space (the Mahalanobis-Taguchi method, Taguchi & Jugulum 2002): the embeddings e_1..e_n of the
good training images, their mean mu and a shrunk covariance

    Sigma = (1 - a) S + a (tr S / D) I,   S = (1/n) sum (e_i - mu)(e_i - mu)^T,

with a from Ledoit & Wolf (J. Multivariate Anal. 2004; ``shrinkage="ledoit-wolf"``) or fixed. A part
with embedding e scores the MT method's scaled squared Mahalanobis distance

    MD^2(e) = (e - mu)^T Sigma^-1 (e - mu) / D  = ||W (e - mu)||^2 / D,   W = chol(Sigma)^-1,

so good parts average about 1. Option ``scoring="knn"``: the mean Euclidean distance to the k nearest
good training embeddings. Formulas and measurements: docs/metric_learning.md.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from gaikan.detectors.base import Detector, ScoreResult, check_images
from gaikan.errors import ModelFormatError, SettingsError
from gaikan.metric_learning.nets import NET_NAMES, build_net, load_numpy_state, state_to_numpy
from gaikan.metric_learning.sampling import check_choice, synthetic_negatives
from gaikan.metric_learning.training import TrainSettings, augment_batch, limit_threads
from gaikan.progress import batches

SCORES = ("mahalanobis", "knn")
INPUTS = ("raw", "rt")
NEGATIVES = ("auto", "synthetic", "real", "both")


# ---- pure math ---------------------------------------------------------------------------------
def shrunk_covariance(emb: np.ndarray, shrinkage: str | float = "ledoit-wolf") -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (D,), Sigma (D, D), a) of embeddings (n, D) with Ledoit-Wolf or a fixed shrinkage a."""
    x = np.asarray(emb, dtype=np.float64)
    mean = x.mean(0)
    if shrinkage == "ledoit-wolf":
        from sklearn.covariance import ledoit_wolf

        cov, alpha = ledoit_wolf(x)
    else:
        alpha = float(shrinkage)
        if not 0.0 <= alpha <= 1.0:
            raise SettingsError(f"shrinkage must be 'ledoit-wolf' or a number in [0, 1], got {shrinkage!r}")
        centred = x - mean
        s = centred.T @ centred / len(x)
        cov = (1 - alpha) * s + alpha * np.trace(s) / x.shape[1] * np.eye(x.shape[1])
    return mean, cov, float(alpha)


def unit_space(emb: np.ndarray, shrinkage: str | float = "ledoit-wolf") -> tuple[np.ndarray, np.ndarray, float]:
    """Mean (D,) and whitening matrix W = chol(Sigma)^-1 (D, D, lower triangular) of the good embeddings."""
    mean, cov, alpha = shrunk_covariance(emb, shrinkage)
    d = cov.shape[0]
    # a floor relative to the average variance keeps a collapsed embedding invertible
    cov = cov + max(1e-6 * np.trace(cov) / d, 1e-12) * np.eye(d)
    chol = np.linalg.cholesky(cov)
    whiten = np.linalg.solve(chol, np.eye(d))
    return mean.astype(np.float32), np.tril(whiten).astype(np.float32), alpha


def mahalanobis_scores(emb: np.ndarray, mean: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """MT scaled squared Mahalanobis distance ||W (e - mu)||^2 / D of each row of emb (N, D) -> (N,)."""
    y = (np.asarray(emb, np.float64) - mean) @ np.asarray(whiten, np.float64).T
    return (np.square(y).sum(1) / emb.shape[1]).astype(np.float32)


def knn_scores(emb: np.ndarray, bank: np.ndarray, k: int = 3, chunk: int = 1024) -> np.ndarray:
    """Mean Euclidean distance of each row of emb (N, D) to its k nearest rows of bank (M, D)."""
    k = int(min(max(k, 1), len(bank)))
    bank64 = np.asarray(bank, np.float64)
    bank_sq = np.square(bank64).sum(1)
    out = np.empty(len(emb), dtype=np.float32)
    for sl in batches(len(emb), chunk):
        e = np.asarray(emb[sl], np.float64)
        d2 = np.square(e).sum(1)[:, None] + bank_sq[None] - 2.0 * e @ bank64.T
        near = np.partition(np.maximum(d2, 0.0), k - 1, axis=1)[:, :k]
        out[sl] = np.sqrt(near).mean(1)
    return out


def to_working_gray(images: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """Images (any dtype, gray or colour) -> float32 (N, H, W) in [0, 1] at ``size`` (BT.601 luma)."""
    from gaikan.data.images import resize, to_gray

    out = np.empty((len(images), *size), dtype=np.float32)
    for i, img in enumerate(images):
        g = to_gray(img)
        out[i] = g if g.shape == tuple(size) else resize(g, size)
    return out


# ---- the base class ------------------------------------------------------------------------------
class EmbeddingDetector(Detector):
    """Base of the detectors that learn an embedding net and score by distance to the good embeddings.

    ``fit(images, labels)``: label 0 = good; a positive label is a defect class (1, 2, ... one per
    defect type; ``gaikan.pipeline.fit_detector`` passes them for ``uses_defects`` detectors); -1 is
    ignored. The net learns from the good images and negatives: the given defects and/or synthetic
    ones (setting ``negatives``). The unit space is always the good training embeddings; the base
    class holds good images out to calibrate the thresholds.

    Subclasses implement ``_train_net(x_train, c_train, x_val, c_val) -> history``.
    """

    uses_defects: ClassVar[bool] = True
    supervised: ClassVar[bool] = False

    # settings shared by every embedding detector (subclasses list them in their __init__)
    def _init_common(self, *, net, image_size, input, epochs, batch_size, lr, seed, scoring, shrinkage, k, augment,
                     negatives, synthetic_ratio, defect_scale, patience, val_fraction, hidden, embedding_dim,
                     stage, finetune, rt_window, rt_stride):
        self.net = check_choice(str(net), NET_NAMES, "net")
        self.image_size = int(image_size)
        if self.image_size < 16:
            raise SettingsError(f"image_size must be at least 16, got {self.image_size}")
        self.input = check_choice(str(input), INPUTS, "input")
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        if self.epochs < 1 or self.batch_size < 2:
            raise SettingsError(f"epochs must be >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        self.lr = float(lr)
        self.seed = int(seed)
        self.scoring = check_choice(str(scoring), SCORES, "scoring")
        self.shrinkage = shrinkage if shrinkage == "ledoit-wolf" else float(shrinkage)
        self.k = int(k)
        self.augment = bool(augment)
        self.negatives = check_choice(str(negatives), NEGATIVES, "negatives")
        self.synthetic_ratio = float(synthetic_ratio)
        self.defect_scale = float(defect_scale)
        self.patience = int(patience)
        self.val_fraction = float(val_fraction)
        if not 0.0 <= self.val_fraction < 0.5:
            raise SettingsError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        self.hidden = tuple(int(h) for h in hidden)
        self.embedding_dim = int(embedding_dim)
        self.stage = int(stage)
        self.finetune = bool(finetune)
        self.rt_window = int(rt_window)
        self.rt_stride = int(rt_stride)

    # ---- fit ----------------------------------------------------------------------------------
    def fit(self, images, labels=None, **kwargs) -> "EmbeddingDetector":
        """Good images (label 0) are split by the base class (training / calibration); defect images
        (label > 0) go to the net's training only."""
        images = check_images(images)
        if labels is None:
            self._given_defects = ([], np.zeros(0, np.int64))
            good = images
        else:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(labels) != len(images):
                raise SettingsError(f"{len(images)} images but {len(labels)} labels")
            self._given_defects = ([images[i] for i in np.flatnonzero(labels > 0)], labels[labels > 0])
            good = [images[i] for i in np.flatnonzero(labels == 0)]
            if not good:
                raise SettingsError("no good (label 0) images to learn from")
        try:
            super().fit(good, None, **kwargs)
            n_defective = len(self._given_defects[0]) if self.train_info_["negatives"] in ("real", "both") else 0
            self.fit_info_["n_train"] += n_defective
            self.fit_info_["n_train_defective"] = n_defective
            self.fit_info_["negatives"] = self.train_info_["negatives"]
            return self
        finally:
            del self._given_defects

    def _negatives(self, x_good: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
        given_imgs, given_classes = getattr(self, "_given_defects", ([], np.zeros(0, np.int64)))
        mode = self.negatives
        if mode == "auto":
            mode = "real" if len(given_imgs) else "synthetic"
        if mode in ("real", "both") and not len(given_imgs):
            raise SettingsError(f"negatives={self.negatives!r} needs defective training images (labels > 0); "
                                "none were given")
        parts_x, parts_c = [], []
        if mode in ("real", "both"):
            parts_x.append(to_working_gray(given_imgs, self.input_size))
            parts_c.append(given_classes)
        if mode in ("synthetic", "both"):
            n = max(2, int(round(self.synthetic_ratio * len(x_good))))
            xs, cs = synthetic_negatives(x_good, n, rng, scale=self.defect_scale)
            parts_x.append(xs)
            parts_c.append(cs + (int(given_classes.max()) if mode == "both" else 0))
        return np.concatenate(parts_x), np.concatenate(parts_c), mode

    def _transform(self, gray: np.ndarray) -> np.ndarray:
        """Working-size gray images (N, H, W) -> net inputs (N, 1, H', W') float32 (raw or RT-metric)."""
        if self.input == "rt":
            maps = self.rt_.transform(list(gray))
            return np.stack(maps).astype(np.float32)[:, None]
        return gray[:, None]

    def _fit(self, images: list[np.ndarray], labels: np.ndarray | None) -> None:
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        x_good = to_working_gray(images, self.input_size)
        x_neg, c_neg, mode = self._negatives(x_good, rng)
        if self.input == "rt":
            from gaikan.transforms.rt_metric import RTMetric

            self.rt_ = RTMetric(window=self.rt_window, stride=self.rt_stride, image_size=self.image_size).fit(list(x_good))
        x_all = self._transform(np.concatenate([x_good, x_neg]))
        c_all = np.r_[np.zeros(len(x_good), np.int64), c_neg]
        good_inputs = x_all[: len(x_good)]
        self.norm_ = np.array([good_inputs.mean(), good_inputs.std() + 1e-6], dtype=np.float32)
        self.in_shape_ = tuple(int(s) for s in x_all.shape[1:])
        self.net_ = self._build()
        # held-out validation items (stratified by class) for the validation loss
        val = np.zeros(len(x_all), dtype=bool)
        if self.val_fraction > 0:
            for c in np.unique(c_all):
                members = np.flatnonzero(c_all == c)
                n_val = int(np.floor(self.val_fraction * len(members)))
                if n_val >= 1 and len(members) - n_val >= 2:
                    val[rng.permutation(members)[:n_val]] = True
        if len(np.unique(c_all[val])) < 2:
            val[:] = False
        xt = torch.from_numpy(np.ascontiguousarray(x_all[~val]))
        xv = torch.from_numpy(np.ascontiguousarray(x_all[val])) if val.any() else None
        self.history_ = self._train_net(xt, c_all[~val], xv, c_all[val] if val.any() else None)
        self.train_info_ = {"negatives": mode, "n_good": len(x_good), "n_negative": len(x_neg),
                            "classes": np.unique(c_all).tolist()}
        emb_good = self._embed_inputs(torch.from_numpy(np.ascontiguousarray(good_inputs)))
        self._fit_scoring(emb_good)

    def _fit_scoring(self, emb_good: np.ndarray) -> None:
        self.unit_mean_, self.unit_whiten_, self.shrinkage_ = unit_space(emb_good, self.shrinkage)
        self.bank_ = emb_good.astype(np.float32)

    # ---- the net ------------------------------------------------------------------------------
    def _build(self) -> nn.Module:
        return build_net(self.net, self.in_shape_, hidden=self.hidden, out_dim=self.embedding_dim,
                         stage=self.stage, finetune=self.finetune)

    def _train_settings(self) -> TrainSettings:
        return TrainSettings(epochs=self.epochs, lr=self.lr, patience=self.patience, seed=self.seed)

    def _train_sampled(self, xt, ct, xv, cv, sample, loss, per_sample: int, description: str):
        """Train the net on tuples (pairs or triplets) drawn each epoch by
        ``sample(classes, n, rng, mean_index=...) -> index arrays`` and scored by
        ``loss(pool, *index_arrays, rng=..., augment=...)``; validation tuples are drawn once."""
        from gaikan.metric_learning.training import train_network

        pool, index, val_pool, val_index = anchor_pools(xt, ct, xv, self.anchor)
        n = epoch_size(len(ct), self.batch_size, per_sample)

        def make_batches(rng):
            parts = sample(ct, n, rng, mean_index=index)
            return [tuple(part[sl] for part in parts) for sl in batches(n, self.batch_size)]

        def batch_loss(batch, rng):
            return loss(pool, *batch, rng=rng, augment=True)

        val_loss = None
        if xv is not None:
            val_parts = sample(cv, max(2 * len(cv), 32), np.random.default_rng(self.seed + 1), mean_index=val_index)

            def val_loss():
                return float(loss(val_pool, *val_parts))

        return train_network(self.net_, make_batches, batch_loss, val_loss, self._train_settings(), description)

    def _forward(self, x: torch.Tensor, *, augment: bool = False, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Net inputs (B, 1, H, W) -> embeddings (B, D); standardised by the good images' mean and std."""
        if augment and self.augment:
            x = augment_batch(x, rng, brightness=0.0 if self.input == "rt" else 0.1)
        mean, std = float(self.norm_[0]), float(self.norm_[1])
        return self.net_((x - mean) / std)

    def _embed_inputs(self, x: torch.Tensor, chunk: int = 128) -> np.ndarray:
        self.net_.eval()
        out = []
        with torch.no_grad(), limit_threads(1):
            for sl in batches(len(x), chunk):
                out.append(self._forward(x[sl]).numpy())
        return np.concatenate(out).astype(np.float32)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings (N, D) float32 of images (any size; resized to the working size)."""
        self._check_fitted()
        images = check_images(images)
        return self._embed_images(images)

    def _embed_images(self, images: list[np.ndarray]) -> np.ndarray:
        x = self._transform(to_working_gray(images, self.input_size))
        return self._embed_inputs(torch.from_numpy(np.ascontiguousarray(x)))

    # ---- score --------------------------------------------------------------------------------
    def _score(self, images: list[np.ndarray]) -> ScoreResult:
        emb = self._embed_images(images)
        if self.scoring == "knn":
            return ScoreResult(knn_scores(emb, self.bank_, self.k))
        return ScoreResult(mahalanobis_scores(emb, self.unit_mean_, self.unit_whiten_))

    def _train_net(self, xt, ct, xv, cv) -> dict[str, list[float]]:  # pragma: no cover
        raise NotImplementedError

    # ---- persistence --------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_extra_state(self, state: dict[str, np.ndarray]) -> None:
        pass

    def _state(self) -> dict[str, np.ndarray]:
        state = state_to_numpy(self.net_, "net.")
        state.update({
            "in_shape": np.asarray(self.in_shape_, np.int64),
            "norm": self.norm_,
            "unit_mean": self.unit_mean_,
            "unit_whiten": self.unit_whiten_,
            "shrinkage": np.asarray([self.shrinkage_], np.float64),
            "bank": self.bank_,
            "history_train_loss": np.asarray(self.history_["train_loss"], np.float64),
            "history_val_loss": np.asarray(self.history_["val_loss"], np.float64),
        })
        if self.input == "rt":
            state.update({f"rt.{k}": np.asarray(v) for k, v in self.rt_.state().items()})
        state.update(self._extra_state())
        return state

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        try:
            self.in_shape_ = tuple(int(s) for s in state["in_shape"])
            self.norm_ = state["norm"].astype(np.float32)
            self.unit_mean_ = state["unit_mean"].astype(np.float32)
            self.unit_whiten_ = state["unit_whiten"].astype(np.float32)
            self.shrinkage_ = float(np.asarray(state["shrinkage"]).reshape(-1)[0])
            self.bank_ = state["bank"].astype(np.float32)
            self.history_ = {"train_loss": state["history_train_loss"].tolist(),
                             "val_loss": state["history_val_loss"].tolist()}
        except KeyError as exc:
            raise ModelFormatError(f"{self.name} model lacks the tensor {exc}") from None
        if self.input == "rt":
            from gaikan.transforms.rt_metric import RTMetric

            self.rt_ = RTMetric.from_state({k[3:]: v for k, v in state.items() if k.startswith("rt.")})
        torch.manual_seed(self.seed)
        self.net_ = self._build()
        self._load_extra_state(state)
        load_numpy_state(self.net_, state, "net.")
        self.net_.eval()


# ---- helpers for the pair / triplet detectors ------------------------------------------------------
def anchor_pools(xt: torch.Tensor, ct: np.ndarray, xv: torch.Tensor | None, anchor: str):
    """Item pools for training and validation; with ``anchor="mean"`` the training class means are
    appended to both and ``{class: index of its mean}`` is returned for each (else None)."""
    if anchor != "mean":
        return xt, None, xv, None
    ids = np.unique(ct)
    means = torch.stack([xt[torch.from_numpy(ct == c)].mean(0) for c in ids])
    train_index = {int(c): len(xt) + i for i, c in enumerate(ids)}
    train_pool = torch.cat([xt, means])
    if xv is None:
        return train_pool, train_index, None, None
    val_index = {int(c): len(xv) + i for i, c in enumerate(ids)}
    return train_pool, train_index, torch.cat([xv, means]), val_index


def epoch_size(n_items: int, batch_size: int, per_sample: int) -> int:
    """Pairs (per_sample 2) or triplets (3) per epoch: an epoch passes about every training image
    through the net once (n_items / per_sample samples), and at least two batches."""
    return max(-(-n_items // per_sample), 2 * batch_size)
