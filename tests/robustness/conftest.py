"""Fixtures of the robustness tests: the odd folder of issue 13 and a small fitted PaDiM."""

from pathlib import Path

import pytest

from odd_files import texture, write_odd_folder


@pytest.fixture(scope="session")
def odd_folder(tmp_path_factory) -> Path:
    return write_odd_folder(tmp_path_factory.mktemp("odd") / "parts")


@pytest.fixture(scope="session")
def small_padim(tmp_path_factory):
    """A fitted 64 px PaDiM (a few seconds) and its saved directory."""
    from gaikan.detectors.padim import PaDiM

    det = PaDiM(image_size=64, n_features=20)
    det.fit([texture(100 + k) for k in range(16)], validation_fraction=0.25)
    path = tmp_path_factory.mktemp("robust_model") / "padim"
    det.save(path)
    return det, path
