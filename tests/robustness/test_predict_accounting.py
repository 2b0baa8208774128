"""`gaikan predict` on the issue's odd folder: exit 0, one row per file found, the right reason on every
unreadable or skipped one; --recursive and the note without it; a file that fails scoring (not only
decoding) costs only its own row; GIF first frame and WebP decode to the right pixels."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from odd_files import EXPECTED, IN_SUB, gif_frames, texture
from gaikan.cli import app
from gaikan.data.images import read_image
from gaikan.data.inputs import PENDING, SCORED, SKIPPED, UNREADABLE, read_input, scan_inputs, score_files
from gaikan.errors import DataError, ImageReadError, SettingsError

runner = CliRunner()


def predict(*args):
    return runner.invoke(app, ["predict", *map(str, args)])


def rows_by_name(out: Path, root: Path) -> dict[str, dict]:
    rows = list(csv.DictReader(open(out / "results.csv")))
    return {os.path.relpath(r["path"], root): r for r in rows}


def check_rows(rows: dict[str, dict], expected: dict) -> None:
    assert set(rows) == set(expected), sorted(set(rows) ^ set(expected))
    for name, want in expected.items():
        row = rows[name]
        if want == "scored":
            assert row["verdict"] in ("OK", "NG"), (name, row)
            assert np.isfinite(float(row["score"])) and row["error"] == ""
        else:
            verdict, fragment = want
            assert row["verdict"] == verdict, (name, row)
            assert row["score"] == "" and fragment in row["error"], (name, row["error"])
            assert name.rsplit("/", 1)[-1] in row["error"]  # the reason names the file


def test_the_odd_folder_gives_exit_0_and_a_row_with_its_reason_for_every_file(small_padim, odd_folder, tmp_path):
    _, model = small_padim
    out = tmp_path / "results"
    result = predict("--model", model, odd_folder, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    rows = rows_by_name(out, odd_folder)
    check_rows(rows, EXPECTED)
    # figures for the scored ones only, and the sub-folder is mentioned in one line
    scored = [r for r in rows.values() if r["verdict"] in ("OK", "NG")]
    assert all((out / r["figure"]).is_file() for r in scored)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(Path(r["figure"]).name for r in scored)
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "sub/" in notes[0] and "--recursive" in notes[0]
    assert f"{len(EXPECTED)} files: 9 images scored" in result.output
    assert "4 unreadable, 2 skipped" in result.output
    ng = (out / "ng_list.txt").read_text().split()
    assert sorted(ng) == sorted(r["path"] for r in scored if r["verdict"] == "NG")


def test_recursive_reads_sub_folders_and_scores_match_the_flat_run(small_padim, odd_folder, tmp_path):
    det, model = small_padim
    out = tmp_path / "results"
    result = predict("--model", model, odd_folder, "--out", out, "--recursive", "--no-figures", "-q")
    assert result.exit_code == 0, result.output
    rows = rows_by_name(out, odd_folder)
    check_rows(rows, {**EXPECTED, **IN_SUB})
    assert "note:" not in result.output
    # a scored row is the library's score of that file
    direct = det.score([read_image(odd_folder / "sub" / "deeper" / "inner2.bmp")]).scores[0]
    assert float(rows["sub/deeper/inner2.bmp"]["score"]) == pytest.approx(float(direct), rel=1e-5)


def test_files_folders_missing_paths_and_duplicates(small_padim, odd_folder, tmp_path):
    _, model = small_padim
    out = tmp_path / "results"
    missing = tmp_path / "nope.png"
    result = predict("--model", model, odd_folder / "good1.png", missing, odd_folder / "notes.txt",
                     odd_folder / "good1.png", "--out", out, "--no-figures", "-q")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [Path(r["path"]).name for r in rows] == ["good1.png", "nope.png", "notes.txt"]
    assert rows[1]["verdict"] == UNREADABLE and "no such file or folder" in rows[1]["error"]
    # a file named explicitly is tried by content, whatever its suffix
    assert rows[2]["verdict"] == UNREADABLE and "not a recognised image" in rows[2]["error"]


def test_nothing_found_is_a_one_line_error_and_writes_nothing(small_padim, tmp_path):
    _, model = small_padim
    empty = tmp_path / "empty"
    (empty / "only_a_sub").mkdir(parents=True)
    result = predict("--model", model, empty, tmp_path / "missing", "--out", tmp_path / "r", "-q")
    assert result.exit_code == 2
    text = result.output.strip()
    assert text.startswith("error: no input files found") and len(text.splitlines()) == 1
    assert "missing does not exist" in text and "only_a_sub/" in text and "--recursive" in text
    assert not (tmp_path / "r").exists()


def test_a_fifo_is_never_opened(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    Image.fromarray(texture(0)).save(tmp_path / "a.png")
    scan = scan_inputs([tmp_path, tmp_path / "pipe.png"])
    by_name = {Path(r.path).name: r for r in scan.rows}
    assert by_name["a.png"].status == PENDING
    assert by_name["pipe.png"].status == SKIPPED and "FIFO" in by_name["pipe.png"].reason


def test_symlink_loops_and_broken_links_with_recursive(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.fromarray(texture(0)).save(root / "a" / "x.png")
    os.symlink(root, root / "a" / "loop")          # a loop back to the top
    os.symlink(tmp_path / "gone.png", root / "dangling.png")
    scan = scan_inputs([root], recursive=True)
    names = {os.path.relpath(r.path, root): r for r in scan.rows}
    assert set(names) == {"a/x.png", "dangling.png"}
    assert names["dangling.png"].status == SKIPPED and "broken symbolic link" in names["dangling.png"].reason


def test_read_input_names_the_file_for_too_small_and_too_large(tmp_path):
    Image.fromarray(np.zeros((7, 100), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(ImageReadError, match=r"thin\.png: it is 7x100 pixels"):
        read_input(tmp_path / "thin.png")
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ImageReadError, match=r"big\.png: image is 100x100 = 10000 pixels, more than the limit"):
        read_input(tmp_path / "big.png", max_pixels=9999)


def test_gif_first_frame_and_webp_decode_to_their_pixels(odd_folder):
    frames = gif_frames()
    gif = read_image(odd_folder / "anim.gif")
    # GIF quantises to a palette: the first frame, not another, within the quantisation error
    assert gif.shape == (64, 64)
    errors = [np.abs(gif.astype(int) - f).mean() for f in frames]
    assert errors[0] < 4 and min(errors[1:]) > 10, errors
    webp = read_image(odd_folder / "cell.webp")
    np.testing.assert_array_equal(webp, np.stack([texture(3), texture(4), texture(5)], axis=-1))  # lossless


def test_one_image_that_fails_scoring_costs_only_its_own_row(tmp_path):
    """score_fn refuses one image (as a detector refuses a bad array): the batch is retried one by
    one, the others keep their scores, the bad one is UNREADABLE with the scorer's message."""
    paths = []
    for k in range(5):
        Image.fromarray(texture(k)).save(tmp_path / f"p{k}.png")
        paths.append(tmp_path / f"p{k}.png")
    bad_mean = float(texture(2).mean())
    calls = []

    def score_fn(images):
        calls.append(len(images))
        for i, img in enumerate(images):
            if abs(float(img.mean()) - bad_mean) < 1e-9:
                raise SettingsError(f"image {i} is not to my liking")
        return np.array([float(img.mean()) for img in images]), None

    scan = scan_inputs(paths)
    outs = list(score_files(scan.rows, score_fn, batch_size=16))
    assert [Path(o.path).name for o in outs] == [p.name for p in paths]
    assert [o.status for o in outs] == [SCORED, SCORED, UNREADABLE, SCORED, SCORED]
    assert "p2.png" in outs[2].reason and "not to my liking" in outs[2].reason
    assert [o.score for o in outs if o.status == SCORED] == pytest.approx(
        [float(texture(k).mean()) for k in (0, 1, 3, 4)])
    assert calls == [5, 1, 1, 1, 1, 1]


def test_a_nan_score_is_not_an_ok(tmp_path):
    Image.fromarray(texture(0)).save(tmp_path / "a.png")
    outs = list(score_files(scan_inputs([tmp_path]).rows, lambda imgs: (np.full(len(imgs), np.nan), None)))
    assert outs[0].status == UNREADABLE and "non-finite score" in outs[0].reason


def test_scan_refuses_an_empty_batch():
    with pytest.raises(DataError, match="no input"):
        scan_inputs([])
