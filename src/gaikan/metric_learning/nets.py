"""Embedding networks: image tensor (B, C, H, W) in, embedding (B, D) out.

* :class:`MLPNet` — flattened input, hidden layers (default 256-256, ReLU), output 128.
* :class:`SmallCNN` — 3 conv layers of 64 channels (3x3, batch norm, ReLU, 2x2 max pooling; the first
  conv has stride 2, which makes training ~2.5x cheaper on CPU at 64 px), then an adaptive average
  pooling to 2x2 (so any input size works), a 256-unit layer and the 128-d output.
* :class:`EfficientNetHead` — the pretrained EfficientNet-Lite0 (``gaikan.backbones``) up to a stage,
  global average pooling, then 256 -> 128; the backbone frozen (default) or fine-tuned.

Inputs are standardised images (zero mean, unit variance over the good training pixels), one channel.
:func:`build_net` makes a net from a name, so detectors rebuild the same architecture when loading.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from gaikan.errors import SettingsError

NET_NAMES = ("mlp", "cnn", "efficientnet")


class MLPNet(nn.Module):
    def __init__(self, in_shape: Sequence[int], hidden: Sequence[int] = (256, 256), out_dim: int = 128):
        super().__init__()
        n_in = 1
        for s in in_shape:
            n_in *= int(s)
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(n_in, int(h)), nn.ReLU()]
            n_in = int(h)
        layers.append(nn.Linear(n_in, int(out_dim)))
        self.layers = nn.Sequential(*layers)
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, channels: int = 64, hidden: int = 256, out_dim: int = 128):
        super().__init__()
        blocks: list[nn.Module] = []
        c = int(in_channels)
        for i in range(3):
            blocks += [nn.Conv2d(c, channels, 3, stride=2 if i == 0 else 1, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c = channels
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * 4, hidden), nn.ReLU(),
                                  nn.Linear(hidden, int(out_dim)))
        self.out_dim = int(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class EfficientNetHead(nn.Module):
    """Pretrained EfficientNet-Lite0 features (up to ``stage``), pooled, then a 256 -> out_dim head.

    The one-channel input is replicated to the three channels the backbone expects. With
    ``finetune=False`` the backbone's weights stay frozen (and in eval mode); only the head learns.
    """

    def __init__(self, stage: int = 4, finetune: bool = False, hidden: int = 256, out_dim: int = 128):
        super().__init__()
        from gaikan.backbones.features import FeatureExtractor

        self.backbone = FeatureExtractor((int(stage),))
        self.finetune = bool(finetune)
        for p in self.backbone.parameters():
            p.requires_grad_(self.finetune)
        c = self.backbone.channels[0]
        self.head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, int(out_dim)))
        self.out_dim = int(out_dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # batch-norm statistics stay the pretrained ones, also when fine-tuning
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feat = self.backbone(x)[0]
        return self.head(feat.mean(dim=(2, 3)))

    def trainable_state_prefixes(self) -> tuple[str, ...]:
        """The state-dict prefixes a saved model must store (the frozen backbone is rebuilt)."""
        extra = ("head.", "classifier.")  # classifier: the softmax layer of classifier-embedding
        return extra + ("backbone.",) if self.finetune else extra


def build_net(name: str, in_shape: Sequence[int], *, hidden: Sequence[int] = (256, 256), out_dim: int = 128,
              stage: int = 4, finetune: bool = False) -> nn.Module:
    """A fresh net by name (``mlp``, ``cnn`` or ``efficientnet``) for inputs of shape (C, H, W)."""
    if name == "mlp":
        return MLPNet(in_shape, hidden, out_dim)
    if name == "cnn":
        return SmallCNN(int(in_shape[0]), 64, 256, out_dim)
    if name == "efficientnet":
        return EfficientNetHead(stage, finetune, 256, out_dim)
    raise SettingsError(f"unknown net {name!r}; choose one of {', '.join(NET_NAMES)}")


def state_to_numpy(net: nn.Module, prefix: str = "net.") -> dict:
    """A net's learned tensors as numpy arrays (the frozen pretrained backbone is left out)."""
    keep = getattr(net, "trainable_state_prefixes", lambda: ("",))()
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()
            if k.startswith(keep)}


def load_numpy_state(net: nn.Module, arrays: dict, prefix: str = "net.") -> None:
    """Inverse of :func:`state_to_numpy`; refuses missing or mis-shaped tensors."""
    from gaikan.errors import ModelFormatError

    keep = getattr(net, "trainable_state_prefixes", lambda: ("",))()
    state = {k[len(prefix):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith(prefix)}
    own = {k: v for k, v in net.state_dict().items() if k.startswith(keep)}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ModelFormatError(f"the saved net lacks tensors {missing[:5]}")
    for k, v in list(state.items()):
        if k in own and own[k].dim() == 0 and v.numel() == 1:
            state[k] = v = v.reshape(())  # the npz writer stores scalars as 1-element arrays
        if k not in own or tuple(own[k].shape) != tuple(v.shape):
            raise ModelFormatError(f"saved net tensor {k!r} has shape {tuple(v.shape)}, "
                                   f"the net expects {tuple(own[k].shape) if k in own else 'no such tensor'}")
    net.load_state_dict(state, strict=False)
