"""bench/surfaces_data.py: the surfaces benchmark builder (issue 8).

A tiny build from a source photograph written here (a random texture) checks the MVTec layout as
gaikan's ``mvtec:`` loader reads it, the masks, the disjoint train/test bands, reproducibility and
the refusals; the pinned Debian sources are checked where they are installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("defect_synthesis")

from gaikan.data import load_data

BENCH = Path(__file__).resolve().parents[2] / "bench"
# loaded from its file (bench/ is not a package), registered so that its dataclasses resolve
_spec = importlib.util.spec_from_file_location("surfaces_data", BENCH / "surfaces_data.py")
sd = sys.modules.setdefault("surfaces_data", importlib.util.module_from_spec(_spec))
if not hasattr(sd, "build_surfaces"):
    _spec.loader.exec_module(sd)


def _texture(rng: np.random.Generator, h: int = 400, w: int = 300) -> np.ndarray:
    """A stand-in photograph: smoothed colour noise (uint8 RGB)."""
    from scipy.ndimage import gaussian_filter

    x = gaussian_filter(rng.normal(size=(h, w, 3)), sigma=(2.0, 2.0, 0)) * 60 + 128
    return np.clip(x, 0, 255).astype(np.uint8)


@pytest.fixture()
def small(monkeypatch):
    monkeypatch.setattr(sd, "N_TRAIN", 6)
    monkeypatch.setattr(sd, "N_TEST_GOOD", 3)
    monkeypatch.setattr(sd, "N_PER_DEFECT", 1)


def _category(tmp_path: Path, name: str = "fake") -> sd.Category:
    path = tmp_path / f"{name}.png"
    Image.fromarray(_texture(np.random.default_rng(1))).save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return sd.Category(name, "fake-package", str(path), None, digest, "hv", "test texture")


@pytest.mark.parametrize("kind,fn", sd.DEFECTS, ids=[k.folder for k, _ in sd.DEFECTS])
def test_each_defect_has_a_mask_and_changes_the_image_there(kind, fn):
    clean = _texture(np.random.default_rng(2), 128, 128)
    out, mask, params = sd._apply_defect(fn, clean, np.random.default_rng(3))
    assert out.shape == clean.shape and out.dtype == np.uint8
    assert mask.shape == clean.shape[:2] and mask.sum() >= sd.MIN_MASK_PIXELS
    diff = np.abs(out.astype(int) - clean.astype(int)).sum(axis=-1)
    assert diff[mask].mean() > 3 * diff[~mask].mean()
    if kind.generator == "gaikan.data.synthetic":
        assert (diff[~mask] == 0).all()  # gaikan's defects leave everything outside the mask alone
    again, mask2, _ = sd._apply_defect(fn, clean, np.random.default_rng(3))
    assert np.array_equal(again, out) and np.array_equal(mask2, mask)


def test_lowcontrast_moves_only_beta_of_the_way():
    clean = np.full((8, 8, 3), 100, np.uint8)
    full = np.full((8, 8, 3), 200, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    out = sd._faint(clean, full, mask, 0.3)
    assert (out[mask] == 130).all() and (out[~mask] == 100).all()


def test_defect_synthesis_leaves_the_global_random_states_alone():
    import random

    clean = _texture(np.random.default_rng(4), 128, 128)
    random.seed(11)
    np.random.seed(11)
    expected = (random.random(), np.random.random())
    random.seed(11)
    np.random.seed(11)
    sd._ds_pits(clean, np.random.default_rng(5))
    assert (random.random(), np.random.random()) == expected


def test_build_loads_as_mvtec_with_disjoint_bands_and_is_reproducible(tmp_path, small):
    cat = _category(tmp_path)
    specs = sd.build_surfaces(tmp_path / "a", seed=7, categories=(cat,))
    assert specs == [f"mvtec:{tmp_path / 'a' / 'fake'}"]
    split = load_data(specs[0])
    assert len(split.train) == 6 and (split.train.labels == 0).all()
    folders = [k.folder for k, _ in sd.DEFECTS]
    assert sorted(set(split.test.defect_types)) == sorted(folders + ["good"])
    assert int((split.test.labels == 0).sum()) == 3 and int((split.test.labels == 1).sum()) == len(folders)
    for img, label, mask in zip(split.test.images, split.test.labels, split.test.masks):
        assert img.shape == (sd.SIZE, sd.SIZE, 3)
        assert (mask.sum() >= sd.MIN_MASK_PIXELS) if label == 1 else not mask.any()

    manifest = json.loads((tmp_path / "a" / sd.MANIFEST).read_text())
    entry = manifest["categories"][0]
    top = entry["train_rows"][1]
    for rec in entry["images"]:
        crop = rec["crop"]
        if rec["file"].startswith("train/"):
            assert crop["y"] + crop["side"] <= top  # no training crop reaches into the test band
        else:
            assert crop["y"] >= top
            if rec["file"].startswith("test/") and "/good/" not in rec["file"]:
                assert rec["kind"] and rec["size"] and rec["generator"] and rec["mask_area"] > 0

    sd.build_surfaces(tmp_path / "b", seed=7, categories=(cat,))
    again = json.loads((tmp_path / "b" / sd.MANIFEST).read_text())["categories"][0]
    assert again["tree_sha256"] == entry["tree_sha256"]  # same seed -> byte-identical PNGs


def test_reuse_refusal_and_force(tmp_path, small):
    cat = _category(tmp_path)
    root = tmp_path / "out"
    sd.build_surfaces(root, seed=0, categories=(cat,))
    first = (root / "fake" / "train" / "good" / "000.png").stat().st_mtime_ns
    sd.build_surfaces(root, seed=0, categories=(cat,))  # same recipe: reused, not rewritten
    assert (root / "fake" / "train" / "good" / "000.png").stat().st_mtime_ns == first
    with pytest.raises(sd.SurfaceDataError, match="another recipe"):
        sd.build_surfaces(root, seed=1, categories=(cat,))
    sd.build_surfaces(root, seed=1, categories=(cat,), force=True)
    assert json.loads((root / sd.MANIFEST).read_text())["recipe"]["seed"] == 1

    foreign = tmp_path / "someone_elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(sd.SurfaceDataError, match="not empty"):
        sd.build_surfaces(foreign, categories=(cat,))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_missing_or_changed_source_is_refused_with_the_package_named(tmp_path):
    cat = _category(tmp_path)
    missing = sd.Category("gone", "some-debian-package", str(tmp_path / "nope.png"), None, "0" * 16, "", "")
    with pytest.raises(sd.SurfaceDataError, match="some-debian-package"):
        sd.load_source(missing)
    changed = sd.Category(cat.name, cat.package, cat.file, None, "0" * 16, "", "")
    with pytest.raises(sd.SurfaceDataError, match="SHA-256"):
        sd.load_source(changed)


@pytest.mark.skipif(not all(Path(c.file).is_file() for c in sd.CATEGORIES),
                    reason="Debian texture packages not installed (make bench-deps)")
def test_pinned_debian_sources_are_the_recorded_files():
    for cat in sd.CATEGORIES:
        src = sd.load_source(cat)  # checks the SHA-256 pin
        assert src.ndim == 3 and src.shape[2] == 3 and min(src.shape[:2]) >= 512, cat.name

