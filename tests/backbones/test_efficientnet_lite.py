import numpy as np
import torch

from gaikan.backbones.efficientnet_lite import load_pretrained_lite0
from gaikan.backbones.features import STAGE_CHANNELS, FeatureExtractor, prepare_batch, prepare_image


def test_pretrained_weights_classify_a_real_photo():
    """The ImageNet weights load offline and recognise sklearn's bundled flower photo (daisy, 985)."""
    from sklearn.datasets import load_sample_images

    flower = load_sample_images().images[1]
    x = prepare_batch([flower], (224, 224))
    with torch.inference_mode():
        logits = load_pretrained_lite0()(x)
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == 985


def test_taps_have_the_documented_strides_and_channels():
    ext = FeatureExtractor((1, 2, 4))
    with torch.inference_mode():
        feats = ext(torch.zeros(2, 3, 224, 160))
    assert [f.shape[1] for f in feats] == [STAGE_CHANNELS[s] for s in (1, 2, 4)] == [24, 40, 112]
    assert [tuple(f.shape[-2:]) for f in feats] == [(56, 40), (28, 20), (14, 10)]


def test_grayscale_is_replicated_and_dtypes_agree():
    gray = (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    a, b = prepare_image(gray, (32, 32)), prepare_image(as_rgb, (32, 32))
    assert a.shape == (3, 32, 32)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(prepare_image(gray.astype(np.float32) / 255, (32, 32)), a, atol=1e-6)
