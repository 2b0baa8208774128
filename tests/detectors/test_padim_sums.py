"""PaDiM's fit as pure steps: partial sums of disjoint shares, combined, give the Gaussians of all
the embeddings (numpy mean and covariance as the reference), whatever the split and the shifts."""

import numpy as np
import torch

from gaikan.detectors.padim import accumulate_sums, combine_sums, finalize_sums, recentre


def _sums(emb, batch):
    """emb (N, P, d) in batches of images; accumulate_sums takes (groups = positions, samples, d)."""
    sums = None
    for start in range(0, len(emb), batch):
        sums = accumulate_sums(sums, torch.from_numpy(emb[start:start + batch]).transpose(0, 1))
    return sums


def test_combined_partial_sums_give_the_mean_and_covariance_of_all_embeddings():
    rng = np.random.default_rng(0)
    n, n_pos, d, eps = 37, 4, 5, 0.01
    # far from zero and correlated: what the shift is there for
    emb = (rng.normal(size=(n, n_pos, d)) @ rng.normal(size=(d, d)) + 40.0).astype(np.float32)
    whole = _sums(emb, 8)
    parts = [_sums(emb[:10], 3), _sums(emb[10:11], 4), _sums(emb[11:], 5)]  # three different shifts
    combined = combine_sums(parts)
    assert combined.n == whole.n == n
    # each batch's products are float32 (the totals float64): equal to float32 precision
    np.testing.assert_allclose(combined.sum_xxt.numpy(), recentre(whole, combined.shift).sum_xxt.numpy(),
                               rtol=1e-5, atol=1e-4)
    mean, whiten = finalize_sums(combined, eps)
    for p in range(n_pos):
        x = emb[:, p].astype(np.float64)
        np.testing.assert_allclose(mean[p].numpy(), x.mean(0), rtol=1e-6)
        cov = np.cov(x, rowvar=False) + eps * np.eye(d)
        w = whiten[p].double().numpy()
        # W = chol(Sigma)^-1, so W^T W = Sigma^-1
        np.testing.assert_allclose(w.T @ w, np.linalg.inv(cov), rtol=1e-4, atol=1e-6)
