"""PatchCore: nearest-neighbour distance to a coreset memory bank of locally aware patch features
(Roth, Pemula, Zepeda, Schölkopf, Brox, Gehler: "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022). Formulas and choices: docs/patchcore.md.

Features. For taps phi_j (stride 8 and 16 by default: EfficientNet-Lite0 stages 2 and 4), each map is
averaged over the 3x3 neighbourhood of every position (avg_pool 3x3, stride 1, zero padding 1 counted
in the mean, as the reference implementation: the paper's local aggregation with p = 3; excluding the
padding lowered the ELPV mono AUROC from 0.961 to 0.953), the coarser is upsampled bilinearly to the finer grid and the maps are
concatenated: one vector x_p in R^D per position (D = 40 + 112 = 152), optionally reduced to
``feature_dim`` by adaptive average pooling over the channels as in the paper.

Memory bank. All patch vectors of the good training images, reduced by greedy k-center coreset
selection (Sener & Savarese 2018) on a seeded Johnson-Lindenstrauss projection to ``projection_dim``:
start from a random patch, then repeatedly add the patch farthest from the selected set,

    c_{i+1} = argmax_x min_{c in C_i} || psi(x) - psi(c) ||_2 ,

keeping one min-distance vector updated with a single matrix-vector product per iteration. Exact
greedy costs k x N products for a bank of k = f N patches out of N: quadratic in N. So when there are
more than ``coreset_sample`` = S patches, the selection runs on a seeded uniform random pre-sample of
S of them and still picks k = f N: S x f N products, linear in N (the issue's "approximate greedy on
a random pre-sample"). The defaults, f = 2% on a 16-dimensional projection, were chosen on ELPV mono
(290,864 patches, S = 262,144; four draws of the sample each): f = 1% on 32 dimensions gave image
AUROC 0.954-0.961 (mean 0.957; exact selection 0.960), f = 2% on 16 dimensions 0.961-0.967 (mean
0.963) in about 1.3x the selection time (each iteration reads half the data). A pattern that occurs
in fewer than about N / S patches may be missed by the sample, which is why S is large. Alternatively
``coreset_chunk`` = C > 0 cuts the (sampled) patches in a seeded random order into chunks of at most
C and picks f of each chunk (N / C chunks x f C iterations x C patches, also linear); the chunks'
coresets overlap in what they cover, which cost AUROC on ELPV (0.948-0.959), so it is off by default.
With N <= S and no chunks it is the exact greedy selection.

Score. A test patch's score is its distance to the nearest bank entry, s(x) = min_m ||x - m||_2 (exact,
in chunks of bounded memory). The grid of scores is upsampled to the working size, smoothed with a
Gaussian (sigma 4) and the image score is the maximum of the map. With ``reweight=True`` the map of
each image is multiplied by the paper's weight (eq. 7) for its most anomalous patch x* with nearest
bank entry m*:  w = 1 - exp(||x* - m*||) / sum_{m in N_b(m*)} exp(||x* - m||), N_b the b nearest
bank entries of m* (m* included).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gaikan.backbones.features import FeatureExtractor, stage_channels, tap_features
from gaikan.detectors.base import Detector, ScoreResult, register
from gaikan.detectors.maps import smooth_map
from gaikan.detectors.tiling import check_tiling, score_patch_detector, tile_views
from gaikan.errors import ModelFormatError, SettingsError
from gaikan.progress import batches, track

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ---- pure functions ----------------------------------------------------------------------------
def locally_aware_features(features: list[torch.Tensor], feature_dim: int = 0) -> torch.Tensor:
    """Per-tap (B, C_j, h_j, w_j) maps -> (B, D, h_0, w_0) patch features of the paper.

    3x3 neighbourhood average of every tap, the coarser taps upsampled bilinearly to the first tap's
    grid, concatenated; with feature_dim > 0 the D channels are adaptively average-pooled to feature_dim.
    """
    size = features[0].shape[-2:]
    parts = []
    for feat in features:
        feat = F.avg_pool2d(feat, kernel_size=3, stride=1, padding=1)
        if feat.shape[-2:] != size:
            feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
        parts.append(feat)
    x = torch.cat(parts, dim=1)
    if feature_dim and feature_dim != x.shape[1]:
        b, d, h, w = x.shape
        x = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, d), feature_dim)
        x = x.reshape(b, h, w, feature_dim).permute(0, 3, 1, 2)
    return x


def random_projection(dim_in: int, dim_out: int, seed: int) -> torch.Tensor:
    """Seeded Gaussian Johnson-Lindenstrauss matrix (dim_in, dim_out), entries N(0, 1/dim_out)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim_in, dim_out, generator=gen) / math.sqrt(dim_out)


