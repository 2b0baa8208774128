"""--detector auto (gaikan.auto): it picks the better candidate where one is clearly better (and the
earlier one where the check set cannot tell them apart), never reads the test images, keeps to its
time budget, and saves an ordinary model with its table."""

import json

import numpy as np
import pytest

from gaikan import pipeline
from gaikan.auto import (Candidate, SelectionRow, auroc_standard_error, choose, full_fit_units, make_check_set,
                         select_detector)
from gaikan.detectors.base import load_detector

# A clearly worse candidate: one random channel of the coarsest tap at 32 px, smoothed flat.
WEAK = Candidate("weak", "padim", {"image_size": 32, "stages": (6,), "n_features": 1, "sigma": 8.0})
STRONG = Candidate("strong", "padim", {"image_size": 96, "n_features": 40})


def test_auto_picks_the_clearly_better_of_two_settings(defect_split):
    train = defect_split.train.images
    det, selection = select_detector(train, grid=(WEAK, STRONG), seed=1, budget=100)
    rows = {r.label: r for r in selection.rows}
    assert selection.chosen == "strong"
    assert det.name == "padim" and det.image_size == 96 and det.n_features == 40
    assert not hasattr(det, "fitted_")  # returned unfitted: the caller fits it on everything
    assert rows["strong"].image_auroc >= 0.9 and rows["strong"].image_auroc > rows["weak"].image_auroc + 0.1
    assert all(r.score_ms > 0 for r in selection.rows)  # what each candidate would cost per part
    # the check set: held-out goods and one synthetic defective twin each
    assert selection.n_check_good == selection.n_synthetic == 12
    assert selection.n_fit == len(train) - 12


def test_the_order_of_the_grid_does_not_decide_a_clear_difference(defect_split):
    _, selection = select_detector(defect_split.train.images, grid=(STRONG, WEAK), seed=1, budget=100)
    assert selection.chosen == "strong"


def test_the_check_set_has_a_defective_twin_of_every_good():
    rng = np.random.default_rng(0)
    goods = [np.full((40, 40), 0.5, np.float32) + rng.normal(0, 0.01, (40, 40)).astype(np.float32) for _ in range(3)]
    images, labels, masks = make_check_set(goods, np.random.default_rng(1))
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    for good, bad, mask in zip(images[::2], images[1::2], masks[1::2]):
        assert mask.any() and np.array_equal(good[~mask], bad[~mask]) and not np.array_equal(good, bad)


class _Untouchable(list):
    def _refuse(self, *args, **kwargs):
        raise AssertionError("the selection read a test image")

    __getitem__ = __iter__ = _refuse


def test_the_selection_never_reads_the_test_split(defect_split):
    from dataclasses import replace

    test = replace(defect_split.test)
    test.images = _Untouchable(defect_split.test.images)
    split = replace(defect_split, test=test)
    det = pipeline.fit_auto(split, grid=(WEAK, STRONG), budget=100)
    assert det.fit_info_["selection"]["chosen"] == "strong"
    assert det.fit_info_["n_train"] + det.fit_info_["n_calibration"] == len(defect_split.train)


def test_candidates_past_the_time_budget_are_skipped_and_say_so(defect_split):
    costly = Candidate("costly", "padim", {"image_size": 96, "n_features": 40}, cost=50.0)
    _, selection = select_detector(defect_split.train.images, grid=(STRONG, costly), budget=4)
    rows = {r.label: r for r in selection.rows}
    assert rows["costly"].status.startswith("skipped: time budget") and rows["costly"].image_auroc is None
    assert selection.chosen == "strong"


def test_a_full_fit_is_estimated_to_cost_more_than_its_share_of_images_on_large_sets():
    """The budget's unit conversion: the image ratio where the training set is not larger than a
    selection run (fixed costs), superlinear above it (ELPV poly: 580 goods, 208 selection images ->
    4.7 selection runs; a default PatchCore fit measured 6.3, the linear 2.8 let auto skip candidates
    that fit in the bound)."""
    assert full_fit_units(100, 130) == pytest.approx(100 / 130)
    assert full_fit_units(208, 208) == pytest.approx(1.0)
    assert full_fit_units(580, 208) == pytest.approx((580 / 208) ** 1.5)
    sizes = [50, 100, 208, 300, 580, 2000]
    assert all(full_fit_units(a, 208) < full_fit_units(b, 208) for a, b in zip(sizes, sizes[1:]))


