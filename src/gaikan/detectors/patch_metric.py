"""patch-metric: a metric learned at the level of patches, on frozen pretrained features.

The whole-image metric learners (siamese, triplet) average thin defects away; this detector learns
its metric where PatchCore measures, on the locally aware EfficientNet-Lite0 patch features of
``gaikan.detectors.patchcore`` (stages 2 and 4, 224 px: a 28 x 28 grid of D = 152 features). Ideas
from CFA (Lee, Lee & Song, "CFA: Coupled-hypersphere-based Feature Adaptation", IEEE Access 2022: a
patch adaptor trained so that good patches fall inside hyperspheres around memorised good features)
and SimpleNet (Liu et al., CVPR 2023: a feature adaptor, and anomalies made as Gaussian noise in
feature space). Formulas and measurements: docs/patch_metric.md.

Features x (D,) of each patch are computed once per fit (the backbone is frozen; no gradient through
it), standardised by the good patches' mean vector mu and one scalar s (the RMS distance between good
patches at the same position, so distances are O(1) and the losses' margins mean the same on every
data set):  z = (x - mu) / s. A translation and one scale change no nearest neighbour, so before
training the detector ranks patches exactly as PatchCore does.

Adaptor (the "1x1 convolutions": the same map at every position, written on patch rows):
    f(z) = W z + b                        (W (E, D), E = embedding_dim, initialised to the identity)
    f(z) = y + V2 act(V1 y),  y = W z + b  (hidden > 0: a residual branch, V2 initialised to 0)
so training starts from PatchCore's metric and moves it. With ``init="rca"`` W starts instead at a
metric learned in closed form from good patches alone: Relevant Component Analysis (Bar-Hillel, Hertz,
Shental & Weinshall, "Learning a Mahalanobis metric from equivalence constraints", JMLR 2005), the
inverse square root of the covariance C of within-"chunklet" differences. Here a chunklet is a good
patch of a held-out good image (the adaptor's validation goods) and its nearest neighbour in a random
reference of the other good patches (as many as the memory will hold), so C is the covariance of the
residuals r = z - nn(z) that the memory leaves on good parts, Ledoit-Wolf shrunk:
    W = c C^(-1/2),   c such that good patches at the same position are again at RMS distance 1.
Directions in which good patches differ from their nearest good neighbour (on a textured surface the
grain) are shrunk, directions in which they never differ are stretched. The losses then train on from
there.

Training tuples, drawn at random from the cached features each step (``positives``):
    position:  an anchor and a positive are good patches at the same grid position p of two good
               images (aligned parts); a negative is a defect patch at p.  anchor="mean": the anchor
               is the mean good patch at p (the mean-image anchor at patch level).
    neighbour: the anchor of a negative n is its nearest good patch in a random pool of good patches
               (raw features), the positive the anchor's nearest pool neighbour (parts not aligned).
Negatives: patches of synthetic defects (gaikan.data.synthetic) pasted into the good training images
at the working size, where the defect mask covers >= 5% of the patch's 8 x 8 cell; patches of the
given defective images (labels > 0: the ``split_sup`` rows through gaikan.pipeline.fit_detector), the
``defect_patches`` share of each image's patches farthest from the good ones (no masks are given for
them); and, with ``noise_std`` > 0, SimpleNet's feature-space anomalies z + noise_std * eps / sqrt(D),
eps ~ N(0, I): noise of RMS length noise_std, in units of the RMS distance between good patches.

Losses (gaikan.metric_learning.losses), on the adapted rows:
    contrastive:  pairs (anchor, positive, same) and (anchor, negative, different), margin 2.0;
    triplet:      max(0, d(a, p) - d(a, n) + m), distance euclidean (squared, m 1.0) or cosine (m 0.4);
    hypersphere:  max(0, ||f(g) - c||^2 - r^2) + max(0, r^2 + m - ||f(n) - c||^2), the centre c = f(anchor),
                  r = ``radius``, m = the margin (1.0): CFA's attraction / repulsion with true negatives.

Score: the adapted patches of all good training images (L2-normalised for the cosine distance) form the
memory, reduced by PatchCore's greedy k-center coreset (``greedy_coreset``) to ``coreset_fraction``;
a patch scores its Euclidean distance to the nearest memory entry (``MemoryBank``), or with
``scoring="centres"`` its distance to the adapted mean good patch of its own position. The grid is
upsampled to the working size and smoothed (Gaussian, sigma 4) as PatchCore's; image score = max.

Supervised head (``head="auto"``, trained only when labelled defective images are given, e.g. the
``split_sup`` rows; after DevNet / DRA, which learn from a few labelled anomalies): a per-patch MLP g
(D -> head_hidden -> 1, on the standardised features z) trained with binary cross-entropy on image
labels, an image's logit being the mean of its k highest patch logits (k = ``defect_patches`` x P,
multiple-instance pooling: no masks are needed). Its score is fused with the distance:
    score = w (s_d - m_d) / sd_d + (1 - w) (s_h - m_h) / sd_h
each part standardised on held-out good images (the adaptor's validation goods, at least 2, kept
out of the memory and of the head's training), w in {0, 0.1, .., 1} chosen by 2-fold
cross-validation: each fold holds out half of the good and half of the defective images and fits a
whole model of its own (adaptor, memory, head) on the rest, which scores the held-out ones; w
maximises the mean of the two folds' AUROCs. (The adaptor's negatives are the defects' patches, so a
fold that reused the final adaptor would score defects it had learned from.) The map is the same
combination of the two patch grids, upsampled and smoothed.

``head_features="tuned"``: the head reads its own copy of the backbone from the first tapped stage
on (Lite0's default taps: stages 2-4, 0.7 M weights), fine-tuned with the MLP (Adam, 1e-4 for the
copy, 1e-3 for the MLP; ``tune_steps`` steps of 16 good + 16 defective images, each in a random one
of four orientations: as is and flipped left-right, up-down or both). The trunk before it (stem,
stages 0-1) is shared and runs once per image; the distance keeps the frozen features, so the memory
is the one a frozen head's fit gets. Fusion and its cross-validation as above (each of the three
heads, the two folds' and the final one, fine-tunes its own copy).
"""

from __future__ import annotations

import math
import time
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaikan.backbones.features import BACKBONES, FeatureExtractor, normalise, prepare_batch, stage_channels
from gaikan.data.images import prepare_image
from gaikan.detectors.base import Detector, ScoreResult, check_images, register
from gaikan.detectors.embedding_md import shrunk_covariance
from gaikan.detectors.maps import smooth_map
from gaikan.detectors.patchcore import MemoryBank, greedy_coreset, locally_aware_features
from gaikan.errors import ModelFormatError, SettingsError
from gaikan.metric_learning.losses import contrastive_loss, default_margin, hypersphere_loss, triplet_loss
from gaikan.metric_learning.sampling import check_choice
from gaikan.metric_learning.training import TrainSettings, train_network
from gaikan.progress import batches, track

