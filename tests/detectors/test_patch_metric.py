"""patch-metric: the adaptor's loss falls and the defect patches move away from the good ones on a
small task; given defective images are used as negatives; every loss / anchor / positive mode trains
and saves; the ONNX export gives the torch scores. (The shared checks run in test_shared_checks.py.)"""

import numpy as np
import pytest
import torch

from gaikan.backbones.features import prepare_batch
from gaikan.data.synthetic import make_defect_dataset
from gaikan.detectors.base import load_detector
from gaikan.detectors.patch_metric import CV_RULE, PatchAdaptor, PatchMetric, mask_coverage, rca_whitening, top_patches
from gaikan.errors import ModelFormatError, SettingsError
from gaikan.evaluation.metrics import image_auroc

SMALL = dict(image_size=64, epochs=6, steps_per_epoch=25, batch_size=128, coreset_fraction=0.2)


@pytest.fixture(scope="module")
def small_task():
    """Small textured parts, 64 px, with defects of the default size (harder than the shared split's)."""
    return make_defect_dataset(24, 12, 12, size=64, seed=3, scale=1.0, min_area=0.004)


def _separation(det, split, adaptor):
    """Median distance of the test defect patches (mask cover >= 25%) to the nearest adapted good
    training patch, over the same for the good test patches (scale-free)."""
    train_raw = det.patch_features(split.train.images)
    test_raw = det.patch_features(split.test.images)

    def adapt(raw):
        with torch.no_grad():
            return adaptor(det._standardise(raw))

    bank = adapt(train_raw)
    bank = bank.reshape(-1, bank.shape[-1])
    test = adapt(test_raw)
    dist = torch.cdist(test.reshape(-1, test.shape[-1]), bank).min(1)[0].reshape(len(test), -1).numpy()
    cover = mask_coverage(np.stack(split.test.masks), det.grid_)
    defect = dist[cover >= 0.25]
    good = dist[split.test.labels == 0].reshape(-1)
    assert len(defect) >= 10
    return float(np.median(defect) / np.median(good))


@pytest.mark.parametrize("loss, extra", [("triplet", dict(margin=4.0)), ("hypersphere", {}),
                                         ("contrastive", dict(margin=4.0))])
def test_loss_falls_and_defect_patches_move_away_from_good_ones(small_task, loss, extra):
    det = PatchMetric(loss=loss, **SMALL, **extra).fit(small_task.train.images)
    history = det.history_["train_loss"]
    assert history[-1] < 0.7 * history[0], history
    assert det.history_["val_loss"][-1] <= det.history_["val_loss"][0]
    dim = det.feature_dim
    before = _separation(det, small_task, PatchAdaptor(dim, dim))  # the identity: PatchCore's metric
    after = _separation(det, small_task, det.adaptor_)
    assert after > 1.1 * before, (before, after)
    scores = det.score(small_task.test.images).scores
    assert image_auroc(small_task.test.labels, scores) >= 0.9


def test_untrained_adaptor_is_the_identity_so_training_starts_from_patchcore():
    z = torch.randn(5, 152)
    np.testing.assert_allclose(PatchAdaptor(152, 152)(z).detach().numpy(), z.numpy(), atol=1e-6)
    np.testing.assert_allclose(PatchAdaptor(152, 152, hidden=16)(z).detach().numpy(), z.numpy(), atol=1e-6)
    w = PatchAdaptor(152, 32, seed=1).linear.weight.detach()
    np.testing.assert_allclose((w @ w.T).numpy(), np.eye(32), atol=1e-5)  # orthonormal rows


