"""`python -m gaikan.edge` (no torch) on the odd folder: the accounting rules of `gaikan predict` - a row
for every file found, the reason of every unreadable or skipped one on stderr, --recursive - and the
scores of the torch path."""

import csv
import io
import os

import numpy as np
import pytest

from no_torch import run_without_torch
from odd_files import EXPECTED, IN_SUB
from gaikan.data.images import read_image

EDGE_MAIN = """
    from gaikan.edge import main
    code = main(sys.argv[1:])
    assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
    sys.exit(code)
"""


@pytest.fixture(scope="module")
def onnx_file(small_padim, tmp_path_factory):
    from gaikan.export.onnx_export import export_onnx

    det, _ = small_padim
    return export_onnx(det, tmp_path_factory.mktemp("edge_acc") / "m.onnx")


def run_edge(*args):
    return run_without_torch(EDGE_MAIN, *args, timeout=180)


@pytest.mark.parametrize("recursive", [False, True])
def test_edge_accounts_for_every_file_without_torch(onnx_file, small_padim, odd_folder, recursive):
    det, _ = small_padim
    result = run_edge(onnx_file, *(["--recursive"] if recursive else []), odd_folder)
    assert result.returncode == 1, result.stderr  # some files are unreadable; the rest are scored
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "score", "verdict"]
    by_name = {os.path.relpath(r[0], odd_folder): r for r in rows[1:]}
    expected = {**EXPECTED, **IN_SUB} if recursive else EXPECTED
    assert set(by_name) == set(expected)
    for name, want in expected.items():
        path, score, verdict = by_name[name]
        if want == "scored":
            assert verdict in ("OK", "NG")
            torch_score = det.score([read_image(path)]).scores[0]
            assert float(score) == pytest.approx(float(torch_score), rel=1e-3)
            assert verdict == ("NG" if float(score) > det.threshold else "OK")
        else:
            assert (score, verdict) == ("", want[0])
            line = [ln for ln in result.stderr.splitlines() if ln.endswith(want[1]) or want[1] in ln and name in ln]
            assert line, (name, result.stderr)
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note:")]
    assert (len(notes) == 0) if recursive else (len(notes) == 1 and "sub/" in notes[0])


def test_edge_batch_of_several_keeps_going_past_a_too_small_image(onnx_file, small_padim, odd_folder):
    """EdgeScorer(batch_size=4) through score_files: the 2x4000 image costs only its row."""
    from gaikan.data.inputs import SCORED, scan_inputs, score_files
    from gaikan.edge import EdgeScorer

    det, _ = small_padim
    scorer = EdgeScorer(onnx_file, batch_size=4)
    files = [odd_folder / n for n in ("good1.png", "tall.png", "good2.png", "rgba.png", "cmyk.jpg")]
    outs = list(score_files(scan_inputs(files).rows, scorer.score, batch_size=4))
    assert [o.status for o in outs] == [SCORED, "UNREADABLE", SCORED, SCORED, SCORED]
    assert "tall.png" in outs[1].reason and "too small" in outs[1].reason
    expected = det.score([read_image(f) for i, f in enumerate(files) if i != 1]).scores
    np.testing.assert_allclose([o.score for o in outs if o.status == SCORED], expected, rtol=1e-3)