LOSSES = ("contrastive", "triplet", "hypersphere")
DISTANCES = ("euclidean", "cosine")
ANCHORS = ("random", "mean")
POSITIVES = ("position", "neighbour")
NEGATIVES = ("auto", "synthetic", "real", "both", "noise")
SCORINGS = ("memory", "centres")
HEADS = ("auto", "none")
HEAD_FEATURES = ("frozen", "tuned")
#: head_features=tuned: the backbone's learning rate (the MLP's is 1e-3), images of each class per step,
#: and the orientations the training images are seen in (identity, left-right, up-down, both flips)
TUNE_LR = 1e-4
TUNE_BATCH = 16
TUNE_FLIPS = ((), (3,), (2,), (2, 3))
INITS = ("identity", "rca")
#: the fusion weights of the distance tried by the head's cross-validation
FUSION_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
#: how the fusion weight was chosen (``fit_info_["fusion"]["chosen_by"]``)
CV_RULE = "2-fold cross-validation, out-of-fold goods and defects"
#: a synthetic-defect patch is a negative when its mask covers at least this share of its grid cell
MASK_COVERAGE = 0.05
#: good patches in the pool that neighbour-mode tuples are drawn from, per step
NEIGHBOUR_POOL = 2048
DEFAULT_MARGINS = {"contrastive": 2.0, "hypersphere": 1.0}


# ---- pure functions -------------------------------------------------------------------------------
def mask_coverage(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool masks -> (N, h * w) share of each grid cell covered (area average)."""
    m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    return F.adaptive_avg_pool2d(m, grid)[:, 0].reshape(len(masks), -1).numpy()


def rca_whitening(residuals: np.ndarray) -> np.ndarray:
    """(n, D) within-chunklet differences -> W = C^(-1/2) (D, D), C their Ledoit-Wolf covariance
    (RCA); eigenvalues are floored at 1e-6 of their mean so that a direction no residual moves in
    stays finite."""
    _, cov, _ = shrunk_covariance(residuals)
    values, vectors = np.linalg.eigh(cov)
    values = np.maximum(values, 1e-6 * max(float(values.mean()), 1e-12))
    return ((vectors / np.sqrt(values)) @ vectors.T).astype(np.float32)


def patch_rows(taps: list[torch.Tensor]) -> torch.Tensor:
    """Backbone taps -> (B, P, D) raw patch features: PatchCore's locally aware features on the first
    tap's grid, one row per position (row-major)."""
    return locally_aware_features(taps).flatten(2).transpose(1, 2)


def top_k_mean(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P) patch logits -> (B,) image logits: the mean of each row's k highest (multiple-instance
    pooling of the supervised head)."""
    return logits.topk(k, dim=1).values.mean(1)


def fuse(distance, head, fusion):
    """The fused score of the distance and the head (module docstring): w (d - m_d) / sd_d +
    (1 - w) (h - m_h) / sd_h, with fusion = (w, m_d, sd_d, m_h, sd_h); arrays or tensors alike."""
    w, md, sd, mh, sh = fusion
    return w * (distance - md) / sd + (1 - w) * (head - mh) / sh


def top_patches(distances: np.ndarray, share: float) -> np.ndarray:
    """(N, P) patch distances -> (N, k) indices of each row's k = max(1, round(share P)) largest."""
    k = max(1, int(round(share * distances.shape[1])))
    return np.argsort(-distances, axis=1, kind="stable")[:, :k]


