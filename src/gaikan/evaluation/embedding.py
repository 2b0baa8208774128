"""2-D projections of learned embeddings for the report's scatter plots (pure numpy / scikit-learn).

PCA (default): centre on the training embeddings' mean, take their two leading principal axes (SVD),
project train and test onto the same axes, so the two plots share coordinates.
t-SNE (van der Maaten & Hinton, JMLR 2008) as an option: it cannot place new points into an existing
map, so train and test are embedded together (scikit-learn's ``TSNE``, seeded) and split afterwards.
"""

from __future__ import annotations

import numpy as np

from gaikan.errors import SettingsError

PROJECTIONS = ("pca", "tsne")


def pca_2d(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D), (M, D) -> (N, 2), (M, 2) on the training set's two leading principal axes."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    mean = train.mean(0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    axes = vt[:2].T
    if axes.shape[1] < 2:  # one-dimensional embedding: pad with zeros
        axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
    # a deterministic sign: the largest-magnitude loading of each axis is positive
    signs = np.sign(axes[np.abs(axes).argmax(0), np.arange(2)])
    axes = axes * np.where(signs == 0, 1.0, signs)
    return (train - mean) @ axes, (test - mean) @ axes


def project_2d(train: np.ndarray, test: np.ndarray, method: str = "pca", seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Project train and test embeddings to 2-D with ``method`` ("pca" or "tsne")."""
    if method not in PROJECTIONS:
        raise SettingsError(f"unknown projection {method!r}; use one of {', '.join(PROJECTIONS)}")
    if method == "pca":
        return pca_2d(train, test)
    from sklearn.manifold import TSNE

    both = np.concatenate([np.asarray(train, np.float64), np.asarray(test, np.float64)])
    perplexity = float(min(30.0, max(2.0, (len(both) - 1) / 3)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(both)
    return points[: len(train)], points[len(train):]
