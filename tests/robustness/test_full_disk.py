"""A full disk (a real 4 MiB tmpfs, filled with a ballast file) while saving a model or writing
predict's results: a one-line error that names the path and ENOSPC, the previous model / results
intact (byte for byte, and the model still loads and scores the same), no temporary files left."""

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from gaikan.cli import app
from gaikan.detectors.base import load_detector
from gaikan.detectors.padim import PaDiM
from gaikan.errors import GaikanError
from odd_files import texture
from small_fs import fill, small_tmpfs

runner = CliRunner()


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_save_on_a_full_disk_keeps_the_previous_model(small_padim, tmp_path):
    old, _ = small_padim
    new = PaDiM(image_size=64, n_features=20).fit([texture(300 + k) for k in range(16)], validation_fraction=0.25)
    probe = [texture(7), texture(8)]
    with small_tmpfs(tmp_path / "mnt", 4096) as mnt:
        old.save(mnt / "model")
        before = snapshot(mnt / "model")
        ballast = fill(mnt, leave=64 * 1024)  # room for a little, not for a whole model
        with pytest.raises(GaikanError) as info:
            new.save(mnt / "model", overwrite=True)
        message = str(info.value)
        assert "\n" not in message and str(mnt / "model") in message
        assert "no space left on the device (ENOSPC)" in message and "previous content is unchanged" in message
        assert snapshot(mnt / "model") == before
        np.testing.assert_array_equal(load_detector(mnt / "model").score(probe).scores, old.score(probe).scores)
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast.bin", "model"]  # no temporary left
        # with room again the same call succeeds and replaces it
        ballast.unlink()
        new.save(mnt / "model", overwrite=True)
        np.testing.assert_array_equal(load_detector(mnt / "model").score(probe).scores, new.score(probe).scores)


def test_predict_on_a_full_disk_fails_cleanly_and_keeps_the_previous_results(small_padim, odd_folder, tmp_path):
    _, model = small_padim
    with small_tmpfs(tmp_path / "mnt", 4096) as mnt:
        out = mnt / "results"
        first = runner.invoke(app, ["predict", "--model", str(model), str(odd_folder), "--out", str(out), "-q"])
        assert first.exit_code == 0, first.output
        before = snapshot(out)
        assert len(list(csv.DictReader(open(out / "results.csv")))) > 5
        fill(mnt, leave=32 * 1024)
        again = runner.invoke(app, ["predict", "--model", str(model), str(odd_folder), "--out", str(out), "--force",
                                    "-q"])
        assert again.exit_code == 2
        text = again.output.strip()
        assert text.startswith("error: cannot write the results directory") and len(text.splitlines()) == 1
        assert "ENOSPC" in text and "previous content is unchanged" in text
        assert snapshot(out) == before
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast.bin", "results"]


def test_an_onnx_export_on_a_full_disk_keeps_the_previous_file(small_padim, tmp_path):
    from gaikan.export.onnx_export import export_onnx

    old, _ = small_padim
    new = PaDiM(image_size=64, n_features=20).fit([texture(300 + k) for k in range(16)], validation_fraction=0.25)
    with small_tmpfs(tmp_path / "mnt", 4096) as mnt:
        path = export_onnx(old, mnt / "m.onnx")
        before = path.read_bytes()
        fill(mnt, leave=16 * 1024)
        with pytest.raises(GaikanError) as info:
            export_onnx(new, path, force=True)
        message = str(info.value)
        assert message.startswith(f"cannot write the ONNX model {path}") and "ENOSPC" in message
        assert "previous file is unchanged" in message and "\n" not in message
        assert path.read_bytes() == before
        assert sorted(p.name for p in mnt.iterdir()) == ["ballast.bin", "m.onnx"]  # no temporary left
