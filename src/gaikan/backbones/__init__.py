from gaikan.backbones.efficientnet_lite import EfficientNetLite, EfficientNetLite0, load_pretrained, load_pretrained_lite0
from gaikan.backbones.features import FeatureExtractor, prepare_batch, prepare_image

__all__ = ["EfficientNetLite", "EfficientNetLite0", "load_pretrained", "FeatureExtractor", "load_pretrained_lite0", "prepare_batch", "prepare_image"]
