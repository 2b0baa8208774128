"""Property tests of Detector.score (hypothesis) on PaDiM, PatchCore and the ONNX edge scorer: random
shapes, dtypes, channel counts, sizes, memory layouts and values (NaN, inf, out of range) give either
finite scores (and maps) of the right shape or a GaikanError, never another exception; a valid image
scores the same whatever its memory layout."""

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fuzz_settings import fuzz
from odd_files import texture
from gaikan.data.images import image_problem
from gaikan.errors import GaikanError

DTYPES = ["uint8", "uint16", "bool", "float16", "float32", "float64", "int8", "int32", "int64", "complex64",
          "object"]


@st.composite
def arrays(draw):
    """An 'image' of any shape, dtype, layout and values; sometimes not an array at all."""
    kind = draw(st.sampled_from(["array"] * 12 + ["list", "none", "str", "scalar"]))
    if kind == "list":
        return [[0.5] * 16] * 16
    if kind == "none":
        return None
    if kind == "str":
        return "part.png"
    if kind == "scalar":
        return np.float32(0.5)
    valid = draw(st.booleans())  # half of them a usable image, in any dtype and layout we accept
    if valid:
        shape = [draw(st.integers(8, 160)), draw(st.integers(8, 160))]
        channels = draw(st.sampled_from([None, 1, 3, 4]))
        shape += [] if channels is None else [channels]
        dtype = draw(st.sampled_from(["uint8", "uint16", "bool", "float16", "float32", "float64"]))
    else:
        ndim = draw(st.sampled_from([0, 1, 2, 2, 2, 3, 3, 3, 4]))
        side = st.one_of(st.integers(0, 12), st.integers(8, 160))
        shape = [draw(side) for _ in range(min(ndim, 2))]
        if ndim >= 3:
            shape.append(draw(st.sampled_from([0, 1, 2, 3, 4, 5])))
        if ndim == 4:
            shape.append(draw(st.integers(1, 3)))
        dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = np.asarray(rng.random(shape))
    scale = 1.0 if valid else draw(st.sampled_from([1.0, 1.0, 255.0, 65535.0, -1.0, 1e30]))
    if dtype == "object":
        arr = values.astype(object)
    elif dtype == "bool":
        arr = values > 0.5
    elif np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(values * min(abs(scale), info.max), info.min, info.max).astype(dtype)
    else:
        with np.errstate(over="ignore"):
            arr = (values * scale).astype(dtype)
        special = None if valid else draw(st.sampled_from([None, None, np.nan, np.inf, -np.inf]))
        if special is not None and arr.size:
            arr.flat[int(rng.integers(arr.size))] = special
    arr = np.asarray(arr)
    layout = draw(st.sampled_from(["c", "fortran", "flipped", "strided", "readonly"]))
    if layout == "fortran":
        arr = np.asfortranarray(arr)
    elif layout == "flipped" and arr.ndim >= 2:
        arr = arr[::-1, ::-1]
    elif layout == "strided" and arr.ndim >= 2:
        arr = np.repeat(np.repeat(arr, 2, axis=0), 2, axis=1)[::2, ::2]
    elif layout == "readonly":
        arr.flags.writeable = False
    return arr


batches = st.lists(arrays(), min_size=0, max_size=3) | st.lists(arrays().filter(lambda a: image_problem(a) is None),
                                                                min_size=1, max_size=3)


def check(scorer, images, size):
    try:
        result = scorer(images)
    except GaikanError as exc:
        event("refused")
        assert str(exc) and "\n" not in str(exc)
        # refused only with a reason: some image really is unusable, or there are none
        assert not images or any(image_problem(img) is not None for img in images), (exc, images)
        return
    event("scored")
    scores, maps = result
    assert all(image_problem(img) is None for img in images)
    scores = np.asarray(scores)
    assert scores.shape == (len(images),) and np.isfinite(scores).all(), scores
    if maps is not None:
        assert maps.shape == (len(images), *size) and np.isfinite(maps).all()


@pytest.fixture(scope="module")
def patchcore():
    from gaikan.detectors.patchcore import PatchCore

    return PatchCore(image_size=64, coreset_fraction=0.05).fit([texture(200 + k) for k in range(12)],
                                                            validation_fraction=0.25)


@pytest.fixture(scope="module")
def edge(small_padim, tmp_path_factory):
    from gaikan.edge import EdgeScorer
    from gaikan.export.onnx_export import export_onnx

    det, _ = small_padim
    return EdgeScorer(export_onnx(det, tmp_path_factory.mktemp("fuzz_edge") / "m.onnx"), batch_size=2)


def _detector_fn(det):
    def fn(images):
        result = det.score(images)
        return result.scores, result.maps
    return fn


@fuzz(150)
@given(batches)
def test_padim_score_gives_finite_scores_or_a_gaikan_error(small_padim, images):
    det, _ = small_padim
    check(_detector_fn(det), images, det.input_size)


@fuzz(50)
@given(batches)
def test_patchcore_score_gives_finite_scores_or_a_gaikan_error(patchcore, images):
    check(_detector_fn(patchcore), images, patchcore.input_size)


@fuzz(60)
@given(batches)
def test_edge_score_gives_finite_scores_or_a_gaikan_error(edge, images):
    check(edge.score, images, edge.input_size)


def test_memory_layout_does_not_change_the_score(small_padim):
    det, _ = small_padim
    img = np.stack([texture(1), texture(2), texture(3)], axis=-1)
    base = det.score([img]).scores[0]
    for variant in (np.asfortranarray(img), img[::-1, ::-1][::-1, ::-1],
                    np.repeat(np.repeat(img, 2, 0), 2, 1)[::2, ::2], img.astype(np.float64) / 255):
        assert det.score([variant]).scores[0] == pytest.approx(base, rel=1e-4)
