"""gaikan.edge runs without torch: in a fresh interpreter where importing torch fails, it imports,
reads images, scores them with an exported model and prints verdicts; its image preparation is the
torch path's, number for number."""


import numpy as np
import pytest
from PIL import Image

from gaikan.backbones.features import prepare_image as torch_prepare_image
from gaikan.detectors.padim import PaDiM
from gaikan.edge import main, prepare_image
from gaikan.export.onnx_export import export_onnx
from no_torch import run_without_torch

@pytest.fixture(scope="module")
def onnx_model(defect_split, tmp_path_factory):
    det = PaDiM(image_size=64, n_features=30).fit(defect_split.train.images[:20])
    root = tmp_path_factory.mktemp("edge")
    path = export_onnx(det, root / "model.onnx")
    files = []
    for i, img in enumerate(defect_split.test.images[:2] + defect_split.test.images[-2:]):
        f = root / f"part{i}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(f)
        files.append(f)
    (root / "broken.png").write_bytes(b"not a png")
    return det, path, files, root / "broken.png"


def test_the_block_really_blocks_torch():
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


def test_edge_scores_without_torch(onnx_model):
    from gaikan.data import read_image

    det, path, files, _ = onnx_model
    expected = det.score([read_image(f) for f in files]).scores
    result = run_without_torch("""
        import sys
        from gaikan.edge import EdgeScorer
        scorer = EdgeScorer(sys.argv[1])
        scores, maps = scorer.score(sys.argv[2:])
        assert maps.shape == (len(sys.argv) - 2, 64, 64), maps.shape
        assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
        print(" ".join(repr(float(s)) for s in scores))
        print(" ".join(scorer.verdicts(scores)))
    """, path, *files)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    scores = np.array([float(v) for v in lines[0].split()])
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert lines[1].split() == ["NG" if s > det.threshold else "OK" for s in expected]


def test_edge_command_line_prints_path_score_verdict_without_torch(onnx_model):
    det, path, files, broken = onnx_model
    result = run_without_torch("""
        import sys
        from gaikan.edge import main
        sys.exit(main(sys.argv[1:]))
    """, path, files[0], broken, files[-1])
    assert result.returncode == 1  # one unreadable file
    rows = [line.split(",") for line in result.stdout.strip().splitlines()]
    assert rows[0] == ["path", "score", "verdict"]
    assert [r[0] for r in rows[1:]] == [str(files[0]), str(broken), str(files[-1])]
    assert rows[2][1:] == ["", "UNREADABLE"]
    assert rows[1][2] in ("OK", "NG") and rows[3][2] in ("OK", "NG")
    assert float(rows[3][1]) > 0
    assert "broken.png" in result.stderr and "not a recognised image" in result.stderr


def test_edge_cli_refuses_a_missing_model(tmp_path, capsys):
    assert main([str(tmp_path / "nope.onnx"), "x.png"]) == 2
    assert "nope.onnx" in capsys.readouterr().err


@pytest.mark.parametrize("image", [
    np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8),
    np.random.default_rng(1).random((90, 60, 3), dtype=np.float32),
    np.random.default_rng(2).integers(0, 256, (40, 40, 4), dtype=np.uint8),
    np.random.default_rng(3).integers(0, 65536, (64, 64), dtype=np.uint16),
])
def test_image_preparation_is_the_torch_paths(image):
    np.testing.assert_array_equal(prepare_image(image, (64, 64)), torch_prepare_image(image, (64, 64)))
