"""The training loop: seeded, validation loss, early stopping, augmentation; the nets' shapes."""

import numpy as np
import pytest
import torch

from gaikan.metric_learning.nets import MLPNet, SmallCNN, build_net, load_numpy_state, state_to_numpy
from gaikan.metric_learning.training import TrainSettings, augment_batch, train_network


def _toy(seed, epochs=4, patience=0, with_val=True):
    torch.manual_seed(seed)
    net = MLPNet((1, 8, 8), hidden=(16,), out_dim=2)
    rng = np.random.default_rng(123)
    x = torch.from_numpy(rng.normal(size=(40, 1, 8, 8)).astype(np.float32))
    y = torch.from_numpy((rng.random(40) < 0.5).astype(np.int64))
    x[y == 1] += 0.5

    def make_batches(r):
        order = r.permutation(32)
        return [order[i:i + 8] for i in range(0, 32, 8)]

    def batch_loss(idx, r):
        t = torch.from_numpy(idx)
        return torch.nn.functional.cross_entropy(net(augment_batch(x[t], r)), y[t])

    def val_loss():
        return float(torch.nn.functional.cross_entropy(net(x[32:]), y[32:]))

    history = train_network(net, make_batches, batch_loss, val_loss if with_val else None,
                            TrainSettings(epochs=epochs, lr=1e-2, seed=seed, patience=patience))
    return net, history


def test_same_seed_gives_the_same_weights_and_another_seed_does_not():
    net1, h1 = _toy(5)
    net2, h2 = _toy(5)
    net3, _ = _toy(6)
    for (k, a), b, c in zip(net1.state_dict().items(), net2.state_dict().values(), net3.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, c) for a, c in zip(net1.state_dict().values(), net3.state_dict().values()))
    assert h1 == h2


def test_history_has_one_train_and_val_loss_per_epoch_and_training_lowers_the_loss():
    _, history = _toy(0, epochs=6)
    assert len(history["train_loss"]) == 6 and len(history["val_loss"]) == 6
    assert history["train_loss"][-1] < history["train_loss"][0]
    _, no_val = _toy(0, epochs=3, with_val=False)
    assert no_val["val_loss"] == [] and len(no_val["train_loss"]) == 3


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    _, history = _toy(0, epochs=60, patience=2)
    v = history["val_loss"]
    assert len(v) < 60
    best = int(np.argmin(v))
    assert len(v) == best + 3  # two epochs after the best, then stop


def test_augmentation_keeps_shape_and_is_seeded():
    x = torch.rand(6, 1, 16, 16)
    a = augment_batch(x, np.random.default_rng(0))
    b = augment_batch(x, np.random.default_rng(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    flipped = augment_batch(x, np.random.default_rng(0), max_degrees=0, brightness=0)
    for i in range(6):  # flips only: each output is the input flipped in some way
        cands = [x[i], x[i].flip(-1), x[i].flip(-2), x[i].flip(-1).flip(-2)]
        assert any(torch.equal(flipped[i], c) for c in cands)


@pytest.mark.parametrize("size", [(28, 28), (40, 56)])
def test_nets_give_128_d_embeddings_for_any_input_size(size):
    x = torch.rand(3, 1, *size)
    assert SmallCNN()(x).shape == (3, 128)
    assert MLPNet((1, *size))(x).shape == (3, 128)
    mlp = MLPNet((1, *size), hidden=(32, 16), out_dim=8)
    assert [m.out_features for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [32, 16, 8]


def test_efficientnet_head_frozen_trains_only_the_head_and_saves_only_it():
    net = build_net("efficientnet", (1, 32, 32), stage=3)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 128)
    state = state_to_numpy(net)
    assert state and all(k.startswith("net.head.") for k in state)
    other = build_net("efficientnet", (1, 32, 32), stage=3)
    load_numpy_state(other, state)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(net.eval()(x), other.eval()(x))
    tuned = build_net("efficientnet", (1, 32, 32), stage=3, finetune=True)
    assert any(p.requires_grad for n, p in tuned.named_parameters() if n.startswith("backbone."))