def kcenter_greedy_t(points_t: torch.Tensor, n_select: int, start: int = 0,
                     progress: Callable[[int], None] | None = None,
                     init_min_d: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-center selection on points given TRANSPOSED, (D, N) contiguous (the fast layout for
    the per-iteration product v^T X). Returns the (n_select,) indices, ``start`` first.

    min_d holds each point's squared distance to the selected set; each iteration adds its argmax and
    updates min_d with ||x||^2 - 2 x.c + ||c||^2 for the new centre c: O(N D) per iteration, no N x N.
    The selection is incremental: its first k indices are the k-center selection of size k.
    ``progress(i)``, when given, is called after the (i + 1)-th selection. ``init_min_d`` (N,), when
    given, are the squared distances to centres selected before (an existing bank): the selection
    continues from them (``start`` should then be their argmax).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound small products: a second thread only adds synchronisation
    try:
        return _kcenter_loop(points_t, n_select, start, progress, init_min_d)
    finally:
        torch.set_num_threads(threads)


def _kcenter_loop(points_t: torch.Tensor, n_select: int, start: int, progress: Callable[[int], None] | None,
                  init_min_d: torch.Tensor | None) -> torch.Tensor:
    _, n = points_t.shape
    n_select = min(int(n_select), n)
    sq = points_t.square().sum(0)  # (N,)
    selected = torch.empty(n_select, dtype=torch.long)
    min_d = torch.full((n,), torch.inf) if init_min_d is None else init_min_d.float().clone()
    buf = torch.empty(1, n)
    idx = int(start)
    for i in range(n_select):
        selected[i] = idx
        centre = points_t[:, idx].contiguous()[None]  # (1, D); contiguous: 2x faster product
        torch.mm(centre, points_t, out=buf)  # x.c for all x
        buf.mul_(-2.0).add_(sq).add_(sq[idx])  # ||x||^2 - 2 x.c + ||c||^2
        torch.minimum(min_d, buf[0], out=min_d)
        min_d[idx] = 0.0  # exact for the chosen point whatever the rounding
        idx = int(torch.argmax(min_d))
        if progress is not None:
            progress(i)
    return selected


def kcenter_greedy(points: torch.Tensor, n_select: int, start: int = 0) -> torch.Tensor:
    """Greedy k-center selection on (N, D) points; see ``kcenter_greedy_t``."""
    return kcenter_greedy_t(points.t().contiguous().float(), n_select, start)


def greedy_coreset(features: torch.Tensor, fraction: float, *, projection_dim: int = 128, seed: int = 0,
                   chunk: int = 0, sample: int = 0, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Indices of the coreset of ``fraction`` of the (N, D) features (at least one), chosen by greedy
    k-center on a seeded random projection to ``projection_dim`` (no projection when 0 or >= D).

    ``sample`` > 0 and N > sample: the selection runs on a seeded random pre-sample of ``sample``
    patches (still choosing ``fraction`` x N of them): cost linear in N. ``chunk`` > 0 bounds the
    cost otherwise: the (sampled) patches are cut in a seeded random order into about N / chunk
    equal chunks and the selection is shared between them (also linear). Neither (or N small enough):
    the exact greedy selection over all patches, cost quadratic in N. ``progress(i)`` counts selections."""
    n, d = features.shape
    n_select = max(1, int(round(fraction * n)))
    if n_select >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    proj = random_projection(d, projection_dim, seed) if projection_dim and projection_dim < d else None
    pool = None  # indices of the pre-sample into features (None: all)
    if 0 < sample < n:
        pool = torch.randperm(n, generator=gen)[:sample]
        features, n = features.index_select(0, pool), sample
        n_select = min(n_select, n)
    n_chunks = 1 if chunk <= 0 or n <= chunk else math.ceil(n / chunk)
    order = torch.randperm(n, generator=gen) if n_chunks > 1 else None
    selected, done = [], 0
    for part in range(n_chunks):
        if order is None:
            members, sub = None, features
        else:
            members = order[part * n // n_chunks:(part + 1) * n // n_chunks]
            sub = features.index_select(0, members)
        # this chunk's share of the selection, so that the shares add up to n_select exactly
        k = round(n_select * (part + 1) / n_chunks) - round(n_select * part / n_chunks)
        if k < 1:
            continue
        start = int(torch.randint(len(sub), (1,), generator=gen))
        # (k', N') transposed and contiguous: the fast layout for the per-iteration product
        points_t = torch.mm(proj.t(), sub.t()) if proj is not None else sub.t().contiguous()
        step = None if progress is None else (lambda i, o=done: progress(o + i))
        picked = kcenter_greedy_t(points_t, k, start, step)
        selected.append(picked if members is None else members[picked])
        done += k
    index = torch.cat(selected)
    return index if pool is None else pool[index]


def extend_coreset(bank: torch.Tensor, features: torch.Tensor, n_add: int, *, projection_dim: int = 16,
                   seed: int = 0) -> torch.Tensor:
    """Indices of ``n_add`` of the new (N, D) features to append to an existing (M, D) bank: greedy
    k-center continued from the bank (every bank entry counts as already selected), on the same seeded
    projection as ``greedy_coreset``; the first pick is the new patch farthest from the bank."""
    n, d = features.shape
    n_add = min(max(int(n_add), 0), n)
    if n_add == 0:
        return torch.zeros(0, dtype=torch.long)
    if projection_dim and projection_dim < d:
        proj = random_projection(d, projection_dim, seed)
        points_t = torch.mm(proj.t(), features.t())
        bank_p = torch.mm(bank.float(), proj)
    else:
        points_t = features.t().contiguous()
        bank_p = bank.float()
    memory = MemoryBank(bank_p)
    init = memory.nearest(points_t.t())[0][:, 0].square()
    return kcenter_greedy_t(points_t, n_add, int(torch.argmax(init)), init_min_d=init)


def patchcore_patch_features(payload: dict, images: Sequence[np.ndarray]) -> torch.Tensor:
    """A worker's share of a PatchCore fit: the (N * h * w, D) patch features of its images (tiles
    already cut). Module-level so that engines can ship it to workers; returned with the grid."""
    det = PatchCore(**payload["settings"])
    features = det.patch_features(list(images))
    return features, det.grid_


class MemoryBank:
    """A bank (M, D) prepared once for nearest-neighbour queries: centred (better float32 precision
    of the norm expansion), transposed contiguous, squared norms cached."""

    def __init__(self, bank: torch.Tensor):
        bank = bank.float()
        self.size, self.dim = bank.shape
        self.centre = bank.mean(0)
        centred = bank - self.centre
        self.bank_t = centred.t().contiguous()  # (D, M)
        self.sq = centred.square().sum(1)  # (M,)

    def nearest(self, queries: torch.Tensor, *, k: int = 1, chunk_mb: float = 64.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact Euclidean k nearest bank entries of (Q, D) queries -> (distances (Q, k), indices (Q, k)).

        ||q - m||^2 = ||q||^2 - 2 q.m + ||m||^2 in chunks of queries so that one chunk's (rows, M)
        distance block stays under ``chunk_mb`` MB.
        """
        q = queries.float() - self.centre
        rows = max(1, int(chunk_mb * 2**20 / 4 / max(self.size, 1)))
        dists, index = [], []
        for sl in batches(len(q), rows):
            part = q[sl]
            d2 = torch.addmm(self.sq[None], part, self.bank_t, beta=1.0, alpha=-2.0)
            d2 += part.square().sum(1, keepdim=True)
            if k == 1:
                val, idx = d2.min(1, keepdim=True)
            else:
                val, idx = torch.topk(d2, min(k, self.size), dim=1, largest=False)
            dists.append(val.clamp_min_(0).sqrt_())
            index.append(idx)
        return torch.cat(dists), torch.cat(index)


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk_mb: float = 64.0) -> torch.Tensor:
    """Distance of each (Q, D) query to its nearest row of the (M, D) bank -> (Q,)."""
    return MemoryBank(bank).nearest(queries, chunk_mb=chunk_mb)[0][:, 0]


