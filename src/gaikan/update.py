"""``gaikan update``: add good images to a fitted PaDiM or PatchCore model without its old images.

    new = update_model(MODEL_DIR, images, paths, OUT_DIR)       # writes a new model version

What changes:
* PaDiM keeps its streamed sums n, S1, S2 (gaikan.detectors.padim, ``updatable=True``): the new
  images' sums are added (``combine_sums``) and the Gaussians rebuilt. The result is the model a fit
  on the old training images plus the new ones gives (same sums in float64, tested).
* PatchCore extends its memory bank: ``coreset_fraction`` of the new images' patches, chosen by greedy
  k-center continued from the existing bank (``extend_coreset``); the old bank is kept as it is.
* The thresholds are recalibrated: the held-out calibration images, which an updatable model keeps,
  are scored again with the updated model and every threshold (max-good, quantile, conformal) is
  computed anew from those scores, with the quantile and false-alarm rate of the original fit.

Calibration and "the same model as a fit on the union". A fit holds out a seeded share of its good
images to calibrate. Refitting on old + new images would draw a new held-out share from the union,
so old training images would become calibration images and the other way round: no update can equal
that without the old images. We define the union fit as the fit whose training set is the old
training set plus the new images and whose calibration set is the old calibration set (plus, with
``holdout > 0``, a seeded share of the new images, which then go to calibration instead of training).
That is what update computes, exactly for PaDiM. By default (``holdout=0``) every new image goes to
training: reviewed false alarms are precisely the good parts the model must learn, and holding some
of them out would keep them looking anomalous; the old held-out goods keep the threshold honest.

The new model is written to a new directory (never over the old one) with ``fit.model_version`` one
higher and ``fit.update`` saying from which model id, with how many images, from where.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from gaikan.errors import GaikanError, SettingsError


@dataclass
class UpdateResult:
    detector: object
    out: Path
    n_added_train: int
    n_added_calibration: int
    threshold_before: float
    threshold_after: float
    bank_before: int | None = None
    bank_after: int | None = None


def _shape_text(shape) -> str:
    shape = tuple(shape)
    kind = "gray" if len(shape) == 2 or shape[2] == 1 else f"{shape[2]}-channel"
    return f"{shape[1]}x{shape[0]} {kind} {shape}"


def check_new_images(detector, images: Sequence[np.ndarray], paths: Sequence[str]) -> None:
    """Refuse images of another size or channel count than the model was fitted on, naming them."""
    expected = (getattr(detector, "fit_info_", {}) or {}).get("image_shape")
    if expected is None and getattr(detector, "calibration_images_", None):
        shapes = {tuple(im.shape) for im in detector.calibration_images_}
        expected = list(shapes.pop()) if len(shapes) == 1 else None
    if expected is None:
        return
    wrong = [(p, im.shape) for p, im in zip(paths, images) if tuple(im.shape) != tuple(expected)]
    if wrong:
        listed = "; ".join(f"{p} is {_shape_text(s)}" for p, s in wrong[:5])
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise SettingsError(f"{len(wrong)} of the {len(images)} new images do not match the model, which was "
                            f"fitted on {_shape_text(expected)} images: {listed}{more}; nothing was written")


def read_images(paths: Sequence[Path]) -> list[np.ndarray]:
    """Read every file; refuse (listing each unreadable file) rather than update from a subset."""
    from gaikan.data.images import read_image
    from gaikan.errors import ImageReadError

    images, errors = [], []
    for path in paths:
        try:
            images.append(read_image(path))
        except ImageReadError as exc:
            errors.append(str(exc))
    if errors:
        raise GaikanError(f"{len(errors)} of {len(paths)} new images cannot be read, nothing was written: "
                          + "; ".join(errors[:5]) + (" ..." if len(errors) > 5 else ""))
    return images


def reviewed_false_alarms(store, model_id: str | None, *, page: int = 500) -> list:
    """The store query behind ``--from-log``: the logged NG inspections (of ``model_id``; None = every
    model) whose current review says "false alarm", oldest first.

    Uses the log's review API (``store.current_reviews(ids) -> {id: Review}``, a Review with ``label``
    "false_alarm" or "defect": the reviews table of the service's review loop) over the NG rows from
    ``store.query(verdict="NG")``, page by page.
    """
    current = getattr(store, "current_reviews", None)
    if current is None:
        raise GaikanError("this inspection log has no operator reviews (its service predates the review loop): "
                          "use --good PATH")
    found, offset = [], 0
    while True:
        rows, total = store.query(verdict="NG", limit=page, offset=offset)
        if not rows:
            break
        reviews = current([r.id for r in rows])
        found += [r for r in rows if (model_id is None or r.model_id == model_id)
                  and getattr(reviews.get(r.id), "label", None) == "false_alarm"]
        offset += len(rows)
        if offset >= total:
            break
    return sorted(found, key=lambda r: r.id)


def false_alarm_images_from_log(data_dir: Path, model_id: str | None) -> list[Path]:
    """The stored images (``store.blob_path(sha256, ext)``) of ``reviewed_false_alarms`` in the log of
    a ``gaikan serve`` data directory."""
    from gaikan.service.store import DB_NAME, InspectionStore

    data_dir = Path(data_dir)
    if not (data_dir / DB_NAME).is_file():
        raise GaikanError(f"{data_dir} is not a gaikan serve data directory: {DB_NAME} is missing")
    store = InspectionStore(data_dir)
    try:
        paths = [store.blob_path(r.image_sha256, r.image_ext) for r in reviewed_false_alarms(store, model_id)]
    finally:
        store.close()
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise GaikanError(f"{len(missing)} reviewed images are missing from {data_dir}: {', '.join(missing[:3])}")
    if not paths:
        raise GaikanError(f"no inspections of model {model_id} reviewed as false alarm in the log in {data_dir}")
    return paths


def update_model(model_dir: Path, images: Sequence[np.ndarray], paths: Sequence[str], out: Path, *,
                 holdout: float = 0.0, seed: int = 0, source: str = "", force: bool = False) -> UpdateResult:
    """Add ``images`` (good parts) to the model at ``model_dir``; write the new version to ``out``."""
    from gaikan.detectors.base import load_detector
    from gaikan.io.model_io import TENSORS, model_id, prepare_output_dir

    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise GaikanError(f"--out {out} is the model directory {model_dir} (or inside it): an update writes a new "
                          "model version next to the old one, never over it")
    prepare_output_dir(out, overwrite=force, what="model directory")
    detector = load_detector(model_dir)
    if not callable(getattr(detector, "add_images", None)):
        raise SettingsError(f"{detector.name} models cannot be updated; gaikan update takes padim and patchcore models")
    if not getattr(detector, "updatable", False) or not getattr(detector, "calibration_images_", None):
        raise SettingsError(f"the {detector.name} model at {model_dir} was saved without its held-out calibration "
                            "images (updatable=false, validation_fraction=0 or an older gaikan): refit it with "
                            "updatable=true to update it")
    if not 0.0 <= holdout < 1.0:
        raise SettingsError(f"holdout must be in [0, 1), got {holdout}")
    images = list(images)
    if not images:
        raise SettingsError("no new images were given")
    check_new_images(detector, images, paths)
    if detector.name == "padim":
        with np.load(model_dir / TENSORS, allow_pickle=False) as npz:
            detector.sums_ = detector.load_sums({k: npz[k] for k in npz.files if k.startswith("sums_")})
    n_val = int(round(holdout * len(images)))
    order = np.random.default_rng(seed).permutation(len(images))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(train_idx) == 0:
        raise SettingsError(f"holdout {holdout} leaves none of the {len(images)} new images for training")
    info = dict(detector.fit_info_)
    old_id = model_id(detector.manifest_)
    threshold_before = float(detector.threshold)
    bank_before = int(detector.bank_.shape[0]) if hasattr(detector, "bank_") else None
    start = time.perf_counter()
    detector.add_images([images[i] for i in train_idx])
    calibration = list(detector.calibration_images_) + [images[i] for i in val_idx]
    if info.get("false_alarm_rate") is None and "conformal" in detector.thresholds.values:
        raise SettingsError("the model has a conformal threshold but no recorded false-alarm rate (an older "
                            "gaikan): refit it")
    method = detector.thresholds.default_method
    detector.calibrate(detector.score(calibration).scores, threshold_method=method,
                       quantile=float(info.get("quantile", 0.995)), false_alarm_rate=info.get("false_alarm_rate"))
    detector.calibration_images_ = calibration
    info.update({
        "n_train": int(info.get("n_train", 0)) + int(len(train_idx)),
        "n_train_good": int(info.get("n_train_good", 0)) + int(len(train_idx)),
        "n_calibration": len(calibration),
        "model_version": int(info.get("model_version", 1)) + 1,
        "update": {"from_model": old_id, "from_version": int(info.get("model_version", 1)),
                   "source": source, "n_images": len(images), "added_to_training": int(len(train_idx)),
                   "added_to_calibration": int(len(val_idx)), "holdout": float(holdout),
                   "seconds": round(time.perf_counter() - start, 2),
                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    })
    detector.fit_info_ = info
    detector.save(out, overwrite=force)
    return UpdateResult(detector, out, int(len(train_idx)), int(len(val_idx)), threshold_before,
                        float(detector.threshold), bank_before,
                        int(detector.bank_.shape[0]) if hasattr(detector, "bank_") else None)
