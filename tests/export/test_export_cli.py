"""`gaikan export` and `gaikan predict --runtime onnx`: the ONNX runtime writes the same results.csv
(scores, verdicts, p-values), ng_list.txt and figures as the torch runtime; existing files are refused."""

import csv

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gaikan.cli import app
from gaikan.data.synthetic import make_defect_dataset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and len(text.splitlines()) == 1, text
    for frag in fragments:
        assert frag in text, text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-export")
    split = make_defect_dataset(16, 0, 4, size=80, seed=5)
    for folder, images in (("good", split.train.images), ("defect", split.test.images)):
        for i, img in enumerate(images):
            (root / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / "data" / folder / f"{folder}{i:02d}.png")
    model = root / "model"
    result = invoke("fit", "--data", f"folder:{root / 'data'}", "--detector", "padim", "-o", "image_size=64",
                    "-o", "n_features=30", "-q", "--out", model)
    assert result.exit_code == 0, result.output
    onnx_path = root / "model.onnx"
    result = invoke("export", "--model", model, "--out", onnx_path)
    assert result.exit_code == 0, result.output
    assert "exported padim" in result.output and onnx_path.is_file()
    inputs = sorted((root / "data" / "good").iterdir())[:4] + [root / "data" / "defect"]
    return root, model, onnx_path, inputs


def _rows(path):
    with open(path / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_predict_with_onnx_writes_the_same_results_as_torch(setup):
    root, model, onnx_path, inputs = setup
    (root / "data" / "defect" / "zz_broken.png").write_bytes(b"broken")
    try:
        a = invoke("predict", *inputs, "--model", model, "--out", root / "torch", "-q")
        b = invoke("predict", *inputs, "--model", onnx_path, "--runtime", "onnx", "--out", root / "onnx", "-q")
    finally:
        (root / "data" / "defect" / "zz_broken.png").unlink()
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    torch_rows, onnx_rows = _rows(root / "torch"), _rows(root / "onnx")
    assert len(torch_rows) == len(onnx_rows) == 9
    assert [r["path"] for r in torch_rows] == [r["path"] for r in onnx_rows]
    assert [r["verdict"] for r in torch_rows] == [r["verdict"] for r in onnx_rows]
    assert {r["verdict"] for r in onnx_rows} == {"OK", "NG", "UNREADABLE"}
    assert [r["threshold"] for r in torch_rows] == [r["threshold"] for r in onnx_rows]
    scored = [(t, o) for t, o in zip(torch_rows, onnx_rows) if t["score"]]
    np.testing.assert_allclose([float(o["score"]) for _, o in scored], [float(t["score"]) for t, _ in scored],
                               rtol=1e-4)
    assert [t["p_value"] for t, _ in scored] == [o["p_value"] for _, o in scored]
    assert (root / "torch" / "ng_list.txt").read_text() == (root / "onnx" / "ng_list.txt").read_text()
    figures = sorted(p.name for p in (root / "onnx" / "figures").iterdir())
    assert figures == sorted(p.name for p in (root / "torch" / "figures").iterdir()) and len(figures) == 8


def test_export_refuses_an_existing_file(setup):
    root, model, onnx_path, _ = setup
    before = onnx_path.read_bytes()
    assert_user_error(invoke("export", "--model", model, "--out", onnx_path), str(onnx_path), "--force")
    assert onnx_path.read_bytes() == before


def test_runtime_mixups_and_missing_models_are_one_line_errors(setup):
    root, model, onnx_path, inputs = setup
    assert_user_error(invoke("predict", *inputs, "--model", model, "--runtime", "onnx", "--out", root / "x1"),
                      "model directory", "gaikan export")
    assert_user_error(invoke("predict", *inputs, "--model", onnx_path, "--out", root / "x2"),
                      "--runtime onnx")
    assert_user_error(invoke("predict", *inputs, "--model", root / "no.onnx", "--runtime", "onnx",
                             "--out", root / "x3"), "no.onnx")
    assert_user_error(invoke("predict", *inputs, "--model", onnx_path, "--runtime", "tflite", "--out", root / "x4"),
                      "unknown runtime")
    assert_user_error(invoke("export", "--model", root / "nothing", "--out", root / "y.onnx"), "nothing")
