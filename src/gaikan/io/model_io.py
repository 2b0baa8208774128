"""Saved models: a directory with ``tensors.npz`` (numpy arrays only, loaded with
``allow_pickle=False``) and ``manifest.json`` (detector name, settings, versions, input size,
thresholds, fit info and the SHA-256 of the tensor file). Nothing is ever unpickled.

Loading checks, in order: the directory and manifest exist and parse, the format name and version
are ones this gaikan reads, the tensor file's checksum matches, the detector is known and its
settings are valid. Each failure is a ``ModelFormatError`` with a message that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

import gaikan
from gaikan.errors import GaikanError, ModelFormatError

FORMAT_NAME = "gaikan-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.npz"
_BASE_PREFIX = "base__"  # arrays owned by the Detector base class rather than by the method
CALIBRATION_IMAGE = "calibration_image_"  # + 5 digits: the held-out images of updatable detectors


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_output_dir(path: Path, *, overwrite: bool, what: str = "output directory") -> None:
    """Refuse to write into an existing non-empty directory unless ``overwrite`` (the CLI's --force)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GaikanError(f"{what} {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise GaikanError(f"{what} {path} already exists and is not empty; use --force to replace it")


def save_detector(detector, path, *, overwrite: bool = False) -> Path:
    """Write a fitted detector to the directory ``path`` atomically (``gaikan.io.atomic.atomic_dir``:
    a temporary sibling, then a rename), so a failed save (a full disk) leaves the previous model at
    ``path`` intact and raises a GaikanError that says so."""
    from gaikan.io.atomic import atomic_dir

    detector._check_fitted()
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in detector._state().items()}
    if getattr(detector, "calibration_scores_", None) is not None:
        arrays[_BASE_PREFIX + "calibration_scores"] = np.asarray(detector.calibration_scores_, dtype=np.float32)
    for i, image in enumerate(getattr(detector, "calibration_images_", None) or []):  # updatable detectors
        arrays[f"{_BASE_PREFIX}{CALIBRATION_IMAGE}{i:05d}"] = np.asarray(image)
    for key, value in arrays.items():
        if value.dtype == object:
            raise GaikanError(f"internal error: state {key!r} is not a plain numeric array")
    with atomic_dir(path, overwrite=overwrite, what="model directory") as tmp:
        np.savez(tmp / TENSORS, **arrays)
        thresholds = detector.thresholds
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "detector": detector.name,
            "settings": _jsonable(detector.settings()),
            "input_size": list(detector.input_size),
            "thresholds": {"default": thresholds.default_method,
                           "values": {k: float(v) for k, v in thresholds.values.items()}},
            "fit": getattr(detector, "fit_info_", {}),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tensors": {"file": TENSORS, "sha256": sha256_file(tmp / TENSORS),
                        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}},
        }
        with open(tmp / MANIFEST, "w") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / TENSORS, "rb+") as f:
            os.fsync(f.fileno())
    return path


def read_manifest(path) -> dict:
    """The manifest of a saved model, after checking the format name and version."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"no model at {path}: the path does not exist")
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelFormatError(f"no model at {path}: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{manifest_path} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{manifest_path} is not a gaikan model manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        saved_by = manifest.get("versions", {}).get("gaikan", "an unknown version")
        raise ModelFormatError(
            f"the model at {path} has format version {version} (saved by gaikan {saved_by}); "
            f"this gaikan {gaikan.__version__} reads format version {FORMAT_VERSION}: refit the model"
        )
    return manifest


def load_detector(path):
    """Load a saved detector; refuses modified, truncated or incompatible files with a message."""
    from gaikan.detectors.base import Thresholds, get_detector_class

    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    manifest = read_manifest(path)
    try:
        tensor_info = manifest["tensors"]
        tensor_path = path / tensor_info["file"]
        expected = tensor_info["sha256"]
        name, settings = manifest["detector"], manifest["settings"]
        thresholds = manifest["thresholds"]
    except (KeyError, TypeError) as exc:
        raise ModelFormatError(f"{path / MANIFEST} lacks the field {exc}") from None
    if Path(tensor_info["file"]).name != tensor_info["file"]:
        raise ModelFormatError(f"{path / MANIFEST} names a tensor file outside the model directory")
    if not tensor_path.is_file():
        raise ModelFormatError(f"the model at {path} is incomplete: {tensor_path.name} is missing")
    found = sha256_file(tensor_path)
    if found != expected:
        raise ModelFormatError(
            f"{tensor_path} has been modified or is corrupt: its SHA-256 is {found[:12]}…, "
            f"the manifest expects {expected[:12]}…"
        )
    try:
        with np.load(tensor_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a format error for the user
        raise ModelFormatError(f"cannot read {tensor_path}: {exc}") from None
    try:
        cls = get_detector_class(name)
    except GaikanError as exc:
        raise ModelFormatError(f"the model at {path} was made by {exc}") from None
    unknown = set(settings) - set(cls.setting_names())
    if unknown:
        raise ModelFormatError(f"the model at {path} has settings this {name} does not know: {sorted(unknown)}")
    detector = cls(**settings)
    base = {k[len(_BASE_PREFIX):]: v for k, v in arrays.items() if k.startswith(_BASE_PREFIX)}
    detector._load_state({k: v for k, v in arrays.items() if not k.startswith(_BASE_PREFIX)})
    detector.calibration_scores_ = base.get("calibration_scores")
    detector.calibration_images_ = [base[k] for k in sorted(base) if k.startswith(CALIBRATION_IMAGE)] or None
    detector.thresholds_ = Thresholds(default_method=thresholds["default"],
                                      values={k: float(v) for k, v in thresholds["values"].items()})
    detector.fit_info_ = manifest.get("fit", {})
    detector.manifest_ = manifest
    detector.fitted_ = True
    return detector


def model_id(manifest: dict) -> str:
    """A short stable id for a saved model: detector name + the first 12 hex of its tensor checksum."""
    return f"{manifest['detector']}-{manifest['tensors']['sha256'][:12]}"


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _versions() -> dict[str, str]:
    import torch

    return {"gaikan": gaikan.__version__, "torch": torch.__version__, "numpy": np.__version__}
