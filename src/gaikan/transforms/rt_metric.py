"""RT-metric anomaly-degree images (Taguchi's RT method, applied window by window).

The RT method (Taguchi, Rajesh, Jugulum; "The Mahalanobis-Taguchi Strategy", Wiley 2002, ch. on the
recognition-Taguchi method) describes a signal x by how it relates to a *unit space*, here the mean
good image m. For every k x k window w (stride s), with x_w, m_w in R^n (n = k^2, gray values):

    sensitivity  beta_w = <x_w, m_w> / <m_w, m_w>                 (the best gain x_w ~ beta m_w)
    variation    eta_w  = || x_w - beta_w m_w ||_2 / sqrt(n)      (what the gain does not explain)

A dark or bright blotch changes beta (the gain), a crack or scratch that keeps the mean level changes
eta (the shape). Both are turned into one number per window by the 2-D Mahalanobis distance of
(beta_w, eta_w) to the good images' statistics of *the same window*:

    D_w(x) = sqrt( (z_w - mu_w)^T S_w^-1 (z_w - mu_w) ),   z_w = (beta_w, eta_w),
    mu_w = mean of z_w over the good images,  S_w = their covariance + lambda_w I.

Why this rather than a standardised eta alone: eta misses a uniform darkening of a window (it is
absorbed by beta), and both beta and eta have a spread that varies across the part (edges, busbars,
texture) which a per-window covariance removes; the 2x2 inverse is closed-form, so it costs nothing.
lambda_w = shrinkage * (mean variance of that feature over all windows) + 1e-8, so a window that never
varies on good images (a black border) cannot make the distance explode.

The result is a one-channel image of H' x W' windows, H' = (H - k) // s + 1, float32, 0 on a typical
good window and growing with the anomaly. Vectorised: ``torch.nn.functional.unfold`` gives all
windows of a batch at once; no Python loop over windows or images. See docs/rt_metric.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gaikan.data.images import resize, to_gray
from gaikan.errors import ModelFormatError, NotFittedError, SettingsError

_TINY = 1e-12


# ---- pure functions ---------------------------------------------------------------------------
def rt_features(x: torch.Tensor, mean_image: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Sensitivity and variation of every window: x (N, H, W), mean_image (H, W) -> (N, 2, H', W').

    Channel 0 is beta = <x_w, m_w> / <m_w, m_w>, channel 1 is eta = ||x_w - beta m_w|| / sqrt(n).
    """
    if x.ndim != 3 or mean_image.shape != x.shape[1:]:
        raise SettingsError(f"rt_features: images {tuple(x.shape)} do not match the mean image "
                            f"{tuple(mean_image.shape)}")
    h_out = (x.shape[1] - window) // stride + 1
    w_out = (x.shape[2] - window) // stride + 1
    n = window * window
    xw = F.unfold(x[:, None], window, stride=stride)  # (N, n, L)
    mw = F.unfold(mean_image[None, None], window, stride=stride)  # (1, n, L)
    mm = (mw * mw).sum(1).clamp_min(_TINY)  # (1, L)
    beta = (xw * mw).sum(1) / mm  # (N, L)
    resid = xw - beta[:, None, :] * mw
    eta = resid.square().sum(1).sqrt() / np.sqrt(n)
    return torch.stack([beta, eta], 1).view(x.shape[0], 2, h_out, w_out)


