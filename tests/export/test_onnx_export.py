"""ONNX export: the exported graph (run by onnxruntime through gaikan.edge) gives the scores and maps
of the torch detector, on random images and on real ELPV cells; metadata carries the threshold and
settings; an existing file is refused; models that cannot be exported say why."""

import json

import numpy as np
import pytest

from gaikan.detectors.padim import PaDiM
from gaikan.detectors.patchcore import PatchCore
from gaikan.edge import EdgeScorer
from gaikan.errors import GaikanError, ModelFormatError, SettingsError
from gaikan.export.onnx_export import STAGE_CUT, export_onnx, read_metadata, split_stages

# the torch detectors, fitted once per module on the synthetic parts (96 px keeps this fast)
# (the PatchCore variant exercises every branch of its head: channel pooling and re-weighting on top
# of the plain nearest-neighbour map; the real-data test below runs the default PatchCore)
DETECTORS = {
    "padim": lambda: PaDiM(image_size=96, n_features=40),
    "patchcore": lambda: PatchCore(image_size=96, coreset_fraction=0.1, reweight=True, feature_dim=100),
}
SCORE_RTOL = 1e-4


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def exported(request, defect_split, tmp_path_factory):
    det = DETECTORS[request.param]().fit(defect_split.train.images)
    path = export_onnx(det, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx")
    return det, path


def _random_images(n, seed):
    rng = np.random.default_rng(seed)
    gray = [rng.integers(0, 256, (80, 120), dtype=np.uint8) for _ in range(n // 2)]
    colour = [rng.random((130, 100, 3), dtype=np.float32) for _ in range(n - n // 2)]
    return gray + colour  # other sizes than the working size: resizing is part of what is compared


def _assert_agree(det, scorer, images):
    torch_result = det.score(images)
    scores, maps = scorer.score(images)
    assert scores.shape == torch_result.scores.shape and maps.shape == torch_result.maps.shape
    np.testing.assert_allclose(scores, torch_result.scores, rtol=SCORE_RTOL, atol=0)
    # maps: within 1e-4 of the map's range (float32 sums in another order)
    span = float(torch_result.maps.max() - torch_result.maps.min())
    np.testing.assert_allclose(maps, torch_result.maps, rtol=0, atol=1e-4 * max(span, 1.0))
    assert scorer.verdicts(scores) == ["NG" if s > det.threshold else "OK" for s in torch_result.scores]


def test_onnx_scores_agree_with_torch_on_random_images(exported):
    det, path = exported
    scorer = EdgeScorer(path, batch_size=3)  # batches of 3, 3 and 1: the batch dimension is dynamic
    _assert_agree(det, scorer, _random_images(7, seed=1))


def test_onnx_scores_agree_with_torch_on_test_parts(exported, defect_split):
    det, path = exported
    _assert_agree(det, EdgeScorer(path, batch_size=4), defect_split.test.images[:8])


def test_metadata_carries_threshold_settings_and_size(exported):
    det, path = exported
    meta = read_metadata(path)
    assert meta["detector"] == det.name
    assert json.loads(meta["input_size"]) == list(det.input_size)
    assert float(meta["threshold"]) == det.threshold
    assert json.loads(meta["settings"])["image_size"] == det.image_size
    assert set(json.loads(meta["thresholds"])) == set(det.thresholds.values)
    assert meta["gaikan_version"]
    scorer = EdgeScorer(path)
    assert scorer.threshold == det.threshold and scorer.input_size == det.input_size
    np.testing.assert_array_equal(scorer.p_values([0.0, det.threshold, 1e9]),
                                  det.p_values([0.0, det.threshold, 1e9]))


def test_padim_graph_is_cut_between_features_and_head_and_the_halves_score_alike(exported, defect_split):
    import onnxruntime as ort

    det, path = exported
    stages = split_stages(path)
    if det.name != "padim":  # one stage: nothing to cut
        assert stages is None and "stage_cut" not in read_metadata(path)
        return
    assert read_metadata(path)["stage_cut"] == STAGE_CUT
    scorer = EdgeScorer(path)
    batch = scorer.prepare(defect_split.test.images[:5])
    features, head = (ort.InferenceSession(part, providers=["CPUExecutionProvider"])
                      for part in stages[:2])
    emb = features.run([STAGE_CUT], {"image": batch})[0]
    assert emb.shape == (5, det.grid_[0] * det.grid_[1], det.n_features)
    scores, maps = head.run(["score", "anomaly_map"], {STAGE_CUT: emb})
    whole_scores, whole_maps = scorer.score_prepared(batch)
    np.testing.assert_allclose(scores, whole_scores, rtol=1e-6)
    np.testing.assert_allclose(maps, whole_maps, rtol=1e-6, atol=1e-6)


def test_export_refuses_an_existing_file_and_replaces_it_with_force(exported, tmp_path):
    det, _ = exported
    if det.name != "padim":
        pytest.skip("the file handling is the same for every detector: checked once")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's file")
    with pytest.raises(GaikanError, match="already exists"):
        export_onnx(det, out)
    assert out.read_bytes() == b"the user's file"
    export_onnx(det, out, force=True)
    assert EdgeScorer(out).name == det.name


def test_unexportable_models_and_bad_files_are_refused_with_a_message(defect_split, tmp_path):
    with pytest.raises(GaikanError, match="not fitted"):
        export_onnx(PaDiM(image_size=96), tmp_path / "x.onnx")
    tiled = PatchCore(image_size=64, tile_size=48, coreset_fraction=0.05)
    tiled.fit([img for img in defect_split.train.images[:6]])
    with pytest.raises(SettingsError, match="tiling"):
        export_onnx(tiled, tmp_path / "tiled.onnx")
    assert not (tmp_path / "tiled.onnx").exists()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ModelFormatError, match="bad.onnx"):
        EdgeScorer(bad)
    with pytest.raises(ModelFormatError, match="missing.onnx"):
        EdgeScorer(tmp_path / "missing.onnx")


def _elpv_cells(n_good=3, n_defective=3):
    """A few real ELPV mono test cells (paths), read from the installed data set without loading it all."""
    from gaikan.data.datasets import _elpv_split_rows, elpv_data_dir

    rows = [r for r in _elpv_split_rows() if r["type"] == "mono" and r["split"] == "test"]
    good = [r["file"] for r in rows if r["label"] == "0"][:n_good]
    bad = [r["file"] for r in rows if r["label"] == "1"][:n_defective]
    return [elpv_data_dir() / f for f in good + bad]


def test_onnx_agrees_with_torch_on_real_elpv_cells(exported):
    from gaikan.data import read_image

    det, path = exported
    paths = _elpv_cells()
    torch_result = det.score([read_image(p) for p in paths])
    scorer = EdgeScorer(path, batch_size=3)
    scores, maps = scorer.score(paths)  # the edge scorer reads the files itself
    np.testing.assert_allclose(scores, torch_result.scores, rtol=SCORE_RTOL, atol=0)
    span = float(torch_result.maps.max() - torch_result.maps.min())
    np.testing.assert_allclose(maps, torch_result.maps, rtol=0, atol=1e-4 * max(span, 1.0))
