"""The checks every detector passes (DESIGN.md): fit returns self; scoring before fit is a clear error;
save and reload give identical scores; scores do not depend on image order; bad input is refused with
a message; the AUROC on injected defects stays above a floor."""

import numpy as np
import pytest

from gaikan.detectors.base import get_detector_class, load_detector
from gaikan.errors import GaikanError, NotFittedError, SettingsError
from gaikan.evaluation.metrics import image_auroc

from fast_settings import VARIANTS, WITH_DEFECTS

NAMES = sorted(VARIANTS)


def _make(label):
    name, settings = VARIANTS[label]
    return get_detector_class(name)(**settings)


def _fit(det, split, label=""):
    train = split.train
    if det.supervised or label in WITH_DEFECTS:
        # supervised detectors also see half of the defects (the test keeps the other half)
        n = len(split.test) // 2
        extra = split.test.subset(np.arange(len(split.test))[split.test.labels == 1][: n // 2])
        return det.fit(train.images + extra.images, np.r_[train.labels, extra.labels])
    return det.fit(train.images)


@pytest.fixture(scope="module", params=NAMES)
def fitted(request, defect_split):
    det = _make(request.param)
    assert _fit(det, defect_split, request.param) is det
    if request.param in WITH_DEFECTS:  # what these variants are for: a head learnt from the defects
        assert det.fit_info_.get("head") == "trained"
    return det


def test_scoring_before_fit_is_a_clear_error(defect_split):
    for name in NAMES:
        with pytest.raises(NotFittedError, match="not fitted"):
            _make(name).score(defect_split.test.images[:2])


def test_auroc_on_injected_defects_stays_above_floor(fitted, defect_split):
    test = defect_split.test
    result = fitted.score(test.images)
    assert result.scores.shape == (len(test),)
    assert np.isfinite(result.scores).all()
    assert image_auroc(test.labels, result.scores) >= 0.9


def test_save_and_reload_give_identical_scores(fitted, defect_split, tmp_path):
    images = defect_split.test.images[:6]
    before = fitted.score(images)
    fitted.save(tmp_path / "model")
    again = load_detector(tmp_path / "model")
    after = again.score(images)
    np.testing.assert_array_equal(before.scores, after.scores)
    if before.maps is not None:
        np.testing.assert_array_equal(before.maps, after.maps)
    assert again.thresholds.values == fitted.thresholds.values
    assert again.threshold == fitted.threshold


def test_saving_over_an_existing_model_is_refused(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    with pytest.raises(GaikanError, match="already exists"):
        fitted.save(tmp_path / "m")
    fitted.save(tmp_path / "m", overwrite=True)


def test_scores_do_not_depend_on_image_order(fitted, defect_split):
    images = defect_split.test.images[:8]
    forward = fitted.score(images).scores
    backward = fitted.score(images[::-1]).scores[::-1]
    np.testing.assert_allclose(forward, backward, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    ([], "no images"),
    ([np.zeros((4, 4), np.uint8)], "too small"),
    ([np.zeros((32, 32, 5), np.uint8)], "expected"),
    (["not an array"], "numpy array"),
])
def test_bad_input_is_refused_with_a_message(fitted, bad, message):
    with pytest.raises(SettingsError, match=message):
        fitted.score(bad)
