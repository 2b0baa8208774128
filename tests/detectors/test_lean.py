"""Lean options shared by PaDiM and PatchCore: float16 storage, tiling, no repeated work per call."""

import numpy as np
import pytest

from gaikan.detectors.base import load_detector
from gaikan.detectors.padim import PaDiM
from gaikan.detectors.patchcore import PatchCore
from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import image_auroc


def _size(path):
    return (path / "tensors.npz").stat().st_size


def test_padim_float16_storage_halves_the_model_keeps_auroc_and_reloads_identically(defect_split, tmp_path):
    train, test = defect_split.train.images, defect_split.test
    # updatable=False: no float64 sums nor calibration images, the model is the Gaussians only
    a = PaDiM(image_size=64, n_features=40, updatable=False).fit(train)
    b = PaDiM(image_size=64, n_features=40, storage_dtype="float16", updatable=False).fit(train)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert _size(tmp_path / "b") < 0.6 * _size(tmp_path / "a")
    sb = b.score(test.images).scores
    np.testing.assert_array_equal(load_detector(tmp_path / "b").score(test.images).scores, sb)
    sa = a.score(test.images).scores
    np.testing.assert_allclose(sb, sa, rtol=5e-3)
    assert image_auroc(test.labels, sb) >= image_auroc(test.labels, sa) - 0.01


@pytest.mark.parametrize("cls, settings", [(PaDiM, dict(n_features=30)), (PatchCore, dict(coreset_fraction=0.1))])
def test_tiled_detectors_fit_on_tiles_and_return_stitched_maps(cls, settings, defect_split, tmp_path):
    # 96 px parts scored as 64 px tiles (overlap 0.5) at a 64 px working size: 3 x 3 tiles each
    det = cls(image_size=64, tile_size=64, tile_overlap=0.5, **settings).fit(defect_split.train.images)
    test = defect_split.test
    result = det.score(test.images)
    assert result.maps.shape == (len(test), 96, 96)
    np.testing.assert_allclose(result.scores, result.maps.max(axis=(1, 2)), rtol=1e-6)
    assert image_auroc(test.labels, result.scores) >= 0.9
    det.save(tmp_path / "m")
    np.testing.assert_array_equal(load_detector(tmp_path / "m").score(test.images[:4]).scores, result.scores[:4])


def test_the_memory_bank_is_prepared_once_not_per_score_call(defect_split):
    det = PatchCore(image_size=64, coreset_fraction=0.05).fit(defect_split.train.images[:8])
    memory = det.memory
    det.score(defect_split.test.images[:2])
    det.score(defect_split.test.images[2:4])
    assert det.memory is memory


def test_padim_refuses_unknown_storage_dtype():
    with pytest.raises(SettingsError, match="storage_dtype"):
        PaDiM(image_size=64, n_features=10, storage_dtype="bfloat8").fit([np.zeros((64, 64), np.uint8)] * 4)
