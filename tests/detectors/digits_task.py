"""A small task from sklearn's digits (8x8): digit 3 is "good", digit 8 is "defective"."""

import numpy as np


def digits_task(good=3, defect=8, n_good_train=100, n_defect_train=40, seed=0):
    """Returns (train_images, train_labels, test_images, test_labels); labels 1 = the defect digit."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.flatnonzero(d.target == good))
    b = rng.permutation(np.flatnonzero(d.target == defect))
    train = np.r_[g[:n_good_train], b[:n_defect_train]]
    test = np.r_[g[n_good_train:], b[n_defect_train:]]
    return ([x[i] for i in train], (d.target[train] == defect).astype(np.int64),
            [x[i] for i in test], (d.target[test] == defect).astype(np.int64))


FAST_DIGITS = dict(image_size=16, epochs=10, batch_size=16, net="mlp")