def test_rca_whitening_shrinks_the_directions_good_patches_vary_in():
    """Residuals with one dominant nuisance direction: W whitens their covariance, and a step along
    the nuisance counts less than the same Euclidean step along a direction goods never vary in."""
    rng = np.random.default_rng(0)
    dim = 12
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    spread = np.r_[10.0, np.linspace(1.0, 2.0, dim - 2), 0.1]  # nuisance first, the rarest direction last
    residuals = (rng.normal(size=(20000, dim)) * spread) @ basis.T
    w = rca_whitening(residuals)
    np.testing.assert_allclose(w, w.T, atol=1e-5)
    cov = np.cov(residuals, rowvar=False)
    np.testing.assert_allclose(w @ cov @ w.T, np.eye(dim), atol=0.05)
    nuisance, rare = basis[:, 0], basis[:, -1]
    assert np.linalg.norm(w @ nuisance) < 0.2 and np.linalg.norm(w @ rare) > 5.0
    # a direction no residual moves in stays finite
    flat = residuals.copy()
    flat[:, 0] = 0.0
    assert np.isfinite(rca_whitening(flat)).all()


def _fit_seeing_rca_start(det, images):
    """Fit, keeping what ``_rca_weight`` returned and the standardised goods it was given."""
    seen = {}
    original = PatchMetric._rca_weight

    def keep(self, good, held, rng):
        seen["weight"] = weight = original(self, good, held, rng)
        seen["good"] = good
        return weight

    PatchMetric._rca_weight = keep
    try:
        det.fit(images)
    finally:
        PatchMetric._rca_weight = original
    return seen["weight"], seen["good"]


def test_rca_start_is_the_residual_metric_at_unit_scale_and_trains_ranks_and_reloads(small_task, tmp_path):
    """init='rca': before training, W is RCA's whitening of the held-out goods' nearest-neighbour
    residuals, scaled so that good same-position pairs are at RMS distance 1; the fitted model ranks
    the defects and reloads identically; with epochs=0 W stays exactly at that start and no synthetic
    defect is made. Settings it cannot work with are refused."""
    det = PatchMetric(init="rca", **SMALL)
    weight, good = _fit_seeing_rca_start(det, small_task.train.images)
    assert not torch.allclose(weight, torch.eye(len(weight)))
    a, b = np.meshgrid(np.arange(len(good)), np.arange(len(good)))
    a, b = a[a != b], b[a != b]
    pairs = (good[a] - good[b]).reshape(-1, good.shape[-1]) @ weight.T  # same position, two images
    assert pairs.square().sum(1).mean().sqrt().item() == pytest.approx(1.0, rel=0.1)
    assert not torch.allclose(det.adaptor_.linear.weight, weight)  # training moved on from the start
    result = det.score(small_task.test.images)
    assert image_auroc(small_task.test.labels, result.scores) >= 0.9
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    assert again.init == "rca"
    np.testing.assert_array_equal(again.score(small_task.test.images[:5]).scores, result.scores[:5])

    frozen = PatchMetric(init="rca", **{**SMALL, "epochs": 0})
    weight, _ = _fit_seeing_rca_start(frozen, small_task.train.images)
    torch.testing.assert_close(frozen.adaptor_.linear.weight, weight, rtol=0, atol=0)
    assert frozen.train_info_["n_synthetic_images"] == 0 and frozen.fit_info_["negatives"] == "none: epochs=0"
    assert frozen.history_ == {"train_loss": [], "val_loss": []}
    assert image_auroc(small_task.test.labels, frozen.score(small_task.test.images).scores) >= 0.9

    with pytest.raises(SettingsError, match="embedding_dim"):
        PatchMetric(init="rca", embedding_dim=32)
    with pytest.raises(SettingsError, match="epochs"):
        PatchMetric(epochs=-1)
    with pytest.raises(SettingsError, match="held-out good images"):
        PatchMetric(init="rca", **{**SMALL, "val_fraction": 0.0}).fit(small_task.train.images)


