import json

import numpy as np
import pytest

from gaikan.detectors.base import load_detector
from gaikan.detectors.padim import PaDiM
from gaikan.errors import ModelFormatError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, defect_split):
    det = PaDiM(image_size=64, n_features=16).fit(defect_split.train.images[:16])
    path = tmp_path_factory.mktemp("m") / "model"
    det.save(path)
    return det, path


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_manifest_holds_what_a_user_needs(saved):
    det, path = saved
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["detector"] == "padim"
    assert manifest["settings"]["n_features"] == 16
    assert manifest["input_size"] == [64, 64]
    assert manifest["thresholds"]["default"] == "max-good"
    assert set(manifest["thresholds"]["values"]) >= {"max-good", "quantile"}
    assert manifest["versions"]["gaikan"] and manifest["format_version"] == 1
    assert len(manifest["tensors"]["sha256"]) == 64
    # no pickle anywhere: the tensor file loads with allow_pickle=False
    with np.load(path / "tensors.npz", allow_pickle=False) as npz:
        assert "whiten_tril" in npz.files


def test_a_modified_tensor_file_is_refused(saved, tmp_path):
    _, path = saved
    dst = _copy(path, tmp_path)
    data = bytearray((dst / "tensors.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / "tensors.npz").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="modified or is corrupt"):
        load_detector(dst)


def test_another_format_version_is_refused_with_a_message(saved, tmp_path):
    _, path = saved
    dst = _copy(path, tmp_path)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["format_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="format version 99.*reads format version 1"):
        load_detector(dst)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "tensors.npz").unlink(), "tensors.npz is missing"),
])
def test_broken_model_directories_get_their_error(saved, tmp_path, damage, message):
    _, path = saved
    dst = _copy(path, tmp_path)
    damage(dst)
    with pytest.raises(ModelFormatError, match=message):
        load_detector(dst)


def test_missing_model_path(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_detector(tmp_path / "nope")
