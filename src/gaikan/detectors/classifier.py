"""cnn-classifier: a supervised OK/NG classifier on pretrained EfficientNet-Lite0 features, with
Grad-CAM heat maps (Selvaraju et al., ICCV 2017, "Grad-CAM: Visual Explanations from Deep Networks
via Gradient-based Localization").

Network: the frozen ImageNet EfficientNet-Lite0 up to stage ``stage`` (default 4: stride 16, 112
channels) gives F (C, h, w); a small trained head computes

    A = ReLU(conv_kxk(F))            (hidden channels: the last conv feature map, Grad-CAM's layer)
    y = w^T GAP(A) + b               (the NG logit; GAP = global average pooling, dropout in training)
    score = sigmoid(y)               (the NG probability; higher = more likely defective)

trained with class-weighted binary cross-entropy (positive weight n_OK / n_NG), Adam, a step
learning-rate schedule, seeded. The backbone is frozen, so its features are computed once per image
(and per flip when ``augment``) and the head trains in seconds on a CPU; with a few hundred labelled
images a from-scratch CNN overfits where the pretrained features do not (docs/classifier.md).

Grad-CAM: alpha_c = mean over positions of dy/dA_c, L = ReLU(sum_c alpha_c A_c), upsampled
bilinearly to the working size. The returned map is ``score * L / max(L)``, so the map's maximum is
the image score and ``map > threshold`` marks the regions of an NG verdict (as for PaDiM's maps).

``input="rt"`` feeds the RT-metric anomaly-degree image (gaikan.transforms.rt_metric, fitted on the
good training images) instead of the gray image, mapped to [0, 1] by D / (D + 3).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaikan.backbones.features import FeatureExtractor, prepare_batch
from gaikan.detectors.base import Detector, ScoreResult, register
from gaikan.detectors.maps import upsample
from gaikan.errors import ModelFormatError, SettingsError
from gaikan.progress import batches, track

INPUTS = ("image", "rt")
RT_HALF = 3.0  # D / (D + RT_HALF): an RT distance of 3 maps to mid-gray


class ClassifierHead(nn.Module):
    """Conv (k x k) -> ReLU -> global average pooling -> dropout -> linear: one NG logit."""

    def __init__(self, in_channels: int, hidden: int, kernel: int, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, kernel, padding=kernel // 2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, 1)

    def activations(self, feats: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(feats))

    def logit(self, acts: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(acts.mean(dim=(2, 3))))[:, 0]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.logit(self.activations(feats))


def grad_cam(head: ClassifierHead, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NG logits (B,) and Grad-CAM maps (B, h, w) of a batch of backbone features (B, C, h, w).

    alpha = spatial mean of d logit / d A; cam = ReLU(sum_c alpha_c A_c). The logits of different
    images do not interact (no batch statistics in eval mode), so one backward pass of their sum gives
    every image's own gradient.
    """
    with torch.enable_grad():
        acts = head.activations(feats.detach()).requires_grad_(True)
        logits = head.logit(acts)
        (grads,) = torch.autograd.grad(logits.sum(), acts)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * acts.detach()).sum(1))
    return logits.detach(), cam


