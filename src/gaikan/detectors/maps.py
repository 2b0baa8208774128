"""Anomaly-map post-processing shared by the patch detectors: upsampling and Gaussian smoothing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius round(truncate * sigma) as in scipy.ndimage.gaussian_filter."""
    radius = max(int(truncate * sigma + 0.5), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps, mirror padding at the borders."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.dtype)
    r = (k.numel() - 1) // 2
    x = maps[:, None]
    pad_mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    x = F.pad(x, (r, r, 0, 0), mode=pad_mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=pad_mode)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def patch_grid(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Feature-map size of a stride-``stride`` tap with TF 'SAME' padding."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)