def window_gaussians(z: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window mean (2, H', W') and inverse covariance (H', W', 2, 2) of features z (N, 2, H', W').

    S_w = sample covariance + lambda_f I per feature f, lambda_f = shrinkage * mean_w var_f + 1e-8.
    The 2x2 inverse is closed-form: [[d, -b], [-b, a]] / (ad - b^2).
    """
    z = z.double()
    n = z.shape[0]
    mu = z.mean(0)
    c = z - mu
    denom = max(n - 1, 1)
    var_b = (c[:, 0] ** 2).sum(0) / denom
    var_e = (c[:, 1] ** 2).sum(0) / denom
    cov_be = (c[:, 0] * c[:, 1]).sum(0) / denom
    a = var_b + shrinkage * var_b.mean() + 1e-8
    d = var_e + shrinkage * var_e.mean() + 1e-8
    det = (a * d - cov_be ** 2).clamp_min(_TINY)
    inv = torch.stack([torch.stack([d, -cov_be], -1), torch.stack([-cov_be, a], -1)], -2) / det[..., None, None]
    return mu.float(), inv.float()


def rt_distance(z: torch.Tensor, mu: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance per window: z (N, 2, H', W'), mu (2, H', W'), inv_cov (H', W', 2, 2) -> (N, H', W')."""
    diff = (z - mu[None]).permute(0, 2, 3, 1)  # (N, H', W', 2)
    q = torch.einsum("nhwi,hwij,nhwj->nhw", diff, inv_cov, diff)
    return q.clamp_min(0).sqrt()


# ---- the transform ----------------------------------------------------------------------------
class RTMetric:
    """Fit on good images, then turn any image into its RT anomaly-degree image.

    Settings:
        window: k, the side of the square window (n = k^2 pixels).
        stride: s, the step between windows.
        image_size: working size (images are converted to gray and resized to image_size^2);
            None keeps the size of the first fitted image (all images must then have it).
        shrinkage: covariance regularisation relative to the mean per-feature variance.
        batch_size: images per vectorised pass (bounds memory).

    ``transform(images)`` -> float32 (N, H', W'), H' = (size - window) // stride + 1.
    """

    def __init__(self, window: int = 8, stride: int = 4, image_size: int | None = 64, shrinkage: float = 0.05,
                 batch_size: int = 64):
        self.window = int(window)
        self.stride = int(stride)
        self.image_size = None if image_size in (None, 0, "none", "None") else int(image_size)
        self.shrinkage = float(shrinkage)
        self.batch_size = int(batch_size)
        if self.window < 1 or self.stride < 1:
            raise SettingsError(f"RT metric window and stride must be >= 1, got {self.window}, {self.stride}")
        if self.image_size is not None and self.image_size < self.window:
            raise SettingsError(f"RT metric image_size {self.image_size} is smaller than the window {self.window}")
        if self.shrinkage < 0:
            raise SettingsError(f"RT metric shrinkage must be >= 0, got {self.shrinkage}")

    def settings(self) -> dict:
        return {"window": self.window, "stride": self.stride, "image_size": self.image_size,
                "shrinkage": self.shrinkage, "batch_size": self.batch_size}

    # ------------------------------------------------------------------------------------------
    @property
    def working_size(self) -> tuple[int, int]:
        if self.image_size is not None:
            return (self.image_size, self.image_size)
        if not hasattr(self, "size_"):
            raise NotFittedError("RTMetric is not fitted: call fit() or from_state() first")
        return self.size_

    @property
    def output_shape(self) -> tuple[int, int]:
        h, w = self.working_size
        return ((h - self.window) // self.stride + 1, (w - self.window) // self.stride + 1)

    def prepare(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Images (any dtype, gray or colour) -> float32 gray (N, H, W) in [0, 1] at the working size."""
        images = list(images)
        if not images:
            raise SettingsError("no images were given")
        if self.image_size is None and not hasattr(self, "size_"):
            self.size_ = tuple(int(v) for v in np.asarray(images[0]).shape[:2])
        size = self.working_size
        out = np.empty((len(images), *size), dtype=np.float32)
        for i, img in enumerate(images):
            img = np.asarray(img)
            if img.ndim not in (2, 3):
                raise SettingsError(f"image {i} has shape {img.shape}, expected (H, W) or (H, W, C)")
            gray = to_gray(img)
            if gray.shape != size:
                if self.image_size is None:
                    raise SettingsError(f"image {i} is {gray.shape[0]}x{gray.shape[1]}, the RT metric was fitted "
                                        f"at {size[0]}x{size[1]} (set image_size to resize)")
                gray = resize(gray, size)
            out[i] = gray
        if min(size) < self.window:
            raise SettingsError(f"images of {size[0]}x{size[1]} are smaller than the RT window {self.window}")
        return torch.from_numpy(out)

    def fit(self, good_images: Sequence[np.ndarray]) -> "RTMetric":
        """Unit space from good images: the mean image, then the per-window Gaussian of (beta, eta)."""
        good_images = list(good_images)
        if len(good_images) < 2:
            raise SettingsError(f"the RT metric needs at least 2 good images, got {len(good_images)}")
        if self.image_size is None:
            self.__dict__.pop("size_", None)
        total = None
        for start in range(0, len(good_images), self.batch_size):
            x = self.prepare(good_images[start:start + self.batch_size]).double().sum(0)
            total = x if total is None else total + x
        self.mean_image_ = (total / len(good_images)).float()
        z = torch.cat([self._features(good_images[s:s + self.batch_size])
                       for s in range(0, len(good_images), self.batch_size)])
        self.mu_, self.inv_cov_ = window_gaussians(z, self.shrinkage)
        return self

    def _features(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            return rt_features(self.prepare(images), self.mean_image_, self.window, self.stride)

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 2, H', W') float32: beta and eta of every window (before standardisation)."""
        self._check_fitted()
        return torch.cat([self._features(images[s:s + self.batch_size])
                          for s in range(0, len(images), self.batch_size)]).numpy()

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Anomaly-degree images: float32 (N, H', W'), the per-window Mahalanobis distance of (beta, eta)."""
        self._check_fitted()
        images = list(images)
        if not images:
            raise SettingsError("no images were given")
        out = []
        for s in range(0, len(images), self.batch_size):
            z = self._features(images[s:s + self.batch_size])
            with torch.inference_mode():
                out.append(rt_distance(z, self.mu_, self.inv_cov_))
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def _check_fitted(self) -> None:
        if not hasattr(self, "mean_image_"):
            raise NotFittedError("RTMetric is not fitted: call fit() or from_state() first")

    # ---- persistence (plain arrays, for a detector's _state) ----------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Plain arrays: the mean image, the per-window means and inverse covariances, and the
        settings (``settings``: window, stride, image_size or 0, shrinkage, batch_size), so that
        ``from_state(state)`` alone rebuilds the transform."""
        self._check_fitted()
        settings = np.array([self.window, self.stride, self.image_size or 0, self.shrinkage, self.batch_size],
                            dtype=np.float64)
        return {"mean_image": self.mean_image_.numpy(), "mu": self.mu_.numpy(), "inv_cov": self.inv_cov_.numpy(),
                "settings": settings}

    @classmethod
    def from_state(cls, settings: dict | None, state: dict[str, np.ndarray] | None = None) -> "RTMetric":
        """Rebuild a fitted transform: ``from_state(settings, state)`` or ``from_state(state)`` (the
        settings then come from the state's ``settings`` array)."""
        if state is None:
            settings, state = None, settings
        if state is None:
            raise ModelFormatError("RT metric state is missing")
        if settings is None:
            if "settings" not in state:
                raise ModelFormatError("RT metric state lacks the array 'settings' (and no settings were given)")
            w, s, size, shrink, bs = (float(v) for v in np.asarray(state["settings"]).ravel()[:5])
            settings = {"window": int(w), "stride": int(s), "image_size": int(size) or None, "shrinkage": shrink,
                        "batch_size": int(bs)}
        rt = cls(**settings)
        try:
            mean_image = torch.from_numpy(np.asarray(state["mean_image"], dtype=np.float32))
            mu = torch.from_numpy(np.asarray(state["mu"], dtype=np.float32))
            inv_cov = torch.from_numpy(np.asarray(state["inv_cov"], dtype=np.float32))
        except KeyError as exc:
            raise ModelFormatError(f"RT metric state lacks the array {exc}") from None
        if mean_image.ndim != 2:
            raise ModelFormatError(f"RT metric mean image has shape {tuple(mean_image.shape)}, expected (H, W)")
        if rt.image_size is None:
            rt.size_ = tuple(int(v) for v in mean_image.shape)
        elif tuple(mean_image.shape) != rt.working_size:
            raise ModelFormatError(f"RT metric mean image is {tuple(mean_image.shape)}, settings say "
                                   f"{rt.working_size}")
        expected = rt.output_shape
        if tuple(mu.shape) != (2, *expected) or tuple(inv_cov.shape) != (*expected, 2, 2):
            raise ModelFormatError(f"RT metric tensors have inconsistent shapes: mu {tuple(mu.shape)}, inv_cov "
                                   f"{tuple(inv_cov.shape)} for {expected[0]}x{expected[1]} windows")
        rt.mean_image_, rt.mu_, rt.inv_cov_ = mean_image, mu, inv_cov
        return rt
