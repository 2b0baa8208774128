"""gaikan compare (variants, one table, JSON + markdown), evaluate --rows supervised, and the
metric-learning plots of evaluate --report, on a small folder data set written to disk."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gaikan.cli import app
from gaikan.compare import parse_variants, split_variants
from gaikan.data.synthetic import make_defect_dataset
from gaikan.errors import SettingsError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _save_png(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """good/ (30) and defect/ (16) at 64 px."""
    root = tmp_path_factory.mktemp("cmp")
    split = make_defect_dataset(30, 0, 16, size=64, seed=4)
    for i, img in enumerate(split.train.images):
        _save_png(img, root / "good" / f"g{i:03d}.png")
    for i, img in enumerate(split.test.images):
        _save_png(img, root / "defect" / f"d{i:03d}.png")
    return root


def test_variant_lists_split_at_commas_outside_brackets_and_merge_options():
    assert split_variants("padim, triplet[loss=cosine,anchor=mean],cnn-classifier") == [
        "padim", "triplet[loss=cosine,anchor=mean]", "cnn-classifier"]
    variants = parse_variants("padim,padim[n_features=20]",
                              {"padim.image_size": "64", "padim.n_features": "30"})
    assert [v.label for v in variants] == ["padim", "padim[n_features=20]"]
    assert variants[0].options == {"image_size": "64", "n_features": "30"}
    assert variants[1].options == {"image_size": "64", "n_features": "20"}  # brackets win
    assert variants[1].make().n_features == 20


@pytest.mark.parametrize("text, options, message", [
    ("padim[n_features=20", {}, "without"),
    ("padim,padim", {}, "more than once"),
    ("nosuch", {}, "unknown detector"),
    ("padim[colour=red]", {}, "no setting 'colour'"),
    ("padim", {"patchcore.image_size": "64"}, "not among --detectors"),
    ("padim", {"image_size": "64"}, "DETECTOR.KEY"),
])
def test_bad_variant_lists_are_refused(text, options, message):
    with pytest.raises(SettingsError, match=message):
        parse_variants(text, options)


FAST = ["-o", "padim.image_size=64", "-o", "padim.n_features=20", "-o", "cnn-classifier.image_size=64",
        "-o", "cnn-classifier.epochs=8"]


@pytest.fixture(scope="module")
def compared(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    result = invoke("compare", "--data", f"folder:{folder}", "--detectors", "padim,padim[stages=2],cnn-classifier",
                    *FAST, "--out", out, "--save-models", "-q")
    assert result.exit_code == 0, result.output
    return out, result


def test_compare_fits_every_variant_on_the_same_rows_and_writes_one_table(compared, folder):
    out, result = compared
    data = json.loads((out / "compare.json").read_text())
    rows = data["results"]
    assert [r["label"] for r in rows] == ["padim", "padim[stages=2]", "cnn-classifier"]
    assert all(not r["error"] for r in rows)
    # one supervised detector: everyone is scored on the supervised protocol's rows (6 goods + 8 defects)
    assert {r["rows"] for r in rows} == {"supervised"} and {r["n_test"] for r in rows} == {14}
    # padim learns from the 24 good training images only (minus calibration), the classifier also from defects
    assert rows[0]["n_train"] < rows[2]["n_train"]
    for r in rows:
        assert 0.8 <= r["image_auroc"] <= 1.0 and 0 <= r["accuracy"] <= 1
        assert r["fit_seconds"] > 0 and r["ms_per_image"] > 0
        assert sum(r["confusion"].values()) == 14
    assert rows[1]["options"] == {"image_size": "64", "n_features": "20", "stages": "2"}
    table = (out / "compare.md").read_text()
    assert "| padim[stages=2] |" in table and "image AUROC" in table
    assert "compare.md" in result.output
    assert (out / "models" / "padim_stages=2_" / "manifest.json").is_file()
    # the results are never overwritten silently
    again = invoke("compare", "--data", f"folder:{folder}", "--detectors", "padim", *FAST[:4], "--out", out, "-q")
    assert again.exit_code == 2 and "already exists" in again.output


def test_compare_refuses_an_unknown_detector_in_one_line(folder, tmp_path):
    result = invoke("compare", "--data", f"folder:{folder}", "--detectors", "padim,nosuch", "--out", tmp_path / "x")
    assert result.exit_code == 2 and "unknown detector 'nosuch'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_evaluate_on_the_supervised_rows_and_report_training_plots(compared, folder, tmp_path):
    models = compared[0] / "models"
    report = tmp_path / "report"
    result = invoke("evaluate", "--model", models / "cnn-classifier", "--data", f"folder:{folder}",
                    "--report", report, "-q")
    assert result.exit_code == 0, result.output
    for name in ("confusion.png", "loss_curves.png", "embedding_train.png", "embedding_test.png"):
        assert (report / name).stat().st_size > 1000, name
    # a good-only detector evaluated on the supervised rows sees exactly the supervised test rows
    padim = models / "padim"
    own = invoke("evaluate", "--model", padim, "--data", f"folder:{folder}", "--json", tmp_path / "own.json", "-q")
    sup = invoke("evaluate", "--model", padim, "--data", f"folder:{folder}", "--rows", "supervised",
                 "--json", tmp_path / "sup.json", "-q")
    assert own.exit_code == 0 and sup.exit_code == 0, sup.output
    n_own = json.loads((tmp_path / "own.json").read_text())["n_images"]
    n_sup = json.loads((tmp_path / "sup.json").read_text())["n_images"]
    assert (n_own, n_sup) == (6 + 16, 6 + 8)
    bad = invoke("evaluate", "--model", padim, "--data", f"folder:{folder}", "--rows", "some", "-q")
    assert bad.exit_code == 2 and "evaluation rows" in bad.output
