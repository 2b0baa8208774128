"""Pretrained feature taps and the image -> tensor preparation every CNN detector shares.

Taps are named by the stage of EfficientNet-Lite they end (timm's ``blocks.N`` numbering); channels
of Lite0 and Lite1 / of Lite2:

    stage  stride  channels
      0      2      16 / 16
      1      4      24 / 24      <- like ResNet layer1
      2      8      40 / 48      <- like ResNet layer2
      3     16      80 / 88
      4     16     112 / 120     <- like ResNet layer3
      5     32     192 / 208
      6     32     320 / 352
"""

from __future__ import annotations

from contextlib import contextmanager
from copy import deepcopy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gaikan.backbones.efficientnet_lite import INPUT_MEAN, INPUT_STD, VARIANTS, lite_stages, load_pretrained
from gaikan.data.images import prepare_image  # noqa: F401 - re-exported: the backbone input of one image
from gaikan.errors import SettingsError

BACKBONES = tuple(VARIANTS)
STAGE_STRIDES = [2, 4, 8, 16, 16, 32, 32]


def stage_channels(backbone: str = "lite0") -> list[int]:
    """Channels of each stage's output for a backbone variant."""
    return [stage[5] for stage in lite_stages(backbone)]


def _stage_end(backbone: str) -> list[int]:
    """Index of the last block of each stage in the flat block list."""
    return [int(v) for v in np.cumsum([stage[0] for stage in lite_stages(backbone)]) - 1]


STAGE_CHANNELS = stage_channels("lite0")


class FeatureExtractor(nn.Module):
    """EfficientNet-Lite (``backbone`` lite0 | lite1 | lite2) truncated after the deepest requested
    stage; returns one map per tap.

    Input: (B, 3, H, W) float tensor already normalised (see ``prepare_batch``).
    Output: list of (B, C_i, H / stride_i, W / stride_i) tensors, in the order of ``stages``.
    """

    def __init__(self, stages: Sequence[int] = (1, 2, 4), backbone: str = "lite0"):
        super().__init__()
        stages = [int(s) for s in stages]
        if not stages or any(s < 0 or s > 6 for s in stages):
            raise SettingsError(f"backbone stages must be in 0..6, got {stages}")
        if len(set(stages)) != len(stages):
            raise SettingsError(f"backbone stages must not repeat, got {stages}")
        if backbone not in BACKBONES:
            raise SettingsError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
        self.stages = stages
        self.backbone = backbone
        net = load_pretrained(backbone)
        ends = _stage_end(backbone)
        last_block = ends[max(stages)]
        self._conv_stem, self._bn0 = net._conv_stem, net._bn0
        self._blocks = nn.ModuleList(net._blocks[: last_block + 1])
        self._tap_after = {ends[s]: s for s in stages}
        self._stage_channels = stage_channels(backbone)
        # channels_last runs the depthwise convolutions 1.5x faster on CPU (bench/elpv.py notes)
        self.to(memory_format=torch.channels_last)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def channels(self) -> list[int]:
        return [self._stage_channels[s] for s in self.stages]

    @property
    def strides(self) -> list[int]:
        return [STAGE_STRIDES[s] for s in self.stages]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = self._run(x, self._tap_after)
        return [taps[s] for s in self.stages]

    def all_taps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every stage's output up to the deepest tapped one, by stage (one forward pass)."""
        ends = _stage_end(self.backbone)
        return self._run(x, {ends[s]: s for s in range(max(self.stages) + 1)})

    def _run(self, x: torch.Tensor, tap_after: dict[int, int]) -> dict[int, torch.Tensor]:
        return _run_blocks(self._blocks, self._stem(x), tap_after)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.relu6(self._bn0(self._conv_stem(x)))

    def trunk(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The input of stage ``start`` (B, C, h, w): the stem and every block before that stage."""
        x = self._stem(x)
        for block in self._blocks[: _stage_begin(self.backbone, start)]:
            x = block(x)
        return x

    def tail(self, start: int, *, copy: bool = False) -> "TapTail":
        """Stages ``start`` .. the deepest tap as a module of their own: the trunk's output -> the
        taps. ``copy``: its own weights (to fine-tune; the extractor stays as it is), else shared."""
        return TapTail(self, start, copy=copy)


class TapTail(nn.Module):
    """The blocks of a FeatureExtractor from stage ``start`` to its deepest tap: (B, C, h, w), the
    extractor's ``trunk(x, start)`` -> its taps, in the order of its ``stages`` (so that
    ``tail(trunk(x))`` equals ``extractor(x)``). ``start`` must not be above the first tapped stage."""

    def __init__(self, extractor: FeatureExtractor, start: int, *, copy: bool = False):
        super().__init__()
        if not 0 <= start <= min(extractor.stages):
            raise SettingsError(f"a tail must start at or before the first tapped stage "
                                f"{min(extractor.stages)}, got {start}")
        self.start = int(start)
        self.stages = list(extractor.stages)
        first = _stage_begin(extractor.backbone, start)
        blocks = extractor._blocks[first:]
        self.blocks = nn.ModuleList(deepcopy(list(blocks)) if copy else list(blocks))
        self._tap_after = {i - first: s for i, s in extractor._tap_after.items()}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = _run_blocks(self.blocks, x, self._tap_after)
        return [taps[s] for s in self.stages]


def _run_blocks(blocks, x: torch.Tensor, tap_after: dict[int, int]) -> dict[int, torch.Tensor]:
    """``x`` through ``blocks`` in turn; the output of block i kept as stage ``tap_after[i]``'s tap."""
    taps: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        x = block(x)
        if i in tap_after:
            taps[tap_after[i]] = x
    return taps


