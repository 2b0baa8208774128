"""Pretrained feature taps and the image -> tensor preparation every CNN detector shares.

Taps are named by the stage of EfficientNet-Lite0 they end (timm's ``blocks.N`` numbering):

    stage  stride  channels
      0      2        16
      1      4        24      <- like ResNet layer1
      2      8        40      <- like ResNet layer2
      3     16        80
      4     16       112      <- like ResNet layer3
      5     32       192
      6     32       320
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from gaikan.backbones.efficientnet_lite import INPUT_MEAN, INPUT_STD, LITE0_STAGES, load_pretrained_lite0
from gaikan.data.images import prepare_image  # noqa: F401 - re-exported: the backbone input of one image
from gaikan.errors import SettingsError

STAGE_CHANNELS = [stage[5] for stage in LITE0_STAGES]
STAGE_STRIDES = [2, 4, 8, 16, 16, 32, 32]
# index of the last block of each stage in the flat block list
_STAGE_END = list(np.cumsum([stage[0] for stage in LITE0_STAGES]) - 1)


class FeatureExtractor(nn.Module):
    """EfficientNet-Lite0 truncated after the deepest requested stage; returns one map per tap.

    Input: (B, 3, H, W) float tensor already normalised (see ``prepare_batch``).
    Output: list of (B, C_i, H / stride_i, W / stride_i) tensors, in the order of ``stages``.
    """

    def __init__(self, stages: Sequence[int] = (1, 2, 4)):
        super().__init__()
        stages = [int(s) for s in stages]
        if not stages or any(s < 0 or s > 6 for s in stages):
            raise SettingsError(f"backbone stages must be in 0..6, got {stages}")
        self.stages = stages
        net = load_pretrained_lite0()
        last_block = _STAGE_END[max(stages)]
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = nn.ModuleList(net._blocks[: last_block + 1])
        self._tap_after = {_STAGE_END[s]: s for s in stages}
        # channels_last runs the depthwise convolutions 1.5x faster on CPU (bench/elpv.py notes)
        self.to(memory_format=torch.channels_last)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def channels(self) -> list[int]:
        return [STAGE_CHANNELS[s] for s in self.stages]

    @property
    def strides(self) -> list[int]:
        return [STAGE_STRIDES[s] for s in self.stages]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.contiguous(memory_format=torch.channels_last)
        x = torch.nn.functional.relu6(self._bn0(self._conv_stem(x)))
        taps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._tap_after:
                taps[self._tap_after[i]] = x
        return [taps[s] for s in self.stages]


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the backbone's input range."""
    mean = torch.tensor(INPUT_MEAN, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


def prepare_batch(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Images -> normalised (B, 3, H, W) float32 tensor for the backbone."""
    arr = np.stack([prepare_image(img, size) for img in images])
    return normalise(torch.from_numpy(arr))
