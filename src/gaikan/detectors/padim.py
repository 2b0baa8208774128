"""PaDiM: a Gaussian per patch position over pretrained CNN features (Defard et al., ICPR 2021,
"PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization").

For each position p of the finest tap's grid, the embedding x_p (d randomly chosen channels of the
concatenated multi-layer features) of the good training images is modelled as N(mu_p, Sigma_p) with
Sigma_p = sample covariance + eps * I. A patch's anomaly is its Mahalanobis distance

    M(x_p) = sqrt((x_p - mu_p)^T Sigma_p^-1 (x_p - mu_p)) = || W_p (x_p - mu_p) ||_2,

where Sigma_p = C_p C_p^T (Cholesky) and W_p = C_p^-1, precomputed at fit time. Scoring every
position of a batch is then one batched matrix product. The distance map is upsampled to the working
size, smoothed with a Gaussian (sigma 4) and the image score is its maximum.

Fitting streams: only the per-position sums of x and x x^T are kept (float64), never all features.
The outer products of a chunk of ``accumulate`` images are one float32 batched product on features
centred by the first batch's mean (well conditioned), then added to the float64 totals: the float64
addition of P x d x d numbers is the expensive part, so it happens once per chunk, not per batch.

``gaussian="shared"`` is the position-independent variant for stationary textures (a part whose
surface looks the same everywhere, photographed at no fixed position): one Gaussian N(mu, Sigma) over
the patches of every position, M(x_p) = || W (x_p - mu) ||. It needs far fewer images (every image
gives P samples) and does not care where the texture's pattern falls in the frame.
``n_features=0`` keeps every channel of the taps (d = sum of the taps' channels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gaikan.backbones.features import FeatureExtractor, tap_features
from gaikan.detectors.base import Detector, ScoreResult, register
from gaikan.detectors.maps import gaussian_blur, upsample
from gaikan.detectors.tiling import check_tiling, score_patch_detector, tile_views
from gaikan.errors import ModelFormatError, SettingsError
from gaikan.progress import batches, track

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
GAUSSIANS = ("per-position", "shared")


def embed(features: list[torch.Tensor], channel_index: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Concatenate the chosen channels of several taps at the finest tap's resolution.

    features: per-tap (B, C_i, h_i, w_i); channel_index: sorted indices into the concatenation of all
    taps' channels; returns (B, d, h_0, w_0). Coarser taps are upsampled with nearest neighbour.
    """
    size = features[0].shape[-2:]
    parts = []
    for feat, start in zip(features, offsets):
        local = channel_index[(channel_index >= start) & (channel_index < start + feat.shape[1])] - start
        if local.numel() == 0:
            continue
        part = feat.index_select(1, local)
        if part.shape[-2:] != size:
            part = F.interpolate(part, size=size, mode="nearest")
        parts.append(part)
    return torch.cat(parts, dim=1)


