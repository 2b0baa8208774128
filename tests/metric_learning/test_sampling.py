"""Pair/triplet sampling, the mean anchor, synthetic negatives and online mining on tiny examples."""

import numpy as np
import pytest
import torch

from gaikan.errors import SettingsError
from gaikan.metric_learning.sampling import (add_class_means, class_means, mine_batch_hard, mine_semi_hard,
                                             sample_pairs, sample_triplets, synthetic_negatives)

CLASSES = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])


def test_class_means_are_the_means():
    rng = np.random.default_rng(0)
    x = rng.random((9, 4, 5)).astype(np.float32)
    means, ids = class_means(x, CLASSES)
    assert ids.tolist() == [0, 1, 2]
    np.testing.assert_allclose(means[0], (x[0] + x[1] + x[2] + x[3]) / 4, rtol=1e-6)
    np.testing.assert_allclose(means[1], (x[4] + x[5]) / 2, rtol=1e-6)
    pool, index = add_class_means(x, CLASSES)
    assert index == {0: 9, 1: 10, 2: 11}
    np.testing.assert_array_equal(pool[index[2]], means[2])


def test_pairs_are_balanced_and_labelled_correctly():
    i, j, same = sample_pairs(CLASSES, 200, np.random.default_rng(1))
    assert same.sum() == 100
    np.testing.assert_array_equal(CLASSES[i] == CLASSES[j], same.astype(bool))
    assert not np.any((i == j) & (same == 1))  # a random anchor is never paired with itself


def test_mean_anchor_pairs_start_at_the_class_mean():
    x = np.random.default_rng(0).random((9, 3)).astype(np.float32)
    pool, index = add_class_means(x, CLASSES)
    i, j, same = sample_pairs(CLASSES, 50, np.random.default_rng(2), mean_index=index)
    assert set(i.tolist()) <= set(index.values())
    anchor_class = {v: k for k, v in index.items()}
    np.testing.assert_array_equal(np.array([anchor_class[a] for a in i]) == CLASSES[j], same.astype(bool))


def test_triplets_have_same_class_positive_and_other_class_negative():
    a, p, n = sample_triplets(CLASSES, 300, np.random.default_rng(3))
    assert np.all(CLASSES[a] == CLASSES[p]) and np.all(a != p)
    assert np.all(CLASSES[a] != CLASSES[n])
    _, index = add_class_means(np.zeros((9, 2), np.float32), CLASSES)
    a2, p2, n2 = sample_triplets(CLASSES, 50, np.random.default_rng(3), mean_index=index,
                                 anchor_classes=np.array([0]))
    assert set(a2.tolist()) == {index[0]}  # the mean good image
    assert np.all(CLASSES[p2] == 0) and np.all(CLASSES[n2] != 0)


def test_one_class_is_refused():
    with pytest.raises(SettingsError, match="two classes"):
        sample_triplets(np.zeros(5, np.int64), 3, np.random.default_rng(0))


def test_synthetic_negatives_differ_from_good_and_carry_the_kind():
    from gaikan.data.synthetic import make_textured_images

    rng = np.random.default_rng(0)
    good = np.stack(make_textured_images(4, 48, rng))
    neg, classes = synthetic_negatives(good, 12, np.random.default_rng(1))
    assert neg.shape == (12, 48, 48) and neg.dtype == np.float32
    assert set(classes.tolist()) <= {1, 2, 3} and len(set(classes.tolist())) >= 2
    # every negative differs from every good image somewhere
    assert all(np.abs(neg[k] - good).reshape(4, -1).max(1).min() > 0.1 for k in range(12))


def test_batch_hard_picks_the_farthest_positive_and_nearest_negative():
    # items on a line: class 0 at 0, 1, 3; class 1 at 2.2, 10
    pos = torch.tensor([[0.0], [1.0], [3.0], [2.2], [10.0]])
    classes = torch.tensor([0, 0, 0, 1, 1])
    dist = (pos - pos.T).abs()
    rows, p, n = mine_batch_hard(dist, classes, classes, torch.arange(5))
    assert rows.tolist() == [0, 1, 2, 3, 4]
    assert p.tolist() == [2, 2, 0, 4, 3]   # farthest same-class item (not itself)
    assert n.tolist() == [3, 3, 3, 2, 2]   # nearest other-class item


def test_semi_hard_picks_the_nearest_negative_beyond_the_positive():
    # anchor 0 at 0; positive at 1; negatives at 0.5 (hard), 1.5 (semi-hard), 4 (easy)
    pos = torch.tensor([[0.0], [1.0], [0.5], [1.5], [4.0]])
    classes = torch.tensor([0, 0, 1, 1, 1])
    dist = (pos - pos.T).abs()
    rows, p, n = mine_semi_hard(dist[:1], classes[:1], classes, torch.tensor([0]))
    assert rows.tolist() == [0] and p.tolist() == [1] and n.tolist() == [3]
    # when no negative is beyond the positive, the farthest negative is taken
    rows, p, n = mine_semi_hard(dist[4:5], classes[4:5], classes, torch.tensor([4]))
    # anchor at 4 (class 1): positives 0.5 (d 3.5) and 1.5 (d 2.5); negatives at 0 (d 4) and 1 (d 3)
    got = dict(zip(p.tolist(), n.tolist()))
    assert got == {2: 0, 3: 1}


def test_mining_with_mean_anchors_outside_the_batch():
    items = torch.tensor([[0.0], [2.0], [5.0], [6.0]])
    classes = torch.tensor([0, 0, 1, 1])
    means = torch.tensor([[1.0], [5.5]])
    dist = (means - items.T).abs()
    rows, p, n = mine_batch_hard(dist, torch.tensor([0, 1]), classes, None)
    assert p.tolist() == [0, 2] or p.tolist() == [1, 2]  # ties at distance 1 / 0.5: any farthest
    assert n.tolist() == [2, 1]
