"""The whole scoring path of a fitted patch detector as one ``torch.nn.Module``, for ONNX export.

``PaDiM.scoring_module()`` and ``PatchCore.scoring_module()`` return one of these. Input: a float32
(N, 3, H, W) RGB image in [0, 1] already at the detector's working size (H, W) (reading, resizing and
gray -> RGB stay outside: Pillow, as in ``gaikan.backbones.features.prepare_image``). Output: the image
scores (N,) and the anomaly maps (N, H, W), the same numbers ``detector.score`` gives.

Inside: the backbone's normalisation, the backbone, the detector's head, bilinear upsampling, the
Gaussian smoothing and the image score = max of the map. The heads are written with operations the
ONNX exporter maps one to one (no data-dependent Python control flow, no boolean indexing):

* PaDiM: per-tap channel selection with constant indices, nearest upsampling, then batched
  products over all positions p,  M_bp = || W_p (x_bp - mu_p) ||  (``padim.mahalanobis``), with the
  lower-triangular W_p cut into row blocks so that the zeros above the diagonal are mostly not stored.
* PatchCore: the locally aware features (3x3 average pool, bilinear upsampling, optional channel
  pooling as a constant (D, feature_dim) matrix, which is what adaptive average pooling computes),
  then the nearest-neighbour distance by the norm expansion on the centred bank,
  min_m ||q - m||^2 = min_m (||q||^2 - 2 q.m + ||m||^2): one MatMul and one ReduceMin.
  The optional re-weighting (paper eq. 7) uses ArgMax/TopK/Gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gaikan.backbones.features import normalise
from gaikan.detectors.maps import smooth_map


class _MapHead(nn.Module):
    """Upsample a (B, h, w) distance grid to the working size, smooth, score = max."""

    def __init__(self, size: tuple[int, int], sigma: float):
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.sigma = float(sigma)

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = smooth_map(grid, self.size, self.sigma)
        return amap.amax(dim=(1, 2)), amap


class PaDiMScoring(nn.Module):
    """PaDiM's scoring path: image (N, 3, H, W) in [0, 1] -> (scores (N,), maps (N, H, W))."""

    def __init__(self, detector):
        super().__init__()
        detector._check_fitted()
        self.extractor = detector.extractor
        offsets = detector._offsets()
        index = detector.channel_index_
        self.taps: list[int] = []
        for t, (channels, start) in enumerate(zip(self.extractor.channels, offsets)):
            local = index[(index >= start) & (index < start + channels)] - start
            if local.numel():
                self.register_buffer(f"index_{t}", local.clone().long())
                self.taps.append(t)
        self.register_buffer("mean", detector.mean_.clone().float())
        # W_p is lower triangular: cut its rows into blocks, block i needs only the columns up to its
        # last row. With 4 blocks the graph stores and reads 62.5% of the d x d entries (the head is
        # memory bound: at 224 px, 3136 positions x d^2 floats are 125 MB for d = 100).
        whiten = detector.whiten_.float()
        d = whiten.shape[-1]
        self.edges = [round(i * d / self.BLOCKS) for i in range(self.BLOCKS + 1)]
        self.edges = sorted(set(self.edges))
        for i, (lo, hi) in enumerate(zip(self.edges[:-1], self.edges[1:])):
            # (P, hi, hi - lo): y_block = diff[..., :hi] @ W[:, lo:hi, :hi]^T
            self.register_buffer(f"whiten_{i}", whiten[:, lo:hi, :hi].transpose(1, 2).contiguous())
        self.grid = tuple(int(g) for g in detector.grid_)
        self.head = _MapHead(detector.input_size, detector.sigma)

    BLOCKS = 4

    def mahalanobis(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, P, d) -> (B, P): ||W_p (x - mu_p)||, as ``padim.mahalanobis``, block-triangular."""
        diff = (emb - self.mean[None]).transpose(0, 1)  # (P, B, d)
        total = None
        for i, hi in enumerate(self.edges[1:]):
            y = torch.matmul(diff[:, :, :hi], getattr(self, f"whiten_{i}"))  # (P, B, rows of block i)
            part = y.square().sum(-1)
            total = part if total is None else total + part
        return total.clamp_min(0).sqrt().transpose(0, 1)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The feature stage: image (N, 3, H, W) -> embeddings (N, P, d) (compute-bound)."""
        features = self.extractor(normalise(image))
        size = features[0].shape[-2:]
        parts = []
        for t in self.taps:
            part = features[t].index_select(1, getattr(self, f"index_{t}"))
            if part.shape[-2:] != size:
                part = F.interpolate(part, size=size, mode="nearest")
            parts.append(part)
        return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)

    def score_embedding(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head: embeddings (N, P, d) -> (scores, maps). Memory-bound: it reads every position's
        whitening matrix once per batch, whatever the batch size, so the export marks the cut between
        the two (``gaikan.export.onnx_export``) and the service batches the head on its own."""
        dist = self.mahalanobis(emb).reshape(-1, self.grid[0], self.grid[1])
        return self.head(dist)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_embedding(self.embed(image))


def channel_pool_matrix(dim_in: int, dim_out: int) -> torch.Tensor:
    """The (dim_in, dim_out) matrix A with x A = adaptive_avg_pool1d(x, dim_out) for rows x."""
    eye = torch.eye(dim_in)[:, None, :]  # (dim_in, 1, dim_in): row i is e_i
    return F.adaptive_avg_pool1d(eye, dim_out)[:, 0, :]


class PatchCoreScoring(nn.Module):
    """PatchCore's scoring path: image (N, 3, H, W) in [0, 1] -> (scores (N,), maps (N, H, W))."""

    def __init__(self, detector):
        super().__init__()
        detector._check_fitted()
        self.extractor = detector.extractor
        total = sum(self.extractor.channels)
        self.pool = bool(detector.feature_dim and detector.feature_dim != total)
        if self.pool:
            self.register_buffer("pool_matrix", channel_pool_matrix(total, detector.feature_dim))
        memory = detector.memory
        self.register_buffer("centre", memory.centre.clone())
        self.register_buffer("bank_t", memory.bank_t.clone())  # (D, M), centred
        self.register_buffer("bank_sq", memory.sq.clone())  # (M,)
        self.reweight = bool(detector.reweight)
        if self.reweight:
            self.register_buffer("bank", detector.bank_.clone().float())  # (M, D), not centred
            self.neighbours = int(min(detector.num_neighbors, memory.size))
        self.grid = tuple(int(g) for g in detector.grid_)
        self.head = _MapHead(detector.input_size, detector.sigma)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor(normalise(image))
        size = features[0].shape[-2:]
        parts = []
        for feat in features:
            feat = F.avg_pool2d(feat, kernel_size=3, stride=1, padding=1)
            if feat.shape[-2:] != size:
                feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
            parts.append(feat)
        x = torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.pool:
            x = x @ self.pool_matrix
        flat = x.reshape(-1, x.shape[-1])  # (B P, D)
        q = flat - self.centre
        d2 = torch.addmm(self.bank_sq[None], q, self.bank_t, beta=1.0, alpha=-2.0)
        d2 = d2 + q.square().sum(1, keepdim=True)
        val, idx = d2.min(1)
        dist = val.clamp_min(0).sqrt().reshape(-1, self.grid[0] * self.grid[1])  # (B, P)
        score, amap = self.head(dist.reshape(-1, self.grid[0], self.grid[1]))
        if self.reweight:
            weight = self._weight(flat, dist, idx)
            amap = amap * weight[:, None, None]
            score = amap.amax(dim=(1, 2))
        return score, amap

    def _weight(self, flat: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Paper eq. 7 for each image's most anomalous patch (``patchcore.reweight_factor``)."""
        n_pos = dist.shape[1]
        worst = dist.argmax(1)  # (B,)
        rows = torch.arange(dist.shape[0]) * n_pos + worst
        query = flat.index_select(0, rows)  # (B, D)
        nearest = idx.index_select(0, rows)  # (B,) bank row m*
        anchor = self.bank.index_select(0, nearest) - self.centre  # (B, D) centred m*
        d2 = torch.addmm(self.bank_sq[None], anchor, self.bank_t, beta=1.0, alpha=-2.0)
        d2 = d2 + anchor.square().sum(1, keepdim=True)
        _, support = torch.topk(d2, self.neighbours, dim=1, largest=False)  # (B, b)
        support = torch.cat([nearest[:, None], support[:, 1:]], dim=1)
        neighbours = self.bank.index_select(0, support.reshape(-1)).reshape(support.shape[0], support.shape[1], -1)
        d = (query[:, None, :] - neighbours).norm(dim=-1)  # (B, b)
        return 1.0 - torch.softmax(d, dim=1)[:, 0]
