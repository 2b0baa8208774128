"""The training loop shared by the metric-learning detectors.

Adam (Kingma & Ba, 2015) with a step learning-rate schedule (the rate is multiplied by ``lr_gamma``
every ``lr_step`` epochs), seeded (the same seed gives the same weights), optional augmentation
(:func:`augment_batch`), a rich progress bar, a held-out validation loss per epoch and optional early
stopping (stop after ``patience`` epochs without a better validation loss and keep the best weights).

The loop knows nothing about pairs or triplets: the caller gives ``make_batches(rng)`` (the batches
of one epoch, any objects) and ``batch_loss(batch, rng)`` (a scalar loss tensor in training mode),
and ``val_loss()`` (a float, computed in eval mode without gradients). It returns the history
``{"train_loss": [...], "val_loss": [...]}`` (one value per epoch; val_loss empty without validation),
which detectors keep as ``history_`` and ``gaikan.evaluation.plots.plot_loss_curves`` draws.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaikan.progress import track


@contextmanager
def limit_threads(n: int):
    """Run torch on at most ``n`` threads inside the block (restored after).

    The embedding nets are small: their many small operations gain nothing from more threads, and on
    a shared 2-core machine (load ~12) two threads made training 10-50x slower than one.
    """
    before = torch.get_num_threads()
    n = max(1, min(int(n), before))
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainSettings:
    epochs: int = 20
    lr: float = 1e-3
    lr_step: int = 0  # 0: every third of the epochs
    lr_gamma: float = 0.5
    weight_decay: float = 0.0
    patience: int = 0  # 0: no early stopping
    seed: int = 0
    threads: int = 1


def augment_batch(x: torch.Tensor, rng: np.random.Generator, *, flips: bool = True, max_degrees: float = 10.0,
                  brightness: float = 0.1) -> torch.Tensor:
    """Random horizontal/vertical flips, a small rotation (+-max_degrees, reflected border) and a
    brightness gain 1 +- brightness per image of a (B, C, H, W) batch. Parameters come from ``rng``."""
    b = x.shape[0]
    if flips:
        h = torch.from_numpy(rng.random(b) < 0.5)
        v = torch.from_numpy(rng.random(b) < 0.5)
        x = torch.where(h[:, None, None, None], x.flip(-1), x)
        x = torch.where(v[:, None, None, None], x.flip(-2), x)
    if max_degrees > 0:
        theta = torch.from_numpy(np.deg2rad(rng.uniform(-max_degrees, max_degrees, b))).float()
        cos, sin = theta.cos(), theta.sin()
        zeros = torch.zeros_like(cos)
        mat = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
        grid = F.affine_grid(mat, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if brightness > 0:
        gain = torch.from_numpy(1.0 + rng.uniform(-brightness, brightness, b)).float()
        x = x * gain[:, None, None, None]
    return x


def train_network(net: nn.Module, make_batches: Callable[[np.random.Generator], list],
                  batch_loss: Callable[[Any, np.random.Generator], torch.Tensor],
                  val_loss: Callable[[], float] | None, settings: TrainSettings,
                  description: str = "training") -> dict[str, list[float]]:
    """Train ``net`` in place; returns the loss history (see the module docstring)."""
    with limit_threads(settings.threads):
        return _train(net, make_batches, batch_loss, val_loss, settings, description)


def _train(net, make_batches, batch_loss, val_loss, settings: TrainSettings, description: str):
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    step = settings.lr_step if settings.lr_step > 0 else max(1, math.ceil(settings.epochs / 3))
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=step, gamma=settings.lr_gamma)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    best, best_state, waited = math.inf, None, 0
    for _epoch in track(range(settings.epochs), description):
        net.train()
        total, count = 0.0, 0
        for batch in make_batches(rng):
            loss = batch_loss(batch, rng)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
            count += 1
        schedule.step()
        history["train_loss"].append(total / max(count, 1))
        if val_loss is not None:
            net.eval()
            with torch.no_grad():
                v = float(val_loss())
            history["val_loss"].append(v)
            if settings.patience > 0:
                if v < best - 1e-6:
                    best, best_state, waited = v, copy.deepcopy(net.state_dict()), 0
                else:
                    waited += 1
                    if waited >= settings.patience:
                        break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    return history
