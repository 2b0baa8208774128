"""The conformal false-alarm threshold end to end: `gaikan fit --false-alarm-rate`, its refusal
when the held-out calibration set is too small (saying how many good images are needed), and the
conformal p-value that `gaikan predict` writes next to each verdict."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gaikan.cli import app
from gaikan.data.synthetic import make_defect_dataset
from gaikan.detectors.padim import PaDiM
from gaikan.errors import SettingsError
from gaikan.evaluation.thresholds import conformal, conformal_p_value

runner = CliRunner()
FAST = ["--option", "image_size=64", "--option", "n_features=30", "-q"]


def _png(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformal_parts")
    split = make_defect_dataset(40, 0, 6, size=64, seed=11)
    for i, img in enumerate(split.train.images):
        _png(img, root / "good" / f"g{i:03d}.png")
    for i, img in enumerate(split.test.images):
        _png(img, root / "defect" / f"d{i:03d}.png")
    return root


def test_fit_refuses_a_false_alarm_rate_the_calibration_set_cannot_support(folder, tmp_path):
    out = tmp_path / "model"
    # folder: holds out 20% of the 40 goods for testing -> 32 goods for fit, 10% (3) held out to calibrate
    result = runner.invoke(app, ["fit", "--data", f"folder:{folder}", *FAST, "--false-alarm-rate", "0.01",
                                 "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and len(text.splitlines()) == 1 and "Traceback" not in text
    assert "needs at least 99 good calibration images" in text, text
    assert "only 3 of the 32 good images" in text, text
    assert "at least 986 good images" in text, text  # round(0.1 * 986) = 99 held out
    assert not out.exists()


def test_the_number_of_good_images_named_in_the_refusal_is_enough(defect_split):
    images = defect_split.train.images  # 40 goods
    with pytest.raises(SettingsError, match="at least 38 good images") as info:
        PaDiM(image_size=64, n_features=20).fit(images[:30], validation_fraction=0.5, false_alarm_rate=0.05)
    assert "needs at least 19 good calibration images" in str(info.value)
    det = PaDiM(image_size=64, n_features=20).fit(images[:38], validation_fraction=0.5, false_alarm_rate=0.05)
    assert det.fit_info_["n_calibration"] == 19
    assert det.thresholds.values["conformal"] == conformal(det.calibration_scores_, 0.05)


def test_fit_with_a_false_alarm_rate_and_predict_carries_p_values(folder, tmp_path):
    model, results = tmp_path / "model", tmp_path / "results"
    result = runner.invoke(app, ["fit", "--data", f"folder:{folder}", *FAST, "--false-alarm-rate", "0.2",
                                 "--validation-fraction", "0.4", "--out", str(model)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["thresholds"]["default"] == "conformal"
    t = manifest["thresholds"]["values"]["conformal"]
    result = runner.invoke(app, ["predict", "--model", str(model), str(folder / "good"), str(folder / "defect"),
                                 "--out", str(results), "--no-figures", "-q"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(results / "results.csv")))
    assert len(rows) == 46
    from gaikan.detectors.base import load_detector

    cal = load_detector(model).calibration_scores_
    assert len(cal) == 13  # round(0.4 * 32)
    for row in rows:
        score, p = float(row["score"]), float(row["p_value"])
        # results.csv rounds scores to 6 digits, and held-out goods tie with their calibration score
        lo, hi = conformal_p_value(cal, score * (1 + 1e-5)), conformal_p_value(cal, score * (1 - 1e-5))
        assert lo - 1e-6 <= p <= hi + 1e-6
        assert 1 / 14 - 1e-9 <= p <= 1.0
        # the conformal verdict and the p-value say the same thing: NG iff p <= alpha
        assert (row["verdict"] == "NG") == (p <= 0.2 + 1e-9)
        if abs(score - t) > 1e-5 * abs(t):  # a calibration good at t itself ties with it after rounding
            assert (row["verdict"] == "NG") == (score > t)
    defects = [float(r["p_value"]) for r in rows if "/defect/" in r["path"]]
    assert max(defects) <= 0.2  # every injected defect is flagged at alpha = 0.2
