"""Every CLI verb on a small folder data set written to disk, and every bad input of the contract:
one-line error, exit code 2, no traceback, nothing overwritten."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gaikan.cli import app
from gaikan.data.synthetic import make_defect_dataset

runner = CliRunner()


def _save_png(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """folder:PATH layout: good/ (30), scratch-like defects/ (12) with ground_truth masks."""
    root = tmp_path_factory.mktemp("parts")
    split = make_defect_dataset(30, 0, 12, size=96, seed=3)
    for i, img in enumerate(split.train.images):
        _save_png(img, root / "good" / f"g{i:03d}.png")
    for i, (img, mask) in enumerate(zip(split.test.images, split.test.masks)):
        _save_png(img, root / "defect" / f"d{i:03d}.png")
        _save_png(mask.astype(np.float32), root / "ground_truth" / "defect" / f"d{i:03d}_mask.png")
    return root


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = result.output.strip()
    assert text.startswith("error: "), text
    assert len(text.splitlines()) == 1, text
    for frag in fragments:
        assert frag in text, text


FAST = ["--option", "image_size=96", "--option", "n_features=40", "-q"]


@pytest.fixture(scope="module")
def model(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "padim"
    result = invoke("fit", "--data", f"folder:{folder}", "--detector", "padim", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    assert "fitted padim" in result.output
    return out


def test_fit_writes_a_loadable_model(model):
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["detector"] == "padim" and manifest["settings"]["image_size"] == 96
    assert manifest["fit"]["data"].startswith("folder:")


def test_evaluate_writes_json_in_the_documented_schema_and_a_report(model, folder, tmp_path):
    out_json, report = tmp_path / "m.json", tmp_path / "report"
    result = invoke("evaluate", "--model", model, "--data", f"folder:{folder}", "--json", out_json,
                    "--report", report, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    for key in ("detector", "data", "n_images", "image_auroc", "pixel_auroc", "average_precision", "f1_max",
                "thresholds", "confusion", "seconds"):
        assert key in data
    assert data["n_images"] == 6 + 12  # 20% of 30 goods held out, all 12 defects
    assert data["image_auroc"] >= 0.9 and data["pixel_auroc"] >= 0.9
    assert set(data["thresholds"]) >= {"max-good", "quantile", "f1", "no-escape"}
    assert {"tn", "fp", "fn", "tp"} <= set(data["confusion"])
    for name in ("roc.png", "pr.png", "score_histogram.png", "confusion.png", "metrics.json", "scores.csv"):
        assert (report / name).stat().st_size > 0


def test_predict_lists_verdicts_figures_and_unreadable_files(model, folder, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("g000.png", "g001.png"):
        (inputs / name).write_bytes((folder / "good" / name).read_bytes())
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    defect = folder / "defect" / "d000.png"
    out = tmp_path / "results"
    result = invoke("predict", "--model", model, inputs, defect, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["broken.png", "g000.png", "g001.png", "d000.png"]
    broken = rows[0]
    assert broken["verdict"] == "UNREADABLE" and "broken.png" in broken["error"]
    assert rows[3]["verdict"] == "NG"
    assert {r["verdict"] for r in rows[1:]} <= {"OK", "NG"}
    assert float(rows[1]["threshold"]) > 0
    ng = (out / "ng_list.txt").read_text().split()
    assert str(defect) in ng
    for r in rows[1:]:
        assert (out / r["figure"]).stat().st_size > 5000
    assert "unreadable" in result.output


def test_demo_writes_model_and_report_and_replaces_only_its_own_output(folder, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", out, "--data", f"folder:{folder}", "-q"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "image_auroc" in result.output and "report in" in result.output
    assert (out / "model" / "manifest.json").exists() and (out / "report" / "roc.png").exists()
    assert invoke(*args).exit_code == 0  # its own earlier output is replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    assert_user_error(invoke("demo", "--out", mine, "--data", f"folder:{folder}", "-q"), "not written by")
    assert (mine / "precious.txt").read_text() == "keep"


def test_detectors_lists_padim():
    result = invoke("detectors")
    assert result.exit_code == 0 and "padim" in result.output


# ---- bad input: one line, exit code 2, nothing lost ------------------------------------------------
def test_missing_data_path(tmp_path):
    assert_user_error(invoke("fit", "--data", f"folder:{tmp_path / 'nowhere'}", "--out", tmp_path / "m", "-q"),
                      "nowhere")


def test_empty_good_folder(tmp_path):
    (tmp_path / "parts" / "good").mkdir(parents=True)
    assert_user_error(invoke("fit", "--data", f"folder:{tmp_path / 'parts'}", "--out", tmp_path / "m", "-q"),
                      "good")


def test_unknown_data_spec(tmp_path):
    assert_user_error(invoke("fit", "--data", "s3:bucket", "--out", tmp_path / "m", "-q"), "unknown data spec")


def test_unknown_detector_and_option(folder, tmp_path):
    assert_user_error(invoke("fit", "--data", f"folder:{folder}", "--detector", "magic", "--out", tmp_path / "m"),
                      "unknown detector")
    assert_user_error(invoke("fit", "--data", f"folder:{folder}", "--option", "bogus=1", "--out", tmp_path / "m"),
                      "no setting 'bogus'")


def test_undecodable_training_image_is_named(folder, tmp_path):
    import shutil

    parts = tmp_path / "parts"
    shutil.copytree(folder, parts)
    (parts / "good" / "zz_bad.png").write_bytes(b"GIF89a truncated")
    assert_user_error(invoke("fit", "--data", f"folder:{parts}", *FAST, "--out", tmp_path / "m"), "zz_bad.png")


def test_existing_output_directory_is_refused_unless_forced(model, folder, tmp_path):
    before = (model / "tensors.npz").read_bytes()
    assert_user_error(invoke("fit", "--data", f"folder:{folder}", *FAST, "--out", model), "already exists", "--force")
    assert (model / "tensors.npz").read_bytes() == before
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.csv").write_text("precious")
    assert_user_error(invoke("predict", "--model", model, folder / "good" / "g000.png", "--out", out), "already exists")
    assert (out / "results.csv").read_text() == "precious"
    result = invoke("predict", "--model", model, folder / "good" / "g000.png", "--out", out, "--force", "-q")
    assert result.exit_code == 0, result.output


def test_model_from_another_format_version(model, folder, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(model, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(invoke("evaluate", "--model", old, "--data", f"folder:{folder}"), "format version 0")
    assert_user_error(invoke("predict", "--model", old, folder / "good", "--out", tmp_path / "r"), "format version 0")


def test_missing_predict_input(model, tmp_path):
    assert_user_error(invoke("predict", "--model", model, tmp_path / "none.png", "--out", tmp_path / "r"),
                      "none.png", "does not exist")
