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

The fit is three pure steps, shared by the local fit, the Ray fit (gaikan.engine) and ``gaikan update``:

    accumulate_sums  one batch of embeddings at a time into GaussianSums (n, shift s, S1, S2), with
                     S1 = sum_i (x_i - s) and S2 = sum_i (x_i - s)(x_i - s)^T, s the first batch's mean
    combine_sums     partial sums of disjoint image sets -> the sums of their union (exact: each part
                     is re-centred to the first part's shift, see ``recentre``)
    finalize_sums    sums -> mu_p = s + S1 / n and W_p (``whitening_factors``)

With ``updatable=True`` (default) the saved model keeps the sums (S2 as its upper triangle), so new
good images can be added later without recomputing the old ones' features (``gaikan update``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gaikan.backbones.features import FeatureExtractor, tap_features
from gaikan.detectors.base import Detector, ScoreResult, register
from gaikan.detectors.maps import smooth_map
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


@dataclass
class GaussianSums:
    """Streamed per-position statistics of n embeddings (P positions, d features).

    shift (P, d) float32: the first batch's mean (keeps the float32 products well conditioned);
    sum_x (P, d) float64: S1 = sum (x - shift); sum_xxt (P, d, d) float64: S2 = sum (x - shift)(x - shift)^T;
    grid: the (h, w) grid of the P positions.
    """

    n: int
    shift: torch.Tensor
    sum_x: torch.Tensor
    sum_xxt: torch.Tensor
    grid: tuple[int, int] | None = None


def accumulate_sums(sums: GaussianSums | None, samples: torch.Tensor) -> GaussianSums:
    """Add samples (G, S, d) -- S samples of each of G groups (positions, or one shared group) -- to
    ``sums`` (None: start; the samples' mean is the shift). The outer products are one float32 batched
    product on shifted samples (well conditioned), added into the float64 totals without a float64 copy."""
    if sums is None:
        shift = samples.mean(1)
        groups, d = shift.shape
        sums = GaussianSums(0, shift, torch.zeros(groups, d, dtype=torch.float64),
                            torch.zeros(groups, d, d, dtype=torch.float64))
    sx, sxx = moment_sums(samples, sums.shift)
    sums.sum_x.add_(sx)
    sums.sum_xxt.add_(sxx)
    sums.n += samples.shape[1]
    return sums


def recentre(sums: GaussianSums, shift: torch.Tensor) -> GaussianSums:
    """The same statistics about another shift t, in float64: with delta = s - t,
    sum (x - t) = S1 + n delta and sum (x - t)(x - t)^T = S2 + S1 delta^T + delta S1^T + n delta delta^T."""
    delta = sums.shift.double() - shift.double()
    sum_xxt = (sums.sum_xxt + sums.sum_x[:, :, None] * delta[:, None, :] + delta[:, :, None] * sums.sum_x[:, None, :]
               + sums.n * delta[:, :, None] * delta[:, None, :])
    return GaussianSums(sums.n, shift, sums.sum_x + sums.n * delta, sum_xxt, sums.grid)


def combine_sums(parts: Sequence[GaussianSums]) -> GaussianSums:
    """Sums of disjoint image sets -> the sums of their union, about the first part's shift."""
    parts = [p for p in parts if p is not None and p.n > 0]
    if not parts:
        raise SettingsError("no embeddings to combine")
    first = parts[0]
    if len(parts) == 1:
        return first
    total = GaussianSums(first.n, first.shift, first.sum_x.clone(), first.sum_xxt.clone(), first.grid)
    for part in parts[1:]:
        if part.sum_x.shape != total.sum_x.shape:
            raise SettingsError(f"cannot combine PaDiM sums of shapes {tuple(total.sum_x.shape)} and "
                                f"{tuple(part.sum_x.shape)} (other grid or n_features)")
        if not torch.equal(part.shift, total.shift):
            part = recentre(part, total.shift)
        total.n += part.n
        total.sum_x += part.sum_x
        total.sum_xxt += part.sum_xxt
    return total


def finalize_sums(sums: GaussianSums, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums -> (means (P, d), whitening matrices W_p (P, d, d)), both float32."""
    mean_centred, whiten = whitening_factors(sums.sum_x, sums.sum_xxt, sums.n, eps)
    return mean_centred + sums.shift, whiten


def padim_partial_sums(payload: dict, images: Sequence[np.ndarray]) -> GaussianSums:
    """A worker's share of a PaDiM fit: the sums of its images' embeddings.

    payload: {"settings": PaDiM settings, "channel_index": the fit's chosen channels (numpy)}; the
    images are already tiles when tiling is on. Module-level so that engines can ship it to workers.
    """
    det = PaDiM(**payload["settings"])
    det.channel_index_ = torch.as_tensor(np.asarray(payload["channel_index"])).long()
    return det.partial_sums(list(images))


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
        updatable: keep what ``gaikan update`` needs to add good images later: the streamed sums
            (float64; S2 as its upper triangle, about twice the size of the whitening matrices) and
            the held-out calibration images (to recalibrate). False: a smaller model, not updatable.
        seed: seeds the channel choice and the validation split.
    """

    #: the fit is a sum over images: engines may split it (gaikan.engine, ``fit --engine ray``)
    distributed_fit = True

    def __init__(self, image_size: int = 224, backbone: str = "lite0", stages: Sequence[int] = (1, 2, 4),
                 n_features: int = 100, gaussian: str = "per-position", eps: float = 0.01, sigma: float = 4.0,
                 batch_size: int = 8, storage_dtype: str = "float32", tile_size: int = 0,
                 tile_overlap: float = 0.25, tile_reduce: str = "max", accumulate: int = 32,
                 updatable: bool = True, seed: int = 0):
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
        self.updatable = bool(updatable)
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

    def partial_sums(self, images: list[np.ndarray]) -> GaussianSums:
        """Stream the images' embeddings (channel_index_ chosen) into GaussianSums: the batches of
        ``accumulate`` images at a time go into one float32 product (see ``accumulate_sums``). Per
        position, the groups are the P positions and n counts images; shared, one group and n counts
        patches."""
        shared = self.gaussian == "shared"
        sums, pending, n_pending = None, [], 0
        for sl in track(batches(len(images), self.batch_size), "PaDiM: features"):
            emb = self._embed_batch(images[sl])  # (B, P, d)
            pending.append(emb.reshape(1, -1, emb.shape[-1]) if shared else emb.transpose(0, 1))  # (G, S, d)
            n_pending += emb.shape[0]
            if n_pending >= self.accumulate or sl.stop == len(images):
                sums = accumulate_sums(sums, torch.cat(pending, dim=1))
                pending, n_pending = [], 0
        sums.grid = self.grid_
        return sums

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
        engine = getattr(self, "_engine", None)
        if engine is None:  # in this process, one share
            parts = [self.partial_sums(images)]
        else:
            payload = {"settings": self.settings(), "channel_index": self.channel_index_.numpy()}
            parts = engine.map_shares(padim_partial_sums, payload, images)
        self._set_sums(combine_sums(parts))

    def _set_sums(self, sums: GaussianSums) -> None:
        """Build the model from the sums (fit and update), and keep them when ``updatable``."""
        mean, whiten = finalize_sums(sums, self.eps)
        self.whiten_ = whiten.to(STORAGE_DTYPES[self.storage_dtype]).float()  # rounded as it will be stored
        self.mean_ = mean
        self.grid_ = tuple(sums.grid)
        self.sums_ = sums if self.updatable else None

    def _maps(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain scoring of a batch at the working size -> (maps (B, S, S), scores (B,))."""
        emb = self._embed_batch(images)
        with torch.inference_mode():
            dist = mahalanobis(emb, self.mean_, self.whiten_).view(-1, *self.grid_)
            amap = smooth_map(dist, self.input_size, self.sigma)
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
            **self._sums_state(),
        }

    def _sums_state(self) -> dict[str, np.ndarray]:
        sums = getattr(self, "sums_", None)
        if sums is None:
            return {}
        d = sums.sum_x.shape[-1]
        rows, cols = torch.triu_indices(d, d)
        return {"sums_n": np.asarray([sums.n], dtype=np.int64), "sums_shift": sums.shift.numpy(),
                "sums_x": sums.sum_x.numpy(), "sums_xxt_triu": sums.sum_xxt[:, rows, cols].numpy()}

    def load_sums(self, state: dict[str, np.ndarray]) -> GaussianSums | None:
        """The kept sums from a saved model's tensors (None if it has none). Loading a model does not
        keep them in memory (a scorer has no use for them); ``gaikan update`` reads them with this."""
        if "sums_n" not in state:
            return None
        n_pos, d = self.mean_.shape
        triu = torch.from_numpy(state["sums_xxt_triu"])
        if triu.shape != (n_pos, d * (d + 1) // 2) or state["sums_x"].shape != (n_pos, d):
            raise ModelFormatError(f"PaDiM sums have inconsistent shapes: sums_x {state['sums_x'].shape}, "
                                   f"sums_xxt_triu {tuple(triu.shape)} for {n_pos} positions x {d} features")
        rows, cols = torch.triu_indices(d, d)
        sum_xxt = torch.zeros(n_pos, d, d, dtype=torch.float64)
        sum_xxt[:, rows, cols] = triu.double()
        sum_xxt[:, cols, rows] = triu.double()
        return GaussianSums(int(state["sums_n"].reshape(-1)[0]), torch.from_numpy(state["sums_shift"]).float(),
                            torch.from_numpy(state["sums_x"]).double(), sum_xxt, self.grid_)

    def add_images(self, images: list[np.ndarray]) -> None:
        """Add good images to the fitted model without the old ones: their sums are added to the kept
        sums and the Gaussians rebuilt (the same model as a fit on the old and the new images together).
        Thresholds are not touched here (``gaikan.update`` recalibrates)."""
        self._check_fitted()
        if getattr(self, "sums_", None) is None:
            raise SettingsError("this PaDiM model has no streamed sums in memory (a loaded model: read them with "
                                "load_sums) or was saved without its streamed sums (updatable=false or an older "
                                "gaikan), so images cannot be added to it: refit it with updatable=true")
        if self.tile_size:
            images = tile_views(images, self.tile_size, self.tile_overlap)
        self._set_sums(combine_sums([self.sums_, self.partial_sums(list(images))]))

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
        self.sums_ = None  # not kept when loading: see load_sums
        self.saved_with_sums_ = "sums_n" in state