def whitening_factors(sum_x: torch.Tensor, sum_xxt: torch.Tensor, n: int, eps: float,
                      chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """From streamed sums to means (P, d) and whitening matrices W_p = chol(Sigma_p)^-1 (P, d, d).

    Sigma_p = (sum x x^T - n mu mu^T) / (n - 1) + eps I, computed in float64 in chunks of positions.
    """
    mean = sum_x / n
    n_pos, d = mean.shape
    eye = torch.eye(d, dtype=torch.float64)
    whiten = torch.empty(n_pos, d, d, dtype=torch.float32)
    for sl in batches(n_pos, chunk):
        mu = mean[sl]
        cov = (sum_xxt[sl] - n * mu[:, :, None] * mu[:, None, :]) / max(n - 1, 1) + eps * eye
        chol = torch.linalg.cholesky(cov)
        whiten[sl] = torch.linalg.solve_triangular(chol, eye.expand_as(cov), upper=False).float()
    return mean.float(), whiten


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """Distances of embeddings x (B, P, d) to per-position Gaussians: ||W_p (x_bp - mu_p)|| -> (B, P).

    One batched matrix product over all positions; no loop over positions or images.
    """
    diff = (x - mean[None]).transpose(0, 1)  # (P, B, d)
    if whiten.shape[0] == 1:  # one shared Gaussian: a plain product over every patch of the batch
        y = diff.reshape(-1, diff.shape[-1]) @ whiten[0].t()
        return y.square().sum(-1).clamp_min(0).sqrt().view(diff.shape[0], diff.shape[1]).transpose(0, 1)
    y = torch.bmm(diff, whiten.transpose(1, 2))  # (P, B, d): row b is W_p diff_bp
    return y.square().sum(-1).clamp_min(0).sqrt().transpose(0, 1)


def moment_sums(samples: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of (x - shift) and (x - shift)(x - shift)^T over the samples of each group.

    samples: (G, S, d) float32, S samples of each of G groups (positions, or one shared group);
    shift: (G, d). One float32 batched matrix product; callers add the result to float64 totals.
    """
    centred = samples - shift[:, None, :]
    return centred.sum(1), torch.bmm(centred.transpose(1, 2), centred)


@register("padim")
class PaDiM(Detector):
    """PaDiM on EfficientNet-Lite0 features.

    Settings:
        image_size: working size in pixels (images are resized to image_size x image_size).
        backbone: "lite0", "lite1" or "lite2" (EfficientNet-Lite, ImageNet weights).
        stages: backbone stages tapped (see gaikan.backbones.features); the first sets the grid.
        n_features: d, the number of randomly chosen channels (seeded); 0 keeps them all.
        gaussian: "per-position" (PaDiM: one Gaussian per grid position) or "shared" (one Gaussian
            for the patches of all positions: stationary textures).
        eps: covariance regularisation eps * I.
        sigma: Gaussian smoothing of the anomaly map, in working-size pixels.
        batch_size: images (or tiles) per forward pass.
        storage_dtype: "float32" or "float16" whitening matrices in the saved model (float16 halves
            it; the matrices are rounded at fit time so scores are the same before saving and after
            loading; scoring computes in float32).
        tile_size, tile_overlap, tile_reduce: tiling of large images (gaikan.detectors.tiling);
            tile_size 0 = off (plain resize), overlap a fraction of the tile, overlaps by max or mean.
        accumulate: images whose outer products are summed in one float32 product before the float64
            totals are updated (memory: accumulate x positions x d floats).
        seed: seeds the channel choice and the validation split.
    """

    def __init__(self, image_size: int = 224, backbone: str = "lite0", stages: Sequence[int] = (1, 2, 4),
                 n_features: int = 100, gaussian: str = "per-position", eps: float = 0.01, sigma: float = 4.0,
                 batch_size: int = 8, storage_dtype: str = "float32", tile_size: int = 0,
                 tile_overlap: float = 0.25, tile_reduce: str = "max", accumulate: int = 32, seed: int = 0):
        self.image_size = int(image_size)
        self.backbone = str(backbone)
        self.stages = tuple(int(s) for s in stages)
        self.n_features = int(n_features)
        self.gaussian = str(gaussian)
        self.eps = float(eps)
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self.storage_dtype = str(storage_dtype)
        self.tile_size = int(tile_size)
        self.tile_overlap = float(tile_overlap)
        self.tile_reduce = str(tile_reduce)
        self.accumulate = int(accumulate)
        self.seed = int(seed)
        self._extractor: FeatureExtractor | None = None
        self._tap_offsets: list[int] | None = None

    def _check_settings(self) -> None:
        if self.gaussian not in GAUSSIANS:
            raise SettingsError(f"gaussian must be one of {', '.join(GAUSSIANS)}, got {self.gaussian!r}")
        if self.accumulate < 1 or self.batch_size < 1:
            raise SettingsError("accumulate and batch_size must be at least 1")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise SettingsError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        check_tiling(self.tile_size, self.tile_overlap, self.tile_reduce)

    # ------------------------------------------------------------------------------------------
    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.stages, self.backbone)
        return self._extractor

    def _offsets(self) -> list[int]:
        if self._tap_offsets is None:  # computed once, not per batch
            self._tap_offsets = [0] + [int(v) for v in np.cumsum(self.extractor.channels)[:-1]]
        return self._tap_offsets

    def _embed_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        """Images -> (B, P, d) embeddings and remember the grid shape."""
        feats = tap_features(self.extractor, images, self.input_size)
        with torch.inference_mode():
            emb = embed(feats, self.channel_index_, self._offsets())
        self.grid_ = tuple(emb.shape[-2:])
        return emb.flatten(2).transpose(1, 2).contiguous()

    def _fit(self, images: list[np.ndarray], labels: np.ndarray | None) -> None:
        self._check_settings()
        if self.tile_size:
            images = tile_views(images, self.tile_size, self.tile_overlap)
        total = sum(self.extractor.channels)
        if not 0 <= self.n_features <= total:
            raise SettingsError(f"n_features must be in 0..{total} for stages {self.stages} (0 = all), "
                                f"got {self.n_features}")
        if len(images) < 2:
            raise SettingsError("PaDiM needs at least 2 good training images")
        rng = np.random.default_rng(self.seed)
        if self.n_features in (0, total):
            self.channel_index_ = torch.arange(total)
        else:
            self.channel_index_ = torch.from_numpy(np.sort(rng.choice(total, self.n_features, replace=False)))
        shared = self.gaussian == "shared"
        # Sums of (x - shift) and its outer products; the shift (the first batch's mean) keeps the
        # float32 products well conditioned, the running totals are float64.
        shift = sum_x = sum_xxt = None
        pending: list[torch.Tensor] = []
        n_pending = 0

        def flush():
            nonlocal sum_x, sum_xxt, n_pending
            sx, sxx = moment_sums(torch.cat(pending, dim=1), shift)
            if sum_x is None:
                sum_x = torch.zeros(sx.shape, dtype=torch.float64)
                sum_xxt = torch.zeros(sxx.shape, dtype=torch.float64)
            sum_x.add_(sx)
            sum_xxt.add_(sxx)  # float32 added into the float64 totals, no float64 copy
            pending.clear()
            n_pending = 0

        for sl in track(batches(len(images), self.batch_size), "PaDiM: features"):
            emb = self._embed_batch(images[sl])  # (B, P, d)
            groups = emb.reshape(1, -1, emb.shape[-1]) if shared else emb.transpose(0, 1)  # (G, S, d)
            if shift is None:
                shift = groups.mean(1)
            pending.append(groups)
            n_pending += emb.shape[0]
            if n_pending >= self.accumulate:
                flush()
        if pending:
            flush()
        n_samples = len(images) * (self.grid_[0] * self.grid_[1] if shared else 1)
        mean_centred, whiten = whitening_factors(sum_x, sum_xxt, n_samples, self.eps)
        self.whiten_ = whiten.to(STORAGE_DTYPES[self.storage_dtype]).float()  # rounded as it will be stored
        self.mean_ = mean_centred + shift

    def _maps(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain scoring of a batch at the working size -> (maps (B, S, S), scores (B,))."""
        emb = self._embed_batch(images)
        with torch.inference_mode():
            dist = mahalanobis(emb, self.mean_, self.whiten_).view(-1, *self.grid_)
            amap = gaussian_blur(upsample(dist, self.input_size), self.sigma)
        return amap, amap.amax(dim=(1, 2))

    def _score(self, images: list[np.ndarray]) -> ScoreResult:
        return score_patch_detector(self, images, "PaDiM: scoring")

    def scoring_module(self) -> torch.nn.Module:
        """The whole scoring path as one module for ONNX export (gaikan.detectors.scoring): a float32
        (N, 3, H, W) image in [0, 1] at the working size -> (scores (N,), maps (N, H, W))."""
        from gaikan.detectors.scoring import PaDiMScoring

        return PaDiMScoring(self).eval()

    # ---- persistence: W_p is lower triangular, so only its triangle is stored -----------------
    def _state(self) -> dict[str, np.ndarray]:
        d = self.whiten_.shape[-1]
        rows, cols = torch.tril_indices(d, d)
        return {
            "channel_index": self.channel_index_.numpy(),
            "mean": self.mean_.numpy(),
            "whiten_tril": self.whiten_[:, rows, cols].to(STORAGE_DTYPES[self.storage_dtype]).numpy(),
            "grid": np.asarray(self.grid_, dtype=np.int64),
        }

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self._check_settings()
        self.channel_index_ = torch.from_numpy(state["channel_index"]).long()
        self.mean_ = torch.from_numpy(state["mean"]).float()
        n_pos, d = self.mean_.shape
        tril = torch.from_numpy(state["whiten_tril"]).float()
        if tril.shape != (n_pos, d * (d + 1) // 2) or len(self.channel_index_) != d:
            raise ModelFormatError(f"PaDiM tensors have inconsistent shapes: mean {tuple(self.mean_.shape)}, "
                                   f"whiten_tril {tuple(tril.shape)}")
        rows, cols = torch.tril_indices(d, d)
        self.whiten_ = torch.zeros(n_pos, d, d)
        self.whiten_[:, rows, cols] = tril
        self.grid_ = tuple(int(v) for v in state["grid"])