def test_mask_coverage_and_top_patches_match_plain_loops():
    rng = np.random.default_rng(0)
    masks = rng.random((2, 16, 16)) < 0.3
    cover = mask_coverage(masks, (4, 4))
    for n in range(2):
        for i in range(4):
            for j in range(4):
                assert cover[n, i * 4 + j] == pytest.approx(masks[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean())
    dist = rng.random((3, 50))
    top = top_patches(dist, 0.1)
    assert top.shape == (3, 5)
    for n in range(3):
        assert set(top[n]) == set(np.argsort(dist[n])[-5:])


def test_given_defect_images_become_negatives(small_task):
    test = small_task.test
    defects = [img for img, lab in zip(test.images, test.labels) if lab == 1][:6]
    images = small_task.train.images + defects
    labels = np.r_[np.zeros(len(small_task.train), np.int64), np.ones(len(defects), np.int64)]
    det = PatchMetric(**SMALL).fit(images, labels)
    assert det.fit_info_["negatives"] == "real"
    assert det.fit_info_["n_train_defective"] == 6
    k = max(1, round(0.02 * det.grid_[0] * det.grid_[1]))
    assert det.train_info_["n_negative_patches"] == 6 * k
    both = PatchMetric(negatives="both", **SMALL).fit(images, labels)
    assert both.train_info_["n_synthetic_images"] > 0 and both.train_info_["n_real_defect_images"] == 6
    with pytest.raises(SettingsError, match="needs defective training images"):
        PatchMetric(negatives="real", **SMALL).fit(small_task.train.images)


@pytest.mark.parametrize("options", [
    dict(distance="cosine", anchor="mean"),
    dict(positives="neighbour", hidden=32, embedding_dim=64),
    dict(negatives="noise", noise_std=1.0, scoring="centres"),
])
def test_every_mode_trains_ranks_defects_and_reloads_identically(small_task, options, tmp_path):
    det = PatchMetric(**SMALL, **options).fit(small_task.train.images)
    result = det.score(small_task.test.images)
    assert image_auroc(small_task.test.labels, result.scores) >= 0.85
    assert result.maps.shape == (len(small_task.test), 64, 64)
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    np.testing.assert_array_equal(again.score(small_task.test.images[:5]).scores, result.scores[:5])
    assert again.history_["train_loss"] == pytest.approx(det.history_["train_loss"])
    emb = again.embed(small_task.test.images[:4])
    assert emb.shape == (4, det.adaptor_.linear.out_features) and np.isfinite(emb).all()


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(SettingsError, match="cosine"):
        PatchMetric(loss="hypersphere", distance="cosine")
    with pytest.raises(SettingsError, match="position"):
        PatchMetric(anchor="mean", positives="neighbour")
    with pytest.raises(SettingsError, match="noise_std"):
        PatchMetric(negatives="noise")
    with pytest.raises(SettingsError, match="loss"):
        PatchMetric(loss="arcface")


@pytest.mark.parametrize("options", [dict(), dict(distance="cosine", hidden=16), dict(scoring="centres")])
def test_onnx_export_gives_the_torch_scores(small_task, options, tmp_path):
    from gaikan.edge import EdgeScorer
    from gaikan.export.onnx_export import export_onnx

    det = PatchMetric(**{**SMALL, "epochs": 2}, **options).fit(small_task.train.images)
    path = export_onnx(det, tmp_path / "pm.onnx")
    rng = np.random.default_rng(1)
    images = small_task.test.images[:5] + [rng.random((80, 70, 3), dtype=np.float32)]
    torch_result = det.score(images)
    scores, maps = EdgeScorer(path, batch_size=4).score(images)
    np.testing.assert_allclose(scores, torch_result.scores, rtol=1e-4, atol=0)
    span = float(torch_result.maps.max() - torch_result.maps.min())
    np.testing.assert_allclose(maps, torch_result.maps, rtol=0, atol=1e-4 * max(span, 1.0))


def _with_labelled_defects(task, n=6):
    """Training goods + the first n test defects (labelled); the rest of the test split to evaluate."""
    test = task.test
    defect_idx = [i for i, lab in enumerate(test.labels) if lab == 1]
    given = defect_idx[:n]
    images = task.train.images + [test.images[i] for i in given]
    labels = np.r_[np.zeros(len(task.train), np.int64), np.ones(n, np.int64)]
    keep = [i for i in range(len(test)) if i not in given]
    return images, labels, [test.images[i] for i in keep], test.labels[keep]


def test_supervised_head_is_trained_on_labelled_defects_and_ranks_the_unseen_ones(small_task, tmp_path):
    images, labels, eval_images, eval_labels = _with_labelled_defects(small_task)
    det = PatchMetric(**SMALL, head_steps=200).fit(images, labels)
    assert det.train_info_["head"] == "trained"
    fusion = det.train_info_["fusion"]
    assert fusion["chosen_by"] == CV_RULE
    # every good and every labelled defective image is held out by one fold
    assert (fusion["n_cv_goods"], fusion["n_cv_defects"]) == (det.train_info_["n_good_images"], 6)
    cv = fusion["cv_auroc"]
    assert len(cv) == 11 and cv[str(fusion["distance_weight"])] == max(cv.values())
    assert 0.0 <= fusion["distance_weight"] <= 1.0
    result = det.score(eval_images)
    assert image_auroc(eval_labels, result.scores) >= 0.9
    assert result.maps.shape == (len(eval_images), 64, 64)
    # the head alone separates the unseen defects: it learnt patch-level evidence from 6 images
    z = det._standardise(det.patch_features(eval_images))
    assert image_auroc(eval_labels, det._head_scores(det.head_, z)) >= 0.8
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    np.testing.assert_array_equal(again.score(eval_images[:5]).scores, result.scores[:5])
    assert again.head_ is not None and torch.equal(again.fusion_, det.fusion_)
    assert again.fit_info_["head"] == "trained" and again.fit_info_["fusion"] == fusion  # the manifest says so
    # without a head (head=none) the same data give the plain distance
    plain = PatchMetric(**SMALL, head="none").fit(images, labels)
    assert plain.head_ is None and plain.fit_info_["head"] == "none: head=none"
    assert PatchMetric(**SMALL).fit(small_task.train.images).fit_info_["head"] == "none: no labelled defective images"


def test_onnx_export_with_the_supervised_head_gives_the_torch_scores(small_task, tmp_path):
    from gaikan.edge import EdgeScorer
    from gaikan.export.onnx_export import export_onnx

    images, labels, eval_images, _ = _with_labelled_defects(small_task)
    det = PatchMetric(**{**SMALL, "epochs": 2}, head_steps=100).fit(images, labels)
    assert det.head_ is not None
    path = export_onnx(det, tmp_path / "pm.onnx")
    torch_result = det.score(eval_images[:6])
    scores, maps = EdgeScorer(path, batch_size=4).score(eval_images[:6])
    np.testing.assert_allclose(scores, torch_result.scores, rtol=1e-4, atol=1e-4)
    span = float(torch_result.maps.max() - torch_result.maps.min())
    np.testing.assert_allclose(maps, torch_result.maps, rtol=0, atol=1e-4 * max(span, 1.0))


def test_the_fusion_weight_is_cross_validated_on_images_the_fold_models_never_saw(small_task, monkeypatch):
    """Each fold fits a whole model (adaptor, memory, head) on half of the goods and of the labelled
    defects, and scores the other halves; together the folds hold out every image once."""
    images, labels, _, _ = _with_labelled_defects(small_task)
    calls = []
    fit_rows = PatchMetric._fit_rows

    def recording(self, imgs, good_raw, given, given_raw, start, cross_validate=True, **kwargs):
        calls.append(({id(i) for i in imgs}, {id(i) for i in given}, cross_validate, self))
        return fit_rows(self, imgs, good_raw, given, given_raw, start, cross_validate, **kwargs)

    monkeypatch.setattr(PatchMetric, "_fit_rows", recording)
    det = PatchMetric(**SMALL, head_steps=100).fit(images, labels)
    (goods, defects, cv, model), *folds = calls
    assert cv and model is det and len(folds) == 2
    assert len(defects) == 6 and defects <= {id(i) for i in images}
    for fold_goods, fold_defects, fold_cv, fold in folds:
        assert not fold_cv and fold is not det and fold.head_ is not None
        # an adaptor and a memory of its own, from half of the goods
        assert fold.adaptor_ is not det.adaptor_ and len(fold.bank_) < len(det.bank_)
    # the folds' training halves are disjoint, so each image is held out by exactly one fold
    (g1, d1, *_), (g2, d2, *_) = folds
    assert g1.isdisjoint(g2) and g1 | g2 == goods and d1.isdisjoint(d2) and d1 | d2 == defects
    assert det.train_info_["fusion"]["chosen_by"] == CV_RULE


def test_tuned_head_fine_tunes_its_own_backbone_copy_and_leaves_the_distance_as_it_was(small_task, tmp_path):
    from gaikan.edge import EdgeScorer
    from gaikan.export.onnx_export import export_onnx

    images, labels, eval_images, eval_labels = _with_labelled_defects(small_task)
    frozen = PatchMetric(**SMALL, head_steps=200).fit(images, labels)
    det = PatchMetric(**SMALL, head_features="tuned", tune_steps=60).fit(images, labels)
    assert det.train_info_["head"] == "trained" and det.fit_info_["fusion"]["chosen_by"] == CV_RULE
    # the head's copy of the backbone moved; the extractor (the distance's features) did not
    tuned, shared = det.head_.tail.state_dict(), det.tail.state_dict()
    assert tuned.keys() == shared.keys()
    assert any(not torch.equal(tuned[k], shared[k]) for k in tuned)
    assert all(torch.equal(v, frozen.tail.state_dict()[k]) for k, v in shared.items())
    assert torch.equal(det.bank_, frozen.bank_)  # the same memory as with the frozen head
    # the tuned head alone ranks the unseen defects; the fused score too
    result = det.score(eval_images)
    assert image_auroc(eval_labels, result.scores) >= 0.9
    assert result.maps.shape == (len(eval_images), 64, 64)
    _, head_input = det._scoring_inputs(prepare_batch(eval_images, det.input_size))
    assert image_auroc(eval_labels, det._pooled(det._head_patches(det.head_, head_input)).numpy()) >= 0.8
    # reload: the same scores and maps; the ONNX graph gives them too
    det.save(tmp_path / "m")
    again = load_detector(tmp_path / "m")
    reloaded = again.score(eval_images[:6])
    np.testing.assert_array_equal(reloaded.scores, result.scores[:6])
    np.testing.assert_array_equal(reloaded.maps, result.maps[:6])
    scores, maps = EdgeScorer(export_onnx(det, tmp_path / "pm.onnx"), batch_size=4).score(eval_images[:6])
    np.testing.assert_allclose(scores, result.scores[:6], rtol=1e-4, atol=1e-4)
    span = float(result.maps.max() - result.maps.min())
    np.testing.assert_allclose(maps, result.maps[:6], rtol=0, atol=1e-4 * max(span, 1.0))
    # a frozen-head model cannot read a tuned head's tensors: refused, not half-loaded
    (tmp_path / "m" / "manifest.json").write_text(
        (tmp_path / "m" / "manifest.json").read_text().replace('"head_features": "tuned"', '"head_features": "frozen"'))
    with pytest.raises(ModelFormatError, match="head does not match"):
        load_detector(tmp_path / "m")
    with pytest.raises(SettingsError, match="head_features"):
        PatchMetric(head_features="trained")
    with pytest.raises(SettingsError, match="tune_steps"):
        PatchMetric(tune_steps=0)