def _stage_begin(backbone: str, stage: int) -> int:
    """Index of the first block of a stage in the flat block list."""
    return 0 if stage == 0 else _stage_end(backbone)[stage - 1] + 1


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the backbone's input range."""
    mean = torch.tensor(INPUT_MEAN, dtype=batch.dtype).view(1, 3, 1, 1)
    std = torch.tensor(INPUT_STD, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean) / std


_TAP_CACHE: dict | None = None
_TAP_ADD = True


@contextmanager
def tap_cache(*, add: bool = True):
    """While active, ``tap_features`` remembers the backbone's taps per image (by the image's identity,
    the backbone and the size): detectors that share a backbone and a working size -- the candidates
    of ``--detector auto``, then the winner's final fit -- run it once per image, whatever stages each
    one taps and however the images fall into batches. Nested, it shares the outer cache; ``add``
    False reads it without adding to it (the final fit: its images beyond the selection's are not
    needed again)."""
    global _TAP_CACHE, _TAP_ADD
    outer, outer_add = _TAP_CACHE, _TAP_ADD
    _TAP_CACHE = {} if outer is None else outer
    _TAP_ADD = add
    try:
        yield
    finally:
        _TAP_CACHE, _TAP_ADD = outer, outer_add


@contextmanager
def no_tap_cache():
    """Inside an active ``tap_cache``: none for a while (what a detector costs on its own, e.g. the
    scoring time ``--detector auto`` reports per candidate)."""
    global _TAP_CACHE
    outer = _TAP_CACHE
    _TAP_CACHE = None
    try:
        yield
    finally:
        _TAP_CACHE = outer


def tap_features(extractor: "FeatureExtractor", images: Sequence[np.ndarray],
                 size: tuple[int, int]) -> list[torch.Tensor]:
    """``extractor(prepare_batch(images, size))`` under inference mode; under ``tap_cache``, the
    images that went through the same backbone at this size come from the cache and only the others
    run (as one batch)."""
    if _TAP_CACHE is None:
        with torch.inference_mode():
            return extractor(prepare_batch(images, size))
    base = (extractor.backbone, tuple(size))
    wanted = set(extractor.stages)
    entries = [_TAP_CACHE.get((*base, id(img))) for img in images]
    missing = [i for i, e in enumerate(entries) if e is None or not wanted <= set(e[0])]
    if missing:
        with torch.inference_mode():  # every stage: later callers may want others
            taps = extractor.all_taps(prepare_batch([images[i] for i in missing], size))
        for j, i in enumerate(missing):
            mine = {s: t[j:j + 1] for s, t in taps.items()}
            # the image is kept referenced, so its id stays its own while the entry lives
            entries[i] = ({**entries[i][0], **mine} if entries[i] is not None else mine, images[i])
            if _TAP_ADD:
                _TAP_CACHE[(*base, id(images[i]))] = entries[i]
        if len(missing) == len(images):
            return [taps[s] for s in extractor.stages]
    return [torch.cat([e[0][s] for e in entries]) for s in extractor.stages]


def prepare_batch(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Images -> normalised (B, 3, H, W) float32 tensor for the backbone."""
    arr = np.stack([prepare_image(img, size) for img in images])
    return normalise(torch.from_numpy(arr))