class PatchAdaptor(nn.Module):
    """The per-patch map f (module docstring): a linear layer (a 1x1 convolution on the feature map),
    initialised to the identity (or, for E < D, to E seeded orthonormal rows), and an optional residual
    branch whose last layer starts at zero. Works on (..., D) rows."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int = 0, seed: int = 0):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        with torch.no_grad():
            if dim_out == dim_in:
                self.linear.weight.copy_(torch.eye(dim_in))
            else:
                gen = torch.Generator().manual_seed(seed)
                q, _ = torch.linalg.qr(torch.randn(dim_in, dim_out, generator=gen))
                self.linear.weight.copy_(q.t())
            self.linear.bias.zero_()
        self.branch = None
        if hidden > 0:
            self.branch = nn.Sequential(nn.Linear(dim_out, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, dim_out))
            with torch.no_grad():
                self.branch[2].weight.zero_()
                self.branch[2].bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.linear(z)
        if self.branch is not None:
            y = y + self.branch(y)
        return y


# ---- the detector ---------------------------------------------------------------------------------
@register("patch-metric")
class PatchMetric(Detector):
    """Patch-level metric learning on frozen EfficientNet-Lite0 features (module docstring).

    Settings:
        image_size: working size in pixels; backbone: lite0 | lite1 | lite2 (EfficientNet-Lite);
            stages: backbone taps (as PatchCore: 2 = stride 8, 4 = stride 16).
        embedding_dim: E, the adaptor's output (0 = D, the feature size); hidden: width of the residual
            branch (0 = a linear adaptor); init: identity (PatchCore's metric) | rca (the metric of good
            patches' residuals to their nearest good neighbour, module docstring; needs E = D).
        loss: contrastive | triplet | hypersphere; distance: euclidean | cosine (triplet only);
            margin: 0 = the loss's default; radius: r of the hypersphere loss.
        anchor: random | mean (position mode); positives: position | neighbour.
        negatives: auto (the given defect images if any, else synthetic) | synthetic | real | both |
            noise (feature-space noise only); noise_std: SimpleNet noise negatives (0 = off, added to the
            others); synthetic_ratio: synthetic defect images per good training image; defect_scale:
            size of the synthetic defects; defect_patches: share of a given defect image's patches used
            as negatives (its farthest from the good patches).
        epochs, steps_per_epoch, batch_size (tuples per step), lr: Adam on the adaptor; epochs=0 trains
            nothing (no synthetic defects are made): the adaptor stays at its start, e.g. init=rca alone.
        val_fraction: share of the good (and negative) images whose tuples give the validation loss.
        scoring: memory (nearest adapted good patch) | centres (adapted mean good patch of the position).
        coreset_fraction, coreset_sample, projection_dim: PatchCore's greedy coreset of the memory:
            1% of the adapted patches on a 128-d projection, exact up to coreset_sample = 524,288
            patches, on a random pre-sample of that many beyond (linear cost). PatchCore's own
            defaults (2%, 16-d, 262,144) scored lower here: docs/patch_metric.md.
        head: auto (a supervised patch head fused with the distance when labelled defective images
            are given: module docstring) | none; head_hidden, head_steps: its width and Adam steps.
        head_features: frozen (the head reads the distance's features) | tuned (it reads its own copy
            of the backbone from the first tapped stage on, fine-tuned with it for tune_steps steps on
            the labelled images and their flips: module docstring); the distance stays on the frozen one.
        sigma: Gaussian smoothing of the map; feature_batch: images per backbone pass; seed.
    """

    uses_defects: ClassVar[bool] = True
    supervised: ClassVar[bool] = False

    def __init__(self, image_size: int = 224, stages: Sequence[int] = (2, 4), embedding_dim: int = 0,
                 hidden: int = 0, loss: str = "triplet", distance: str = "euclidean", margin: float = 0.0,
                 radius: float = 0.5, anchor: str = "random", positives: str = "position", negatives: str = "auto",
                 noise_std: float = 0.0, synthetic_ratio: float = 1.0, defect_scale: float = 1.0,
                 defect_patches: float = 0.02, epochs: int = 10, steps_per_epoch: int = 50, batch_size: int = 256,
                 lr: float = 1e-3, val_fraction: float = 0.1, scoring: str = "memory",
                 coreset_fraction: float = 0.01, coreset_sample: int = 524288, projection_dim: int = 128,
                 sigma: float = 4.0, backbone: str = "lite0", head: str = "auto", head_hidden: int = 64,
                 head_steps: int = 600, head_features: str = "frozen", tune_steps: int = 400,
                 init: str = "identity", feature_batch: int = 8, seed: int = 0):
        self.image_size = int(image_size)
        self.backbone = check_choice(str(backbone), BACKBONES, "backbone")
        self.head = check_choice(str(head), HEADS, "head")
        self.head_hidden = int(head_hidden)
        self.head_steps = int(head_steps)
        self.head_features = check_choice(str(head_features), HEAD_FEATURES, "head_features")
        self.tune_steps = int(tune_steps)
        self.init = check_choice(str(init), INITS, "init")
        self.stages = tuple(int(s) for s in stages)
        self.embedding_dim = int(embedding_dim)
        self.hidden = int(hidden)
        self.loss = check_choice(str(loss), LOSSES, "loss")
        self.distance = check_choice(str(distance), DISTANCES, "distance")
        self.margin = float(margin)
        self.radius = float(radius)
        self.anchor = check_choice(str(anchor), ANCHORS, "anchor")
        self.positives = check_choice(str(positives), POSITIVES, "positives")
        self.negatives = check_choice(str(negatives), NEGATIVES, "negatives")
        self.noise_std = float(noise_std)
        self.synthetic_ratio = float(synthetic_ratio)
        self.defect_scale = float(defect_scale)
        self.defect_patches = float(defect_patches)
        self.epochs = int(epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.val_fraction = float(val_fraction)
        self.scoring = check_choice(str(scoring), SCORINGS, "scoring")
        self.coreset_fraction = float(coreset_fraction)
        self.coreset_sample = int(coreset_sample)
        self.projection_dim = int(projection_dim)
        self.sigma = float(sigma)
        self.feature_batch = int(feature_batch)
        self.seed = int(seed)
        self._check_settings()
        self._extractor: FeatureExtractor | None = None
        self._tail: nn.Module | None = None
        self._memory: MemoryBank | None = None

    def _check_settings(self) -> None:
        if self.image_size < 32:
            raise SettingsError(f"image_size must be at least 32, got {self.image_size}")
        if self.embedding_dim < 0 or self.hidden < 0:
            raise SettingsError("embedding_dim and hidden must be >= 0")
        if self.head_hidden < 1 or self.head_steps < 1 or self.tune_steps < 1:
            raise SettingsError("head_hidden, head_steps and tune_steps must be >= 1")
        if self.epochs < 0 or self.steps_per_epoch < 1 or self.batch_size < 2 or self.feature_batch < 1:
            raise SettingsError("epochs must be >= 0, steps_per_epoch and feature_batch >= 1, batch_size >= 2")
        if not 0.0 < self.coreset_fraction <= 1.0:
            raise SettingsError(f"coreset_fraction must be in (0, 1], got {self.coreset_fraction}")
        if self.coreset_sample < 0 or self.projection_dim < 0:
            raise SettingsError("coreset_sample and projection_dim must be >= 0")
        if not 0.0 < self.defect_patches <= 1.0:
            raise SettingsError(f"defect_patches must be in (0, 1], got {self.defect_patches}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise SettingsError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.noise_std < 0 or self.synthetic_ratio < 0 or self.margin < 0 or self.radius < 0:
            raise SettingsError("noise_std, synthetic_ratio, margin and radius must be >= 0")
        if self.negatives == "noise" and self.noise_std <= 0:
            raise SettingsError("negatives='noise' needs noise_std > 0")
        if self.distance == "cosine" and self.loss != "triplet":
            raise SettingsError(f"distance='cosine' is a triplet-loss option; the {self.loss} loss is Euclidean")
        if self.anchor == "mean" and self.positives != "position":
            raise SettingsError("anchor='mean' (the mean good patch of a position) needs positives='position'")
        if self.init == "rca" and self.embedding_dim not in (0, self.feature_dim):
            raise SettingsError(f"init='rca' whitens all {self.feature_dim} features: it needs embedding_dim 0 "
                                f"(got {self.embedding_dim})")
        if self.scoring == "centres" and self.positives != "position":
            raise SettingsError("scoring='centres' (one centre per position) needs positives='position'")

    @property
    def margin_value(self) -> float:
        if self.margin > 0:
            return self.margin
        return default_margin(self.distance) if self.loss == "triplet" else DEFAULT_MARGINS[self.loss]

    @property
    def normalised(self) -> bool:
        """Embeddings are L2-normalised before the memory (the cosine distance's geometry)."""
        return self.loss == "triplet" and self.distance == "cosine"

    @property
    def feature_dim(self) -> int:
        channels = stage_channels(self.backbone)
        return sum(channels[s] for s in self.stages)

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.stages, self.backbone)
        return self._extractor

    @property
    def tuned(self) -> bool:
        """The head reads fine-tuned features (head_features=tuned)."""
        return self.head_features == "tuned"

    @property
    def tune_start(self) -> int:
        """The first backbone stage the tuned head has its own copy of: the first tapped one."""
        return min(self.stages)

    @property
    def tail(self) -> nn.Module:
        """The frozen backbone from ``tune_start`` on (its weights shared with the extractor)."""
        if self._tail is None:
            self._tail = self.extractor.tail(self.tune_start)
        return self._tail

    @property
    def memory(self) -> MemoryBank:
        if self._memory is None:
            self._memory = MemoryBank(self.bank_)
        return self._memory

    # ---- features -------------------------------------------------------------------------------
    def _raw_features(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised backbone input (B, 3, H, W) -> raw patch features (B, P, D)."""
        with torch.no_grad():
            return self._patch_rows(self.extractor(batch))

    def _patch_rows(self, taps: list[torch.Tensor]) -> torch.Tensor:
        self.grid_ = tuple(int(g) for g in taps[0].shape[-2:])  # the first tap's grid
        return patch_rows(taps).contiguous()

    def _scoring_inputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input -> (standardised frozen patch features (B, P, D), the head's input): the
        same features, or with a tuned head the trunk's output (one trunk pass feeds both)."""
        with torch.no_grad():
            if not (self.tuned and self.head_ is not None):
                z = self._standardise(self._raw_features(batch))
                return z, z
            trunk = self.extractor.trunk(batch, self.tune_start)
            return self._standardise(self._patch_rows(self.tail(trunk))), trunk

    def _trunks(self, images: Sequence[np.ndarray], description: str) -> torch.Tensor:
        """Images -> (N, len(TUNE_FLIPS), C, h, w) float16: the trunk's output of every orientation,
        the tuned head's training inputs (computed once; half precision halves their memory)."""
        out = []
        for sl in track(batches(len(images), self.feature_batch), description):
            x = prepare_batch(list(images[sl]), self.input_size)
            with torch.no_grad():
                out.append(torch.stack([self.extractor.trunk(torch.flip(x, f) if f else x, self.tune_start)
                                        .contiguous() for f in TUNE_FLIPS], 1).half())
        return torch.cat(out)

    def patch_features(self, images: Sequence[np.ndarray], description: str = "patch-metric: features") -> torch.Tensor:
        """Images -> raw patch features (N, P, D), in batches of ``feature_batch``."""
        out = [self._raw_features(prepare_batch(list(images[sl]), self.input_size))
               for sl in track(batches(len(images), self.feature_batch), description)]
        return torch.cat(out)

    def _standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mu_) / self.scale_

    def _embed_rows(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            emb = self.adaptor_(z)
            return F.normalize(emb, dim=-1) if self.normalised else emb

    # ---- fit ------------------------------------------------------------------------------------
    def fit(self, images, labels=None, **kwargs) -> "PatchMetric":
        """Good images (label 0) are split by the base class (training / calibration); defective
        images (label > 0, one class per defect type, or 1) only give negative patches."""
        images = check_images(images)
        defects: list[np.ndarray] = []
        good = images
        if labels is not None:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(labels) != len(images):
                raise SettingsError(f"{len(images)} images but {len(labels)} labels")
            defects = [images[i] for i in np.flatnonzero(labels > 0)]
            good = [images[i] for i in np.flatnonzero(labels == 0)]
            if not good:
                raise SettingsError("no good (label 0) images to learn from")
        self._given_defects = defects
        try:
            super().fit(good, None, **kwargs)
        finally:
            del self._given_defects
        n_real = self.train_info_["n_real_defect_images"]
        self.fit_info_["n_train"] += n_real
        self.fit_info_["n_train_defective"] = n_real
        self.fit_info_["negatives"] = self.train_info_["negatives"]
        self.fit_info_["head"] = self.train_info_["head"]  # in the manifest: what the score is made of
        if "fusion" in self.train_info_:
            self.fit_info_["fusion"] = self.train_info_["fusion"]
        return self

    def _negative_mode(self, n_given: int) -> str:
        mode = self.negatives
        if mode == "auto":
            mode = "real" if n_given else "synthetic"
        if mode in ("real", "both") and not n_given:
            raise SettingsError(f"negatives={self.negatives!r} needs defective training images (labels > 0); "
                                "none were given")
        return mode

    def _synthetic_negatives(self, images: list[np.ndarray], rng: np.random.Generator):
        """Synthetic defects in copies of the good images at the working size -> (features (n, P, D) raw,
        coverage (n, P), source image index (n,))."""
        from gaikan.data.synthetic import add_random_defect

        n = max(1, int(round(self.synthetic_ratio * len(images))))
        picks = rng.integers(0, len(images), size=n)
        feats, covers = [], []
        for sl in track(batches(n, self.feature_batch), "patch-metric: synthetic defects"):
            batch, masks = [], []
            for i in picks[sl]:
                base = prepare_image(images[i], self.input_size).transpose(1, 2, 0)
                defective, mask = add_random_defect(base, rng, scale=self.defect_scale, min_area=0.002)
                batch.append(defective.transpose(2, 0, 1))
                masks.append(mask)
            x = normalise(torch.from_numpy(np.ascontiguousarray(np.stack(batch), dtype=np.float32)))
            feats.append(self._raw_features(x))
            covers.append(mask_coverage(np.stack(masks), self.grid_))
        return torch.cat(feats), np.concatenate(covers), picks

    def _fit(self, images: list[np.ndarray], labels: np.ndarray | None) -> None:
        self._check_settings()
        given = getattr(self, "_given_defects", [])
        mode = self._negative_mode(len(given))
        start = time.perf_counter()
        good_raw = self.patch_features(images)  # (N, P, D)
        given_raw = self.patch_features(given, "patch-metric: defect images") if mode in ("real", "both") else None
        self._fit_rows(images, good_raw, given, given_raw, start)

    def _fit_rows(self, images: list[np.ndarray], good_raw: torch.Tensor, given: list[np.ndarray],
                  given_raw: torch.Tensor | None, start: float, cross_validate: bool = True,
                  trunks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """The fit from the raw patch features of the good images and of the given defective ones
        (None: not used as negatives); the images themselves for the synthetic defects and a tuned
        head's trunk outputs (``_trunks``: of the goods and of the given defects; computed here when
        ``trunks`` is None). ``cross_validate`` False: the fusion weight is not chosen (a fold's own fit)."""
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)
        mode = self._negative_mode(len(given))
        n_good, n_pos, dim = good_raw.shape
        self.mu_ = good_raw.reshape(-1, dim).mean(0)
        # s: RMS distance between good patches at the same position of two different good images
        self.scale_ = _rms(_same_position_differences(good_raw, rng))
        good = self._standardise(good_raw)

        # negatives: rows (K, D) standardised, their positions (K,) and source "image" ids for validation
        neg_rows, neg_pos, neg_img = [], [], []
        n_synth = n_real = 0
        defect_z = None  # all patches of the given defective images, for the supervised head
        training = self.epochs > 0
        if mode in ("synthetic", "both") and training:
            feats, cover, _ = self._synthetic_negatives(images, rng)
            img_idx, pos_idx = np.nonzero(cover >= MASK_COVERAGE)
            neg_rows.append(self._standardise(feats[torch.from_numpy(img_idx), torch.from_numpy(pos_idx)]))
            neg_pos.append(pos_idx)
            neg_img.append(img_idx)
            n_synth = len(feats)
            del feats
        if mode in ("real", "both"):
            feats = self._standardise(given_raw)
            probe = good.reshape(-1, dim)[torch.from_numpy(rng.choice(n_good * n_pos, min(n_good * n_pos, 20000),
                                                                      replace=False))]
            dist = MemoryBank(probe).nearest(feats.reshape(-1, dim))[0].reshape(len(feats), n_pos).numpy()
            top = top_patches(dist, self.defect_patches)
            img_idx = np.repeat(np.arange(len(feats)), top.shape[1])
            pos_idx = top.reshape(-1)
            neg_rows.append(feats[torch.from_numpy(img_idx), torch.from_numpy(pos_idx)])
            neg_pos.append(pos_idx)
            neg_img.append(img_idx + n_synth)
            n_real = len(feats)
            if self.head == "auto":
                defect_z = feats
            del feats
        if training and not neg_rows and self.noise_std <= 0:
            raise SettingsError("no negatives: choose negatives other than 'noise' or set noise_std > 0")
        negatives = torch.cat(neg_rows) if neg_rows else torch.zeros(0, dim)
        neg_pos = np.concatenate(neg_pos) if neg_pos else np.zeros(0, np.int64)
        neg_img = np.concatenate(neg_img) if neg_img else np.zeros(0, np.int64)
        if neg_rows and len(negatives) == 0:
            raise SettingsError("the synthetic defects cover no patch; raise defect_scale")
        self.fit_seconds_ = {"features": time.perf_counter() - start}

        # training / validation images (validation tuples only give the validation loss curve)
        good_val = np.zeros(n_good, bool)
        n_val = int(self.val_fraction * n_good)
        if n_real and self.head == "auto" and self.val_fraction > 0:
            n_val = max(n_val, 2)  # the supervised head standardises its part of the fusion on them
        if n_val >= 2 and n_good - n_val >= 2:
            good_val[rng.permutation(n_good)[:n_val]] = True
        neg_val = np.zeros(len(negatives), bool)
        n_neg_img = n_synth + n_real
        if good_val.any() and n_neg_img >= 4:
            held = rng.permutation(n_neg_img)[: max(1, int(self.val_fraction * n_neg_img))]
            neg_val = np.isin(neg_img, held)
        if len(negatives) and neg_val.all():
            neg_val[:] = False
        self.adaptor_ = PatchAdaptor(dim, self.embedding_dim or dim, self.hidden, self.seed)
        if self.init == "rca":
            if not good_val.any():
                raise SettingsError(f"init='rca' learns from held-out good images: {n_good} good training images "
                                    f"at val_fraction={self.val_fraction} hold out fewer than 2")
            with torch.no_grad():
                self.adaptor_.linear.weight.copy_(self._rca_weight(good, good_val, rng))
        self.means_ = good.mean(0)  # (P, D): the mean good patch of each position
        train_sets = (good[torch.from_numpy(~good_val)], negatives[torch.from_numpy(~neg_val)], neg_pos[~neg_val])
        middle = time.perf_counter()
        val_loss = None
        if good_val.any() and training:
            val_sets = (good[torch.from_numpy(good_val)], negatives[torch.from_numpy(neg_val)], neg_pos[neg_val])
            if len(val_sets[1]) == 0:
                val_sets = (val_sets[0], train_sets[1], train_sets[2])
            val_batch = self._draw(val_sets, np.random.default_rng(self.seed + 1), 4 * self.batch_size)

            def val_loss():
                return float(self._tuple_loss(*val_batch))

        def make_batches(batch_rng):
            return [self._draw(train_sets, batch_rng, self.batch_size) for _ in range(self.steps_per_epoch)]

        settings = TrainSettings(epochs=self.epochs, lr=self.lr, seed=self.seed)
        self.history_ = {"train_loss": [], "val_loss": []}  # epochs=0: the adaptor stays at its start
        if training:
            self.history_ = train_network(self.adaptor_, make_batches, lambda b, _rng: self._tuple_loss(*b),
                                          val_loss, settings, f"patch-metric ({self.loss}): epochs")
        _frozen(self.adaptor_)
        self.fit_seconds_["training"] = time.perf_counter() - middle
        self.train_info_ = {"negatives": mode if training else "none: epochs=0", "n_good_images": int(n_good),
                            "n_synthetic_images": int(n_synth), "n_real_defect_images": int(n_real),
                            "n_negative_patches": int(len(negatives)), "noise_negatives": self.noise_std > 0}

        # the supervised head (labelled defects given): needs held-out goods to standardise its fusion
        use_head = defect_z is not None and bool(good_val.any())
        self.head_ = None
        self.fusion_ = None
        self.train_info_["head"] = "trained" if use_head else (
            "none: head=none" if self.head == "none" and n_real else
            "none: no labelled defective images" if defect_z is None else
            "none: too few good images to hold out for its calibration")
        memory_goods = good[torch.from_numpy(~good_val)] if use_head else good

        # the memory: adapted good patches (or the adapted mean patch per position)
        middle = time.perf_counter()
        self.centres_ = self._embed_rows(self.means_)
        self.bank_ = self._bank(memory_goods) if self.scoring == "memory" else self.centres_.clone()
        self.fit_seconds_["memory"] = time.perf_counter() - middle
        self._memory = None
        if use_head:
            middle = time.perf_counter()
            val = torch.from_numpy(good_val)
            if self.tuned:  # the head's inputs: the trunk's outputs, in every orientation
                if trunks is None:
                    trunks = (self._trunks(images, "patch-metric: good images for the tuned head"),
                              self._trunks(given, "patch-metric: defect images for the tuned head"))
                inputs = trunks[0][~val], trunks[0][val], trunks[1]
            else:
                inputs = good[~val], good[val], defect_z
            weight = (self._cross_validated_weight(images, good_raw, given, given_raw, trunks, rng)
                      if cross_validate else None)
            self._fit_head(*inputs, good[val], weight)
            self.fit_seconds_["head"] = time.perf_counter() - middle

    def _rca_weight(self, good: torch.Tensor, held: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """The RCA start of W (module docstring) from standardised good patches (N, P, D), the images
        ``held`` out giving the chunklets and the others the reference."""
        dim = good.shape[-1]
        rest = good[torch.from_numpy(~held)].reshape(-1, dim)
        size = min(len(rest), max(dim, int(round(self.coreset_fraction * len(rest)))))
        reference = rest[torch.from_numpy(rng.choice(len(rest), size, replace=False))]
        queries = good[torch.from_numpy(held)].reshape(-1, dim)
        nearest = MemoryBank(reference).nearest(queries)[1][:, 0]
        weight = torch.from_numpy(rca_whitening((queries - reference[nearest]).numpy()))
        return weight / _rms(_same_position_differences(good, rng) @ weight.T)

    # ---- the supervised head ----------------------------------------------------------------------
    @property
    def head_k(self) -> int:
        """Patches pooled into an image's head logit (the defect_patches share of the grid)."""
        return max(1, int(round(self.defect_patches * self.grid_[0] * self.grid_[1])))

    def _train_head(self, good_in: torch.Tensor, defect_in: torch.Tensor, seed: int) -> nn.Module:
        """A per-patch MLP, BCE on image labels with top-k pooling. Inputs: (n, P, D) standardised rows,
        or with a tuned head (n, orientations, C, h, w) trunk outputs, each image drawn in a random
        orientation, and the backbone copy trained with the MLP."""
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        head = self._new_head()
        if self.tuned:
            for p in head.tail.parameters():
                p.requires_grad_(True)
            groups = [{"params": head.tail.parameters(), "lr": TUNE_LR}, {"params": head.mlp.parameters()}]
            steps, n = self.tune_steps, min(TUNE_BATCH, len(good_in), len(defect_in))
        else:
            groups, steps, n = head.parameters(), self.head_steps, min(32, len(good_in), len(defect_in))
        opt = torch.optim.Adam(groups, lr=1e-3, weight_decay=1e-4)
        target = torch.cat([torch.zeros(n), torch.ones(n)])

        def draw(rows):
            pick = torch.from_numpy(rng.integers(0, len(rows), n))
            if not self.tuned:
                return rows[pick]
            return rows[pick, torch.from_numpy(rng.integers(0, rows.shape[1], n))].float()

        for _ in track(range(steps), "patch-metric: fine-tuning the head") if self.tuned else range(steps):
            logits = self._pooled(head(torch.cat([draw(good_in), draw(defect_in)])).squeeze(-1))
            loss = F.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return _frozen(head)

    def _new_head(self) -> nn.Module:
        mlp = nn.Sequential(nn.Linear(self.feature_dim, self.head_hidden), nn.LeakyReLU(0.2),
                            nn.Linear(self.head_hidden, 1))
        if not self.tuned:
            return mlp
        return TunedHead(self.extractor.tail(self.tune_start, copy=True), mlp, self.mu_, float(self.scale_))

    def _pooled(self, logits: torch.Tensor) -> torch.Tensor:
        return top_k_mean(logits, self.head_k)

    def _head_patches(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The head's input (B, P, D) standardised rows, or a tuned head's (B, C, h, w) trunk
        outputs (the first orientation of (B, orientations, C, h, w)) -> (B, P) patch logits."""
        if self.tuned and x.dim() == 5:
            x = x[:, 0].float()
        with torch.no_grad():
            return head(x).squeeze(-1)

    def _grid_maps(self, grid_values: torch.Tensor) -> torch.Tensor:
        """(B, P) patch values -> (B, H, W) maps: upsampled to the working size and smoothed."""
        return smooth_map(grid_values.reshape(-1, *self.grid_), self.input_size, self.sigma)

    def _bank(self, goods: torch.Tensor) -> torch.Tensor:
        """The memory of standardised good patch rows (n, P, D): their adapted rows' coreset."""
        emb = self._embed_rows(goods.reshape(-1, goods.shape[-1]))
        index = greedy_coreset(emb, self.coreset_fraction, projection_dim=self.projection_dim, seed=self.seed,
                               sample=self.coreset_sample)
        return emb[index].contiguous()

    def _distance_scores(self, z: torch.Tensor) -> np.ndarray:
        out = [self._grid_maps(self._patch_distances(z[sl])).amax(dim=(1, 2))
               for sl in batches(len(z), self.feature_batch)]
        return torch.cat(out).numpy().astype(np.float64)

    def _head_scores(self, head: nn.Module, z: torch.Tensor) -> np.ndarray:
        out = [self._pooled(self._head_patches(head, z[sl]))
               for sl in batches(len(z), self.feature_batch)]
        return torch.cat(out).numpy().astype(np.float64)

    def _cross_validated_weight(self, images: list[np.ndarray], good_raw: torch.Tensor, given: list[np.ndarray],
                                given_raw: torch.Tensor, trunks: tuple[torch.Tensor, torch.Tensor] | None,
                                rng: np.random.Generator) -> dict | None:
        """The distance's fusion weight by 2-fold cross-validation, or None (fewer than 4 good or 4
        defective images, or a fold with too few goods to standardise its head on). Fold k holds out half of the good and half of the defective images and
        fits a whole model of its own on the others -- adaptor (whose negatives are the defects'
        patches), memory and head -- so that its held-out images are scored as unseen ones; their
        fused scores use its own standardisation. The weight maximises the mean of the two folds'
        AUROCs (held-out defects against held-out goods: every good image is a negative once). The
        folds read the features (and a tuned head's trunk outputs) computed for the whole fit."""
        from sklearn.metrics import roc_auc_score

        n_good, n_def = len(images), len(given)
        if n_def < 4 or n_good < 4:
            return None
        cv = np.zeros(len(FUSION_WEIGHTS))
        folds = zip(np.array_split(rng.permutation(n_good), 2), np.array_split(rng.permutation(n_def), 2))
        for f, (held_g, held_d) in enumerate(folds):
            rest_g, rest_d = np.setdiff1d(np.arange(n_good), held_g), np.setdiff1d(np.arange(n_def), held_d)
            rest_g, rest_d, held_g, held_d = (torch.from_numpy(i) for i in (rest_g, rest_d, held_g, held_d))
            fold = type(self)(**{**self.settings(), "seed": self.seed + 1 + f})
            fold._extractor, fold.grid_ = self.extractor, self.grid_
            fold._fit_rows([images[i] for i in rest_g], good_raw[rest_g], [given[i] for i in rest_d],
                           given_raw[rest_d], time.perf_counter(), cross_validate=False,
                           trunks=None if trunks is None else (trunks[0][rest_g], trunks[1][rest_d]))
            if fold.head_ is None:  # too few goods left to standardise a fold's head on
                return None
            z = fold._standardise(torch.cat([good_raw[held_g], given_raw[held_d]]))
            head_in = torch.cat([trunks[0][held_g], trunks[1][held_d]]) if self.tuned else z
            d, h = fold._distance_scores(z), fold._head_scores(fold.head_, head_in)
            y = np.r_[np.zeros(len(held_g)), np.ones(len(held_d))]
            standard = tuple(float(v) for v in fold.fusion_[1:])
            cv += [roc_auc_score(y, fuse(d, h, (w, *standard))) for w in FUSION_WEIGHTS]
        cv /= 2
        return {"distance_weight": FUSION_WEIGHTS[int(np.argmax(cv))], "chosen_by": CV_RULE,
                "cv_auroc": {str(k): round(float(v), 4) for k, v in zip(FUSION_WEIGHTS, cv)},
                "n_cv_goods": int(n_good), "n_cv_defects": int(n_def)}

    def _fit_head(self, train_in: torch.Tensor, val_in: torch.Tensor, defect_in: torch.Tensor,
                  val_z: torch.Tensor, weight: dict | None) -> None:
        """The head on the training goods' and the defective images' inputs, and the fusion: the
        weight (``_cross_validated_weight``; None: 0.5), each part standardised on the held-out goods
        (inputs val_in, standardised rows val_z)."""
        self.head_ = self._train_head(train_in, defect_in, self.seed)
        d_val, h_val = self._distance_scores(val_z), self._head_scores(self.head_, val_in)
        md, sd = float(d_val.mean()), max(float(d_val.std()), 1e-6)
        mh, sh = float(h_val.mean()), max(float(h_val.std()), 1e-6)
        w = 0.5 if weight is None else weight["distance_weight"]
        self.fusion_ = torch.tensor([w, md, sd, mh, sh], dtype=torch.float64)
        self.train_info_["fusion"] = {"distance_weight": w, "chosen_by": "default (too few good or defective "
                                      "images for 2 folds)", "cv_auroc": {}} if weight is None else dict(weight)
        self.train_info_["fusion"]["n_held_out_goods"] = int(len(val_z))

    # ---- training tuples --------------------------------------------------------------------------
    def _draw(self, sets, rng: np.random.Generator, n: int):
        """One batch: (anchor rows, positive rows, negative rows) standardised, each (n', D)."""
        good, negatives, neg_pos = sets
        n_img, n_pos, dim = good.shape
        parts = []
        if len(negatives) and self.negatives != "noise":
            k = rng.integers(0, len(negatives), n)
            parts.append((negatives[torch.from_numpy(k)], neg_pos[k]))
        if self.noise_std > 0:
            src_img = torch.from_numpy(rng.integers(0, n_img, n))
            pos = rng.integers(0, n_pos, n)
            gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
            # per-component std noise_std / sqrt(D): E||noise||^2 = noise_std^2, in units of the good spread
            noise = torch.randn(n, dim, generator=gen) * (self.noise_std / math.sqrt(dim))
            noisy = good[src_img, torch.from_numpy(pos)] + noise
            parts.append((noisy, pos))
        neg = torch.cat([rows for rows, _ in parts])
        pos = np.concatenate([p for _, p in parts])
        m = len(neg)
        if self.positives == "position":
            ia, ip = _image_pairs(rng, n_img, m)
            p_t = torch.from_numpy(pos)
            anchor = self.means_[p_t] if self.anchor == "mean" else good[ia, p_t]
            positive = good[ip, p_t]
            return anchor, positive, neg
        pool = good.reshape(-1, dim)[torch.from_numpy(rng.integers(0, n_img * n_pos, NEIGHBOUR_POOL))]
        memory = MemoryBank(pool)
        _, a_idx = memory.nearest(neg)
        anchor = pool[a_idx[:, 0]]
        _, ap_idx = memory.nearest(anchor, k=2)
        positive = pool[ap_idx[:, 1]]  # the nearest other pool entry (the first is the anchor itself)
        return anchor, positive, neg

    def _tuple_loss(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        m = len(anchor)
        emb = self.adaptor_(torch.cat([anchor, positive, negative]))
        a, p, n = emb[:m], emb[m:2 * m], emb[2 * m:]
        if self.loss == "triplet":
            return triplet_loss(a, p, n, self.distance, self.margin_value)
        if self.loss == "contrastive":
            same = torch.cat([torch.ones(m), torch.zeros(m)])
            return contrastive_loss(torch.cat([a, a]), torch.cat([p, n]), same, self.margin_value)
        return hypersphere_loss(p, a, n, a, self.radius, self.margin_value)

    # ---- scoring ----------------------------------------------------------------------------------
    def _patch_distances(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised patch features (B, P, D) -> (B, P) distances to the good memory (or centres)."""
        b, n_pos, _ = z.shape
        emb = self._embed_rows(z)
        if self.scoring == "centres":
            return (emb - self.centres_[None]).norm(dim=-1)
        return self.memory.nearest(emb.reshape(-1, emb.shape[-1]))[0].reshape(b, n_pos)

    def _score(self, images: list[np.ndarray]) -> ScoreResult:
        scores, maps = [], []
        for sl in track(batches(len(images), self.feature_batch), "patch-metric: scoring"):
            z, head_input = self._scoring_inputs(prepare_batch(list(images[sl]), self.input_size))
            dist = self._patch_distances(z)
            if self.head_ is None:
                amap = self._grid_maps(dist)
                score = amap.amax(dim=(1, 2))
            else:
                score, amap = self._fused(dist, self._head_patches(self.head_, head_input))
            maps.append(amap.numpy())
            scores.append(score.numpy())
        return ScoreResult(np.concatenate(scores).astype(np.float32), np.concatenate(maps))

    def _fused(self, dist: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) distances and head logits -> (fused scores (B,), fused maps (B, H, W))."""
        fusion = tuple(float(v) for v in self.fusion_)
        score = fuse(self._grid_maps(dist).amax(dim=(1, 2)), self._pooled(logits), fusion)
        return score, self._grid_maps(fuse(dist, logits, fusion))

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """For the report's embedding scatter: the adapted embedding (N, E) of each image's most
        anomalous patch (the patch that sets its score), so the scatter is at patch level."""
        self._check_fitted()
        images = check_images(images)
        out = []
        for sl in batches(len(images), self.feature_batch):
            z = self._standardise(self._raw_features(prepare_batch(list(images[sl]), self.input_size)))
            worst = self._patch_distances(z).argmax(1)
            emb = self._embed_rows(z[torch.arange(len(z)), worst])
            out.append(emb.numpy())
        return np.concatenate(out)

    def scoring_module(self) -> nn.Module:
        """The scoring path as one module for ONNX export: (N, 3, H, W) in [0, 1] -> (scores, maps)."""
        return PatchMetricScoring(self).eval()

    # ---- persistence ------------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        state = {f"adaptor.{k}": v.detach().numpy() for k, v in self.adaptor_.state_dict().items()}
        state.update({
            "mu": self.mu_.numpy(), "scale": np.asarray([float(self.scale_)], np.float32),
            "bank": self.bank_.numpy(), "centres": self.centres_.numpy(),
            "grid": np.asarray(self.grid_, dtype=np.int64),
        })
        for key, values in self.history_.items():
            state[f"history.{key}"] = np.asarray(values, dtype=np.float64)
        if self.head_ is not None:
            state.update({f"head.{k}": v.detach().numpy() for k, v in self.head_.state_dict().items()})
            state["fusion"] = self.fusion_.numpy()
        return state

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self._check_settings()
        for key in ("mu", "scale", "bank", "centres", "grid", "adaptor.linear.weight"):
            if key not in state:
                raise ModelFormatError(f"patch-metric model has no {key!r} in its tensors")
        dim = self.feature_dim
        if state["mu"].shape != (dim,):
            raise ModelFormatError(f"patch-metric model has {state['mu'].shape[0]} features per patch, "
                                   f"the settings give {dim}")
        weight = state["adaptor.linear.weight"]
        self.adaptor_ = _load_frozen(PatchAdaptor(dim, weight.shape[0], self.hidden, self.seed), state, "adaptor")
        self.mu_ = torch.from_numpy(np.array(state["mu"])).float()
        self.scale_ = torch.tensor(float(np.asarray(state["scale"]).reshape(-1)[0]))
        self.bank_ = torch.from_numpy(np.array(state["bank"])).float()
        self.centres_ = torch.from_numpy(np.array(state["centres"])).float()
        self.grid_ = tuple(int(v) for v in state["grid"])
        self.history_ = {k[len("history."):]: np.asarray(v).tolist() for k, v in state.items()
                         if k.startswith("history.")}
        self._memory = None
        self.head_ = self.fusion_ = None
        if "fusion" in state:
            self.head_ = _load_frozen(self._new_head(), state, "head")
            self.fusion_ = torch.from_numpy(np.array(state["fusion"], dtype=np.float64))
            if self.fusion_.shape != (5,):
                raise ModelFormatError(f"patch-metric fusion has shape {tuple(self.fusion_.shape)}, expected (5,)")


class TunedHead(nn.Module):
    """The supervised head on fine-tuned features (head_features=tuned): a copy of the backbone from
    the first tapped stage on, PatchCore's locally aware features, the frozen standardisation, the
    per-patch MLP. (B, C, h, w) trunk outputs -> (B, P, 1) patch logits. The copy's batch-norm
    statistics stay ImageNet's (its layers are kept in evaluation mode): a few hundred images
    would estimate them worse."""

    def __init__(self, tail: nn.Module, mlp: nn.Module, mu: torch.Tensor, scale: float):
        super().__init__()
        self.tail = tail
        self.mlp = mlp
        self.register_buffer("mu", mu.clone())
        self.scale = float(scale)

    def train(self, mode: bool = True) -> "TunedHead":
        super().train(mode)
        self.tail.eval()
        return self

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.mlp((patch_rows(self.tail(trunk)) - self.mu) / self.scale)


def _image_pairs(rng: np.random.Generator, n_images: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random pairs (i, j) of indices of two different images among n_images (the same image
    when there is only one)."""
    i = torch.from_numpy(rng.integers(0, n_images, n))
    return i, (i + torch.from_numpy(rng.integers(1, max(n_images, 2), n))) % n_images


def _same_position_differences(patches: torch.Tensor, rng: np.random.Generator, n: int = 4096) -> torch.Tensor:
    """(N, P, D) patches of N images -> (n, D) differences of random pairs of patches at the same
    position of two different images."""
    n_images, n_pos, _ = patches.shape
    i, j = _image_pairs(rng, n_images, n)
    p = torch.from_numpy(rng.integers(0, n_pos, n))
    return patches[i, p] - patches[j, p]


def _rms(rows: torch.Tensor) -> torch.Tensor:
    """Root mean square length of (n, D) rows, at least 1e-6."""
    return torch.sqrt(rows.square().sum(1).mean()).clamp_min(1e-6)


def _frozen(module: nn.Module) -> nn.Module:
    """Evaluation mode, no gradients: a trained part of the scoring path."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _load_frozen(module: nn.Module, state: dict[str, np.ndarray], prefix: str) -> nn.Module:
    """Load the ``prefix.*`` tensors of a saved state into ``module`` (refused with a message when
    they do not fit the settings), frozen."""
    tensors = {k[len(prefix) + 1:]: torch.from_numpy(np.array(v)) for k, v in state.items()
               if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(tensors)
    except RuntimeError as exc:
        raise ModelFormatError(f"patch-metric {prefix} does not match the settings: {exc}") from None
    return _frozen(module)


class PatchMetricScoring(nn.Module):
    """patch-metric's scoring path for ONNX export (gaikan.detectors.scoring's conventions): the
    backbone, PatchCore's locally aware features, the standardisation and the adaptor (MatMul/Add,
    the residual branch's LeakyReLU), L2 normalisation for the cosine distance, then the nearest
    memory distance by the norm expansion on the centred bank (one MatMul and one ReduceMin), or the
    distance to the position centres, and PatchCore's map head (upsampling, smoothing, max). With a
    supervised head: its patch logits (two MatMuls, LeakyReLU), top-k pooling (TopK, ReduceMean) and
    the fusion with the distance (module docstring); a tuned head reads the trunk's output, which
    the frozen rest of the backbone reads too."""

    def __init__(self, detector: PatchMetric):
        super().__init__()
        from gaikan.detectors.scoring import _MapHead

        detector._check_fitted()
        self.extractor = detector.extractor
        self.tuned = detector.tuned and detector.head_ is not None
        if self.tuned:
            self.tune_start = detector.tune_start
            self.tail = detector.tail
        self.register_buffer("mu", detector.mu_.clone())
        self.scale = float(detector.scale_)
        self.adaptor = detector.adaptor_
        self.normalised = detector.normalised
        self.centres_mode = detector.scoring == "centres"
        if self.centres_mode:
            self.register_buffer("centres", detector.centres_.clone())
        else:
            memory = detector.memory
            self.register_buffer("centre", memory.centre.clone())
            self.register_buffer("bank_t", memory.bank_t.clone())
            self.register_buffer("bank_sq", memory.sq.clone())
        self.grid = tuple(int(g) for g in detector.grid_)
        self.head = _MapHead(detector.input_size, detector.sigma)
        self.patch_head = detector.head_
        if self.patch_head is not None:
            self.head_k = detector.head_k
            self.fusion = tuple(float(v) for v in detector.fusion_)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalise(image)
        if self.tuned:
            trunk = self.extractor.trunk(x, self.tune_start)
            taps = self.tail(trunk)
        else:
            taps = self.extractor(x)
        z = (patch_rows(taps) - self.mu) / self.scale  # (B, P, D) standardised
        head_input = trunk if self.tuned else z
        emb = self.adaptor(z)
        if self.normalised:
            emb = F.normalize(emb, dim=-1)
        n_pos = self.grid[0] * self.grid[1]
        if self.centres_mode:
            dist = (emb - self.centres[None]).norm(dim=-1)
        else:
            q = emb.reshape(-1, emb.shape[-1]) - self.centre
            d2 = torch.addmm(self.bank_sq[None], q, self.bank_t, beta=1.0, alpha=-2.0)
            d2 = d2 + q.square().sum(1, keepdim=True)
            dist = d2.min(1)[0].clamp_min(0).sqrt().reshape(-1, n_pos)
        s_d, amap = self.head(dist.reshape(-1, self.grid[0], self.grid[1]))
        if self.patch_head is None:
            return s_d, amap
        logits = self.patch_head(head_input).squeeze(-1)
        _, amap = self.head(fuse(dist, logits, self.fusion).reshape(-1, *self.grid))
        return fuse(s_d, top_k_mean(logits, self.head_k), self.fusion), amap