def reweight_factor(query: torch.Tensor, nearest_index: torch.Tensor, memory: MemoryBank, bank: torch.Tensor,
                    num_neighbors: int) -> torch.Tensor:
    """The paper's eq. 7 weight for (B, D) most-anomalous patches with nearest bank rows (B,) -> (B,).

    w = 1 - softmax(||x* - m||, m in N_b(m*))[m*], N_b(m*) the b nearest bank rows of m* (m* first).
    """
    b = min(num_neighbors, memory.size)
    _, support = memory.nearest(bank[nearest_index], k=b)  # (B, b); the first is m* itself
    support[:, 0] = nearest_index
    dist = (query[:, None, :] - bank[support]).norm(dim=-1)  # (B, b)
    return 1.0 - torch.softmax(dist, dim=1)[:, 0]


# ---- the detector ------------------------------------------------------------------------------
@register("patchcore")
class PatchCore(Detector):
    """PatchCore on EfficientNet-Lite0 features.

    Settings:
        image_size: working size in pixels (images, or tiles, are resized to image_size x image_size).
        backbone: "lite0", "lite1" or "lite2" (EfficientNet-Lite, ImageNet weights).
        stages: backbone stages tapped (1 = stride 4, 2 = stride 8, 4 = stride 16); the first sets the grid.
        feature_dim: channels after adaptive average pooling (0 = keep all D = sum of tap channels).
        coreset_fraction: share of the training patches kept in the memory bank (greedy k-center).
        coreset_sample: above this many training patches the selection runs on a seeded random
            pre-sample of this many (cost linear in the patch count); 0 = always over all patches
            (exact greedy, quadratic).
        coreset_chunk: patches per chunk of the selection (also linear, costs more AUROC than the
            pre-sample; 0 = off, the default).
        projection_dim: dimension of the random projection the coreset selection runs on.
        reweight: apply the paper's re-weighting (eq. 7) to each image's map and score.
        num_neighbors: b, the bank neighbourhood of the re-weighting.
        sigma: Gaussian smoothing of the anomaly map, in working-size pixels.
        batch_size: images (or tiles) per forward pass.
        storage_dtype: "float32" or "float16" memory bank (float16 halves the model; the bank is
            rounded at fit time so scores are the same before saving and after loading).
        tile_size, tile_overlap, tile_reduce: tiling of large images (gaikan.detectors.tiling);
            tile_size 0 = off (plain resize), overlap a fraction of the tile, overlaps by max or mean.
        chunk_mb: memory bound of one block of the nearest-neighbour search.
        updatable: keep the held-out calibration images in the saved model, so that ``gaikan update``
            can recalibrate after extending the bank (False: a smaller model, not updatable).
        seed: seeds the projection, the coreset start and the validation split.
    """

    #: features are per image: engines may extract them on workers (the coreset stays on the driver)
    distributed_fit = True

    def __init__(self, image_size: int = 224, backbone: str = "lite0", stages: Sequence[int] = (2, 4),
                 feature_dim: int = 0, coreset_fraction: float = 0.02, coreset_sample: int = 262144,
                 coreset_chunk: int = 0, projection_dim: int = 16, reweight: bool = False,
                 num_neighbors: int = 9, sigma: float = 4.0, batch_size: int = 8, storage_dtype: str = "float32",
                 tile_size: int = 0, tile_overlap: float = 0.25, tile_reduce: str = "max", chunk_mb: float = 64.0,
                 updatable: bool = True, seed: int = 0):
        self.image_size = int(image_size)
        self.backbone = str(backbone)
        self.stages = tuple(int(s) for s in stages)
        self.feature_dim = int(feature_dim)
        self.coreset_fraction = float(coreset_fraction)
        self.coreset_sample = int(coreset_sample)
        self.coreset_chunk = int(coreset_chunk)
        self.projection_dim = int(projection_dim)
        self.reweight = bool(reweight)
        self.num_neighbors = int(num_neighbors)
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self.storage_dtype = str(storage_dtype)
        self.tile_size = int(tile_size)
        self.tile_overlap = float(tile_overlap)
        self.tile_reduce = str(tile_reduce)
        self.chunk_mb = float(chunk_mb)
        self.updatable = bool(updatable)
        self.seed = int(seed)
        self._extractor: FeatureExtractor | None = None
        self._memory: MemoryBank | None = None

    def _check_settings(self) -> None:
        if not 0.0 < self.coreset_fraction <= 1.0:
            raise SettingsError(f"coreset_fraction must be in (0, 1], got {self.coreset_fraction}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise SettingsError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if (self.feature_dim < 0 or self.projection_dim < 0 or self.coreset_chunk < 0 or self.coreset_sample < 0
                or self.num_neighbors < 1
                or self.batch_size < 1):
            raise SettingsError("feature_dim, projection_dim, coreset_sample and coreset_chunk must be >= 0, "
                                "num_neighbors and "
                                "batch_size >= 1")
        check_tiling(self.tile_size, self.tile_overlap, self.tile_reduce)

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.stages, self.backbone)
        return self._extractor

    @property
    def memory(self) -> MemoryBank:
        """The bank prepared for queries, built once per fit/load (not per ``score`` call)."""
        if self._memory is None:
            self._memory = MemoryBank(self.bank_)
        return self._memory

    def _embed(self, images: list[np.ndarray]) -> torch.Tensor:
        """Images -> (B, h, w, D) patch features; remembers the grid."""
        taps = tap_features(self.extractor, images, self.input_size)
        with torch.inference_mode():
            feats = locally_aware_features(taps, self.feature_dim)
        self.grid_ = tuple(feats.shape[-2:])
        return feats.permute(0, 2, 3, 1).contiguous()

    def patch_features(self, images: list[np.ndarray]) -> torch.Tensor:
        """All patch features of the images, (N * h * w, D), extracted in batches."""
        chunks = []
        for sl in track(batches(len(images), self.batch_size), "PatchCore: features"):
            feats = self._embed(images[sl])
            chunks.append(feats.reshape(-1, feats.shape[-1]))
        return torch.cat(chunks)

    def _fit(self, images: list[np.ndarray], labels: np.ndarray | None) -> None:
        self._check_settings()
        if self.tile_size:
            images = tile_views(images, self.tile_size, self.tile_overlap)
        start = time.perf_counter()
        engine = getattr(self, "_engine", None)
        if engine is None:  # in this process
            features = self.patch_features(images)
        else:  # features on the workers, the coreset selection here
            parts = engine.map_shares(patchcore_patch_features, {"settings": self.settings()}, images)
            features = torch.cat([f for f, _ in parts])
            self.grid_ = tuple(parts[0][1])
        middle = time.perf_counter()
        index = greedy_coreset(features, self.coreset_fraction, projection_dim=self.projection_dim, seed=self.seed,
                               chunk=self.coreset_chunk, sample=self.coreset_sample)
        #: seconds of the two parts of the last fit (not saved; for benchmarks)
        self.fit_seconds_ = {"features": middle - start, "coreset": time.perf_counter() - middle}
        bank = features[index]
        del features
        dtype = STORAGE_DTYPES[self.storage_dtype]
        self.bank_ = bank.to(dtype).float()  # rounded as it will be stored: same scores after reload
        self.n_patches_ = int(self.grid_[0] * self.grid_[1] * len(images))
        self._memory = None

    def add_images(self, images: list[np.ndarray]) -> int:
        """Extend the memory bank with the patches of new good images, without the old images: the
        coreset_fraction of the new patches chosen by greedy k-center continued from the bank
        (``extend_coreset``). Returns the number of bank entries added. Thresholds are not touched
        here (``gaikan.update`` recalibrates)."""
        self._check_fitted()
        if self.tile_size:
            images = tile_views(images, self.tile_size, self.tile_overlap)
        features = self.patch_features(list(images))
        n_add = max(1, int(round(self.coreset_fraction * len(features))))
        index = extend_coreset(self.bank_, features, n_add, projection_dim=self.projection_dim, seed=self.seed)
        added = features[index].to(STORAGE_DTYPES[self.storage_dtype]).float()
        self.bank_ = torch.cat([self.bank_, added])
        self.n_patches_ += int(len(features))
        self._memory = None
        return int(len(index))

    def _maps(self, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain scoring of a batch at the working size -> (maps (B, S, S), scores (B,))."""
        return self._maps_from_features(self._embed(images))

    def _maps_from_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w, D) patch features -> (maps (B, S, S), scores (B,))."""
        b, h, w, d = feats.shape
        with torch.inference_mode():
            flat = feats.reshape(-1, d)
            dist, idx = self.memory.nearest(flat, chunk_mb=self.chunk_mb)
            dist = dist.view(b, h * w)
            amap = smooth_map(dist.view(b, h, w), self.input_size, self.sigma)
            if self.reweight:
                worst = dist.argmax(1)
                rows = torch.arange(b) * (h * w) + worst
                weight = reweight_factor(flat[rows], idx[rows, 0], self.memory, self.bank_, self.num_neighbors)
                amap = amap * weight[:, None, None]
        return amap, amap.amax(dim=(1, 2))

    def _score(self, images: list[np.ndarray]) -> ScoreResult:
        return score_patch_detector(self, images, "PatchCore: scoring")

    def scoring_module(self) -> torch.nn.Module:
        """The whole scoring path at the working size as one module for ONNX export
        (gaikan.detectors.scoring): a float32 (N, 3, H, W) image in [0, 1] -> (scores (N,), maps (N, H, W))."""
        from gaikan.detectors.scoring import PatchCoreScoring

        return PatchCoreScoring(self).eval()

    # ---- persistence ----------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        return {
            "bank": self.bank_.to(STORAGE_DTYPES[self.storage_dtype]).numpy(),
            "grid": np.asarray(self.grid_, dtype=np.int64),
            "n_patches": np.asarray([self.n_patches_], dtype=np.int64),
        }

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self._check_settings()
        bank = state.get("bank")
        if bank is None or bank.ndim != 2 or bank.shape[0] < 1:
            raise ModelFormatError("PatchCore model has no memory bank (M, D) in its tensors")
        channels = stage_channels(self.backbone) if self.backbone in ("lite0", "lite1", "lite2") else None
        if channels is None:
            raise ModelFormatError(f"PatchCore model names an unknown backbone {self.backbone!r}")
        expected = self.feature_dim or sum(channels[s] for s in self.stages)
        if bank.shape[1] != expected:
            raise ModelFormatError(f"PatchCore memory bank has {bank.shape[1]} features per patch, "
                                   f"the settings give {expected}")
        self.bank_ = torch.from_numpy(bank).float()
        self.grid_ = tuple(int(v) for v in state["grid"])
        self.n_patches_ = int(np.asarray(state["n_patches"]).reshape(-1)[0])
        self._memory = None