def test_the_budget_keeps_room_for_the_costliest_final_fit_that_may_win(defect_split):
    """A candidate whose final fit is costly (final_cost) makes the reserve grow: a later candidate
    that fits beside a default-cost final fit is skipped beside a costly one."""
    cheap = Candidate("cheap", "padim", {"image_size": 96, "n_features": 20}, cost=0.5)
    for final_cost, ran in ((1.0, True), (3.5, False)):
        first = Candidate("first", "padim", {"image_size": 96, "n_features": 40}, final_cost=final_cost)
        _, selection = select_detector(defect_split.train.images, grid=(first, cheap), budget=5)
        rows = {r.label: r for r in selection.rows}
        assert (rows["cheap"].status == "ok") is ran, (final_cost, rows["cheap"].status)


def test_cli_fit_auto_saves_the_chosen_detector_with_its_table(defect_split, tmp_path):
    from typer.testing import CliRunner
    from PIL import Image

    from gaikan.cli import app

    root = tmp_path / "part"
    (root / "good").mkdir(parents=True)
    for i, img in enumerate(defect_split.train.images + defect_split.test.images[:10]):
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / "good" / f"{i:03d}.png")
    (root / "scratch").mkdir()
    for i, img in enumerate(defect_split.test.images[-8:]):
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / "scratch" / f"{i:03d}.png")
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["fit", "--data", f"folder:{root}", "--detector", "auto", "--option",
                                      "image_size=64", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "| candidate |" in result.output and "(chosen)" in result.output
    result_fit_output = result.output
    manifest = json.loads((out / "manifest.json").read_text())
    selection = manifest["fit"]["selection"]
    assert manifest["detector"] == next(r["detector"] for r in selection["rows"] if r["label"] == selection["chosen"])
    assert all(r["settings"]["image_size"] == 64 for r in selection["rows"])
    det = load_detector(out)
    assert det.image_size == 64
    report = tmp_path / "report"
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--data", f"folder:{root}",
                                      "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    html = (report / "report.html").read_text()
    assert "How this detector was chosen" in html and "(chosen)" in html and "scoring ms / image" in html
    assert "score ms/image" in result_fit_output


def test_auto_refuses_too_few_goods_and_unknown_options(defect_split, tmp_path):
    from gaikan.errors import SettingsError

    with pytest.raises(SettingsError, match="at least"):
        select_detector(defect_split.train.images[:8], grid=(STRONG,))


def test_real_defective_training_images_join_the_check_set(defect_split):
    test = defect_split.test
    bad = [img for img, lab in zip(test.images, test.labels) if lab == 1][:5]
    images = defect_split.train.images + bad
    labels = [0] * len(defect_split.train) + [1] * len(bad)
    det, selection = select_detector(images, labels, grid=(WEAK, STRONG), seed=1, budget=100)
    assert selection.n_real_defects == 5 and selection.chosen == "strong"
    assert selection.n_fit == len(defect_split.train) - selection.n_check_good  # defects never fitted on


def test_the_tap_cache_gives_the_same_scores_and_runs_the_backbone_once(defect_split):
    """Under tap_cache (what auto's candidates share), a second detector on the same images and backbone
    reuses the taps: identical scores to an uncached fit, whatever stages each one taps."""
    from gaikan.backbones import features
    from gaikan.backbones.features import tap_cache
    from gaikan.detectors.padim import PaDiM
    from gaikan.detectors.patchcore import PatchCore

    train, test = defect_split.train.images[:12], defect_split.test.images[:6]
    plain = PatchCore(image_size=64).fit(train, validation_fraction=0).score(test).scores
    calls = []
    real = features.prepare_batch
    features.prepare_batch = lambda imgs, size: calls.append(len(imgs)) or real(imgs, size)
    try:
        with tap_cache():
            PaDiM(image_size=64, n_features=20).fit(train, validation_fraction=0).score(test)
            n_first = sum(calls)
            cached_det = PatchCore(image_size=64).fit(train, validation_fraction=0)
            cached = cached_det.score(test).scores
            n_second = sum(calls)
            with features.no_tap_cache():  # what auto times a candidate's scoring with
                alone = cached_det.score(test).scores
            n_alone = sum(calls) - n_second
            cached_again = cached_det.score(test).scores  # the cache is back after it
    finally:
        features.prepare_batch = real
    assert n_second == n_first  # the second detector ran no backbone pass
    assert n_alone == len(test)  # without the cache: a backbone pass for every image
    assert sum(calls) == n_second + n_alone
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(alone, plain)
    np.testing.assert_array_equal(cached_again, plain)


def test_cached_taps_serve_other_batches_of_the_same_images_and_add_false_adds_nothing(defect_split):
    """The cache is per image: the winner's final fit (other images in other batches, some never
    seen) runs the backbone only on the new ones and scores like an uncached fit."""
    from gaikan.backbones import features
    from gaikan.backbones.features import tap_cache
    from gaikan.detectors.patchcore import PatchCore

    images, test = defect_split.train.images[:16], defect_split.test.images[:6]
    later = images[::-1][:10] + defect_split.train.images[16:20]  # 10 seen (reversed), 4 new
    plain = PatchCore(image_size=64).fit(later, validation_fraction=0, calibrate=False).score(test).scores
    calls = []
    real = features.prepare_batch
    features.prepare_batch = lambda imgs, size: calls.append(len(imgs)) or real(imgs, size)
    try:
        with tap_cache():
            PatchCore(image_size=64, stages=(1, 2, 4)).fit(images, validation_fraction=0)
            calls.clear()
            with tap_cache(add=False):
                cached = PatchCore(image_size=64).fit(later, validation_fraction=0, calibrate=False).score(test).scores
            assert sum(calls) == 4 + 6  # the 4 new training images and the test images
            calls.clear()
            PatchCore(image_size=64).fit(later, validation_fraction=0, calibrate=False)
            assert sum(calls) == 4  # add=False kept them out: they run again
    finally:
        features.prepare_batch = real
    np.testing.assert_allclose(cached, plain, rtol=1e-5)


def test_the_auroc_standard_error_matches_the_spread_of_auroc_over_repeated_check_sets():
    """Hanley & McNeil's formula is exact in form for exponential scores; for normal scores at a
    high AUC it is larger than the true spread (more ties, never fewer)."""
    from gaikan.evaluation.metrics import image_auroc

    rng = np.random.default_rng(0)

    def spread_and_mean(draw, n_pos, n_neg):
        aucs = [image_auroc(np.r_[np.zeros(n_neg), np.ones(n_pos)], draw(n_pos, n_neg)) for _ in range(1500)]
        return float(np.std(aucs)), float(np.mean(aucs))

    for theta, n_pos, n_neg in [(9.0, 48, 48), (40.0, 48, 48), (9.0, 20, 100)]:  # AUC 0.90, 0.976, 0.90
        spread, mean = spread_and_mean(lambda p, n: np.r_[rng.exponential(1, n), rng.exponential(theta, p)],
                                       n_pos, n_neg)
        assert 0.8 * spread < auroc_standard_error(mean, n_pos, n_neg) < 1.25 * spread
    for shift in (2.0, 3.5):  # binormal, AUC 0.92 and 0.993
        spread, mean = spread_and_mean(lambda p, n: np.r_[rng.normal(0, 1, n), rng.normal(shift, 1, p)], 48, 48)
        assert 0.8 * spread < auroc_standard_error(mean, 48, 48) < 2.0 * spread


def test_a_difference_the_check_set_cannot_see_goes_to_the_earlier_candidate():
    def rows(*aucs):
        return [SelectionRow(f"c{i}", "padim", {}, image_auroc=a) for i, a in enumerate(aucs)]

    # 48 + 48 check images: 0.990 is within one standard error (about 0.008) of 0.9935
    assert choose(rows(0.990, 0.9935, 0.95), 48, 48).label == "c0"
    # many more check images resolve the same difference; a clearly worse first candidate never wins
    assert choose(rows(0.990, 0.9935, 0.95), 5000, 5000).label == "c1"
    assert choose(rows(0.95, 0.9935), 48, 48).label == "c1"
    skipped = rows(0.999, 0.96)
    skipped[0].status, skipped[0].image_auroc = "skipped: time budget", None
    assert choose(skipped, 48, 48).label == "c1"
