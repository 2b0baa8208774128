"""`gaikan update`: new good images added to a PaDiM or PatchCore model without its old images.

PaDiM: the updated model is the fit on old training + new images with the same held-out calibration
images (docs/scale.md "Updating a model"), to float tolerance. PatchCore: the bank grows by the
coreset of the new patches, the old bank kept. Both: thresholds recomputed from the held-out goods
scored by the updated model; a new version written, the old model untouched; bad input refused."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gaikan.cli import app
from gaikan.data.images import read_image
from gaikan.detectors.base import load_detector
from gaikan.detectors.padim import PaDiM
from gaikan.detectors.patchcore import PatchCore
from gaikan.io.model_io import sha256_file

runner = CliRunner()


@pytest.fixture(scope="module")
def parts(defect_split, tmp_path_factory):
    """The 40 good training parts as PNG files, read back (uint8, as `update` reads them)."""
    root = tmp_path_factory.mktemp("goods")
    paths = []
    for i, img in enumerate(defect_split.train.images):
        path = root / f"g{i:03d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths, [read_image(p) for p in paths]


def _new_folder(tmp_path, paths):
    folder = tmp_path / "new"
    folder.mkdir()
    for p in paths:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _update(*args):
    return runner.invoke(app, ["update", *[str(a) for a in args], "-q"])


def test_padim_update_is_the_fit_on_the_union_and_recalibrates(parts, defect_split, tmp_path):
    paths, images = parts
    old_images, new_paths, new_images = images[:24], paths[24:], images[24:]
    settings = dict(image_size=64, n_features=30)
    old = PaDiM(**settings).fit(old_images, validation_fraction=0.25)
    old.save(tmp_path / "v1")
    checksum = sha256_file(tmp_path / "v1" / "tensors.npz")
    result = _update("--model", tmp_path / "v1", "--good", _new_folder(tmp_path, new_paths), "--out", tmp_path / "v2")
    assert result.exit_code == 0, result.output
    assert "16 to training" in result.output

    # the reference: a fit on old training + new images, calibrated on the same held-out images
    held_out = {id(im) for im in old.calibration_images_}
    train_old = [im for im in old_images if id(im) not in held_out]
    assert len(train_old) == 18 and len(old.calibration_images_) == 6
    ref = PaDiM(**settings)
    ref._fit(train_old + new_images, None)
    ref.fitted_ = True
    ref.calibrate(ref.score(old.calibration_images_).scores)

    new = load_detector(tmp_path / "v2")
    test = defect_split.test.images
    np.testing.assert_allclose(new.score(test).scores, ref.score(test).scores, rtol=1e-4)
    np.testing.assert_allclose(new.calibration_scores_, ref.calibration_scores_, rtol=1e-4)
    assert new.threshold == pytest.approx(ref.threshold, rel=1e-4)
    assert new.threshold != pytest.approx(old.threshold, rel=1e-3)  # recomputed, not copied
    info = json.loads((tmp_path / "v2" / "manifest.json").read_text())["fit"]
    assert info["model_version"] == 2 and info["n_train"] == 34 and info["update"]["added_to_training"] == 16
    assert sha256_file(tmp_path / "v1" / "tensors.npz") == checksum  # the old version is untouched
    # and the new version can be updated again (its sums were saved)
    again = _update("--model", tmp_path / "v2", "--good", new_paths[0], "--out", tmp_path / "v3")
    assert again.exit_code == 0, again.output


def test_patchcore_update_extends_the_bank_and_recalibrates(parts, defect_split, tmp_path):
    paths, images = parts
    old = PatchCore(image_size=64, coreset_fraction=0.05).fit(images[:24], validation_fraction=0.25)
    old.save(tmp_path / "v1")
    result = _update("--model", tmp_path / "v1", "--good", _new_folder(tmp_path, paths[24:]), "--out",
                     tmp_path / "v2")
    assert result.exit_code == 0, result.output
    new = load_detector(tmp_path / "v2")
    n_new_patches = 16 * new.grid_[0] * new.grid_[1]
    assert new.bank_.shape[0] == old.bank_.shape[0] + round(0.05 * n_new_patches)
    np.testing.assert_array_equal(new.bank_[: old.bank_.shape[0]].numpy(), old.bank_.numpy())  # old bank kept
    np.testing.assert_allclose(np.sort(new.score(old.calibration_images_).scores), new.calibration_scores_,
                               rtol=1e-5)
    assert new.threshold == new.thresholds.values["max-good"] == pytest.approx(float(new.calibration_scores_.max()))
    assert new.threshold != pytest.approx(old.threshold, rel=1e-4)


def test_update_refuses_images_of_another_size_or_channels_and_writes_nothing(parts, tmp_path):
    paths, images = parts
    PaDiM(image_size=64, n_features=20).fit(images[:12], validation_fraction=0.25).save(tmp_path / "v1")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((80, 80), np.uint8)).save(bad / "small.png")
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(bad / "colour.png")
    (bad / "fine.png").write_bytes(paths[20].read_bytes())
    result = _update("--model", tmp_path / "v1", "--good", bad, "--out", tmp_path / "v2")
    assert result.exit_code == 2
    assert "small.png is 80x80 gray" in result.output and "colour.png is 96x96 3-channel" in result.output
    assert "fitted on 96x96 gray" in result.output and "fine.png" not in result.output
    assert not (tmp_path / "v2").exists()
    same = _update("--model", tmp_path / "v1", "--good", paths[20], "--out", tmp_path / "v1")
    assert same.exit_code == 2 and "never over it" in same.output


def test_update_from_log_takes_the_reviewed_false_alarms_of_this_model(parts, tmp_path, monkeypatch):
    """--from-log: the NG rows of this model whose current review is "false alarm", their logged
    images. The review table belongs to the service's review loop (InspectionStore.current_reviews);
    its answer is stood in here by fixed reviews."""
    from types import SimpleNamespace

    from gaikan.io.model_io import model_id, read_manifest
    from gaikan.service.store import InspectionStore

    paths, images = parts
    PaDiM(image_size=64, n_features=20).fit(images[:12], validation_fraction=0.25).save(tmp_path / "v1")
    mid = model_id(read_manifest(tmp_path / "v1"))
    store = InspectionStore(tmp_path / "log")
    ids = []
    for i, path in enumerate(paths[20:25]):
        digest, ext = store.put_blob(path.read_bytes(), "png")
        row = store.add(part_id=f"p{i}", image_sha256=digest, image_ext=ext, image_width=96, image_height=96,
                        thumb_sha256=None, heatmap_sha256=None, overlay_sha256=None, score=99.0, verdict="NG",
                        threshold=1.0, threshold_method="max-good", p_value=0.01,
                        model_id=mid if i < 4 else "padim-another", model_checksum="x", timing_ms=1.0)
        ids.append(row.id)
    store.close()
    labels = {ids[0]: "false_alarm", ids[1]: "defect", ids[2]: "false_alarm", ids[4]: "false_alarm"}

    def current_reviews(self, inspection_ids):
        return {i: SimpleNamespace(label=labels[i]) for i in inspection_ids if i in labels}

    monkeypatch.setattr(InspectionStore, "current_reviews", current_reviews, raising=False)
    result = _update("--model", tmp_path / "v1", "--from-log", tmp_path / "log", "--out", tmp_path / "v2")
    assert result.exit_code == 0, result.output
    assert "2 to training" in result.output  # ids[0] and ids[2]: not the defect, not another model's
    source = json.loads((tmp_path / "v2" / "manifest.json").read_text())["fit"]["update"]["source"]
    assert source == f"log:{tmp_path / 'log'}"
