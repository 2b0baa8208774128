"""Images in, records out: decoding, resizing, data-set loaders and synthetic defects.

    from gaikan.data import load_data, read_image
    split = load_data("mvtec:/data/mvtec/bottle")     # DataSplit(train, test[, extra])
    img = read_image("part.png")                      # uint8 (H, W) / (H, W, 3), float32 for 16 bit
"""

from gaikan.data.datasets import DataSplit, ImageSet, load_data, parse_spec, read_idx
from gaikan.data.images import read_image, read_mask

__all__ = ["read_image", "read_mask", "load_data", "parse_spec", "read_idx", "ImageSet", "DataSplit"]