def scale_cams(cams: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, its image's score]: score * cam / max(cam) (zeros stay zeros)."""
    peak = cams.flatten(1).amax(1).clamp_min(1e-12)
    return cams / peak[:, None, None] * scores[:, None, None]


@register("cnn-classifier")
class CNNClassifier(Detector):
    """Supervised OK/NG CNN (pretrained EfficientNet-Lite0 + trained head), score = NG probability.

    Settings:
        image_size: working size in pixels.
        stage: backbone stage whose output the head reads (2, 4 or 6 are sensible; see features.py).
        hidden: channels of the head's conv layer (the Grad-CAM layer).
        kernel: its kernel size (1 or 3).
        epochs, batch_size, lr, weight_decay, dropout: training of the head (Adam; the rate is halved
            at 1/2 and 3/4 of the epochs).
        augment: also learn from horizontally / vertically flipped copies (their features are
            computed once, at fit time).
        input: "image" (the gray or colour image) or "rt" (the RT-metric anomaly-degree image).
        rt_window, rt_stride: the RT metric's window and stride (input="rt").
        seed: seeds the head's initialisation, the batches and the validation split.
    """

    supervised = True

    def __init__(self, image_size: int = 224, stage: int = 4, hidden: int = 128, kernel: int = 1,
                 epochs: int = 40, batch_size: int = 32, lr: float = 3e-3, weight_decay: float = 1e-4,
                 dropout: float = 0.2, augment: bool = True, input: str = "image", rt_window: int = 8,
                 rt_stride: int = 4, seed: int = 0):
        self.image_size = int(image_size)
        self.stage = int(stage)
        self.hidden = int(hidden)
        self.kernel = int(kernel)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.dropout = float(dropout)
        self.augment = bool(augment)
        self.input = str(input)
        self.rt_window = int(rt_window)
        self.rt_stride = int(rt_stride)
        self.seed = int(seed)
        if self.input not in INPUTS:
            raise SettingsError(f"cnn-classifier input must be one of {', '.join(INPUTS)}, got {self.input!r}")
        if not 0 <= self.stage <= 6:
            raise SettingsError(f"cnn-classifier stage must be in 0..6, got {self.stage}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise SettingsError(f"cnn-classifier kernel must be odd and >= 1, got {self.kernel}")
        if self.epochs < 1 or self.batch_size < 1 or self.hidden < 1:
            raise SettingsError("cnn-classifier epochs, batch_size and hidden must be >= 1")
        self._extractor: FeatureExtractor | None = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = FeatureExtractor((self.stage,))
        return self._extractor

    def _new_head(self) -> ClassifierHead:
        return ClassifierHead(self.extractor.channels[0], self.hidden, self.kernel, self.dropout)

    # ---- input ---------------------------------------------------------------------------------
    def _inputs(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self.input == "image":
            return images
        d = torch.from_numpy(self.rt_.transform(images))
        d = upsample(d, self.input_size)
        return list((d / (d + RT_HALF)).numpy())

    def _features(self, images: list[np.ndarray], flip: tuple[int, ...] = ()) -> torch.Tensor:
        x = prepare_batch(self._inputs(images), self.input_size)
        if flip:
            x = x.flip(flip)
        with torch.no_grad():  # not inference_mode: Grad-CAM differentiates the head on these
            return self.extractor(x)[0].contiguous()

    # ---- fit -----------------------------------------------------------------------------------
    def _fit(self, images: list[np.ndarray], labels: np.ndarray | None) -> None:
        from gaikan.transforms.rt_metric import RTMetric

        y = np.asarray(labels, dtype=np.int64)
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos == 0 or n_neg == 0:
            raise SettingsError(f"cnn-classifier needs OK and NG training images, got {n_neg} OK and {n_pos} NG")
        if self.input == "rt":
            self.rt_ = RTMetric(window=self.rt_window, stride=self.rt_stride, image_size=self.image_size)
            self.rt_.fit([img for img, lab in zip(images, y) if lab == 0])
        views = [()] + ([(-1,), (-2,), (-2, -1)] if self.augment else [])
        feats = []  # (V, N, C, h, w)
        for flip in views:
            parts = [self._features(images[sl], flip)
                     for sl in track(batches(len(images), 16), f"cnn-classifier: features {flip or 'plain'}")]
            feats.append(torch.cat(parts))
        feats = torch.stack(feats)
        target = torch.from_numpy(y.astype(np.float32))
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            head = self._new_head()
            opt = torch.optim.Adam(head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            sched = torch.optim.lr_scheduler.MultiStepLR(
                opt, milestones=[max(1, self.epochs // 2), max(1, 3 * self.epochs // 4)], gamma=0.5)
            pos_weight = torch.tensor(n_neg / n_pos)
            history = []
            head.train()
            for _ in track(range(self.epochs), "cnn-classifier: training"):
                order = torch.randperm(len(y), generator=gen)
                view = torch.randint(len(views), (len(y),), generator=gen)
                total = 0.0
                for sl in batches(len(y), self.batch_size):
                    idx = order[sl]
                    logits = head(feats[view[idx], idx])
                    loss = F.binary_cross_entropy_with_logits(logits, target[idx], pos_weight=pos_weight)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                sched.step()
                history.append(total / len(y))
        head.eval()
        self.head_ = head
        self.history_ = {"train_loss": history, "val_loss": []}

    # ---- score ---------------------------------------------------------------------------------
    def _score(self, images: list[np.ndarray]) -> ScoreResult:
        scores, maps = [], []
        for sl in track(batches(len(images), 16), "cnn-classifier: scoring"):
            logits, cams = grad_cam(self.head_, self._features(images[sl]))
            prob = torch.sigmoid(logits)
            maps.append(scale_cams(upsample(cams, self.input_size), prob).numpy())
            scores.append(prob.numpy())
        return ScoreResult(np.concatenate(scores), np.concatenate(maps).astype(np.float32))

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, hidden) float32: the globally pooled head activations GAP(A), the layer before the NG
        logit (for the report's embedding scatter)."""
        from gaikan.detectors.base import check_images

        self._check_fitted()
        images = check_images(images)
        out = []
        with torch.no_grad():
            for sl in batches(len(images), 16):
                out.append(self.head_.activations(self._features(images[sl])).mean(dim=(2, 3)).numpy())
        return np.concatenate(out).astype(np.float32)

    # ---- persistence ---------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        state = {f"head.{k}": v.detach().numpy() for k, v in self.head_.state_dict().items()}
        state["history_train_loss"] = np.asarray(self.history_["train_loss"], dtype=np.float64)
        if self.input == "rt":
            state.update({f"rt.{k}": v for k, v in self.rt_.state().items()})
        return state

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        from gaikan.transforms.rt_metric import RTMetric

        head = self._new_head()
        weights = {k[len("head."):]: torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("head.")}
        try:
            head.load_state_dict(weights)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelFormatError(f"cnn-classifier head weights do not fit its settings: {first}") from None
        head.eval()
        self.head_ = head
        self.history_ = {"train_loss": [float(v) for v in state.get("history_train_loss", [])], "val_loss": []}
        if self.input == "rt":
            rt_state = {k[len("rt."):]: v for k, v in state.items() if k.startswith("rt.")}
            self.rt_ = RTMetric.from_state(
                {"window": self.rt_window, "stride": self.rt_stride, "image_size": self.image_size}, rt_state)
