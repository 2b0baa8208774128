import torch
from typer.testing import CliRunner

from gaikan.cli import app


def test_global_threads_option_sets_torch_threads_and_refuses_negatives():
    before = torch.get_num_threads()
    try:
        runner = CliRunner()
        result = runner.invoke(app, ["--threads", "1", "detectors"])
        assert result.exit_code == 0, result.output
        assert "patchcore" in result.output
        assert torch.get_num_threads() == 1
        bad = runner.invoke(app, ["--threads", "-2", "detectors"])
        assert bad.exit_code == 2 and "--threads must be >= 0" in bad.output
    finally:
        torch.set_num_threads(before)
