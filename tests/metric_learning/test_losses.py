"""Each distance and loss against a hand computation on a few vectors."""

import math

import pytest
import torch

from gaikan.errors import SettingsError
from gaikan.metric_learning.losses import (contrastive_loss, default_margin, distance, pairwise_distance,
                                           triplet_loss)

A = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
B = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_distances_by_hand():
    # euclidean: squared norm of the difference
    assert distance(A, B, "euclidean").tolist() == [25.0, 1.0]
    # cosine: first row has a zero vector (cos = 0 by convention of the eps); second: 1 - 1/sqrt(2)
    assert distance(A[1:], B[1:], "cosine").item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    # higher-order: sqrt(D * sum d^4) with D = 4: diff (3, 4, 0, 0) -> sqrt(4 * (81 + 256)) = sqrt(1348)
    assert distance(A[:1], B[:1], "higher-order").item() == pytest.approx(math.sqrt(1348), rel=1e-6)


def test_higher_order_counts_a_local_difference_more_than_a_spread_one():
    zero = torch.zeros(1, 4)
    spread = torch.full((1, 4), 0.5)          # squared L2 = 1, evenly spread
    local = torch.tensor([[1.0, 0, 0, 0]])   # squared L2 = 1, all in one component
    assert distance(zero, spread, "euclidean").item() == pytest.approx(distance(zero, local, "euclidean").item())
    assert distance(zero, spread, "higher-order").item() == pytest.approx(1.0)  # equals euclidean when spread
    assert distance(zero, local, "higher-order").item() == pytest.approx(2.0)   # sqrt(D) times more when local


@pytest.mark.parametrize("kind", ["euclidean", "cosine", "higher-order"])
def test_pairwise_matches_rowwise(kind):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g)
    full = pairwise_distance(a, b, kind)
    loop = torch.stack([torch.stack([distance(a[i:i + 1], b[j:j + 1], kind)[0] for j in range(7)]) for i in range(5)])
    torch.testing.assert_close(full, loop, rtol=1e-5, atol=1e-5)


def test_contrastive_by_hand():
    # pair 1 same, distance 5 -> 25; pair 2 different, distance 1 < margin 2 -> (2 - 1)^2 = 1
    loss = contrastive_loss(A, B, torch.tensor([1, 0]), margin=2.0)
    assert loss.item() == pytest.approx(0.5 * (25 + 1) / 2)
    # a different pair beyond the margin costs nothing
    assert contrastive_loss(A[:1], B[:1], torch.tensor([0]), margin=2.0).item() == pytest.approx(0.0)


def test_triplet_euclidean_and_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 1.0]])   # d_e = 1, d_cos = 1 - 1/sqrt2 = 0.2929
    n = torch.tensor([[0.0, 1.0]])   # d_e = 2, d_cos = 1
    assert triplet_loss(a, p, n, "euclidean").item() == pytest.approx(max(0, 1 - 2 + 1.0))  # default margin 1
    assert triplet_loss(a, p, n, "euclidean", margin=1.5).item() == pytest.approx(0.5)
    assert triplet_loss(a, p, n, "cosine").item() == pytest.approx(0.0)  # 0.2929 - 1 + 0.4 < 0
    assert triplet_loss(a, n, p, "cosine").item() == pytest.approx(1 - (1 - 1 / math.sqrt(2)) + 0.4, rel=1e-6)
    assert default_margin("euclidean") == 1.0 and default_margin("cosine") == 0.4


def test_triplet_loss_averages_over_triplets():
    a = torch.zeros(2, 2)
    p = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    n = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    # triplet 1: 1 - 1 + 1 = 1; triplet 2: 0 - 9 + 1 < 0 -> 0
    assert triplet_loss(a, p, n, "euclidean").item() == pytest.approx(0.5)


def test_unknown_distance_is_refused():
    with pytest.raises(SettingsError, match="unknown distance"):
        distance(A, B, "manhattan")
