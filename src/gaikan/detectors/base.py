"""The one detector interface every method answers (scikit-learn style).

    det = SomeDetector(**settings)       # stores settings only
    det.fit(images, labels=None)          # returns self
    result = det.score(images)            # ScoreResult(scores (N,), maps (N, H, W) or None)
    det.save(path); det2 = load_detector(path)

Settings live in ``__init__`` keyword arguments and are listed in ``settings()``; learned state lives
in attributes ending in ``_`` and is exported by ``_state()`` as a flat dict of numpy arrays, which
``gaikan.io.model_io`` writes without pickle. Scores point one way: higher = more likely defective.
The verdict rule everywhere is ``NG if score > threshold``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from gaikan.data.images import image_problem
from gaikan.errors import NotFittedError, SettingsError

_REGISTRY: dict[str, type["Detector"]] = {}


def register(name: str):
    """Class decorator: make a detector available by name to the CLI, the loader and benchmarks."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def detector_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_detector_class(name: str) -> type["Detector"]:
    _import_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SettingsError(
            f"unknown detector {name!r}; known detectors: {', '.join(sorted(_REGISTRY))}"
        ) from None


def _import_all() -> None:
    # Importing the package imports every detector module, which registers it.
    import gaikan.detectors  # noqa: F401


@dataclass
class ScoreResult:
    """What ``Detector.score`` returns.

    scores: (N,) float32, higher = more likely defective.
    maps:   (N, H, W) float32 anomaly maps at the detector's working size, or None for detectors
            that give no localisation.
    """

    scores: np.ndarray
    maps: np.ndarray | None = None


@dataclass
class Thresholds:
    """The model's decision threshold and how it was chosen; ``values`` holds every method's value."""

    default_method: str = "max-good"
    values: dict[str, float] = field(default_factory=dict)

    @property
    def value(self) -> float:
        if self.default_method not in self.values:
            raise NotFittedError(f"no {self.default_method!r} threshold was computed for this model")
        return float(self.values[self.default_method])


class Detector:
    """Base class. Subclasses implement ``_fit``, ``_score``, ``_state`` and ``_load_state``."""

    name: ClassVar[str] = "detector"
    #: True for detectors that learn from defective examples too (labels required at fit time).
    supervised: ClassVar[bool] = False

    # ---- settings -------------------------------------------------------------------------
    @classmethod
    def setting_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.setting_names()}

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Detector":
        """Build from CLI ``--option k=v`` strings, converting each to the type of its default."""
        sig = inspect.signature(cls.__init__)
        kwargs: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in sig.parameters or key == "self":
                raise SettingsError(
                    f"{cls.name} has no setting {key!r}; its settings are: {', '.join(cls.setting_names())}"
                )
            kwargs[key] = _convert(raw, sig.parameters[key].default, key)
        return cls(**kwargs)

    # ---- the interface --------------------------------------------------------------------
    def fit(self, images: Sequence[np.ndarray], labels: Sequence[int] | None = None, *,
            validation_fraction: float = 0.1, threshold_method: str = "max-good",
            quantile: float = 0.995, false_alarm_rate: float | None = None, engine=None,
            calibrate: bool = True) -> "Detector":
        """Learn from ``images`` (good parts; supervised detectors also take labels, 1 = NG).

        A seeded ``validation_fraction`` of the good images is held out of training; their scores
        calibrate the thresholds (``max-good``, ``quantile``, and ``conformal`` when
        ``false_alarm_rate`` is given) and are stored with the model. ``threshold_method`` picks the
        model's default. With ``validation_fraction=0`` the thresholds come from the training scores
        themselves (optimistic; recorded as such in ``fit_info_``).

        ``engine``: where the training work runs (gaikan.engine; None = in this process). Only
        detectors with ``distributed_fit`` (PaDiM, PatchCore) take another one.
        """
        images = check_images(images)
        if labels is None:
            if self.supervised:
                raise SettingsError(f"{self.name} learns from labelled OK/NG images: labels are required")
            labels = np.zeros(len(images), dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images):
            raise SettingsError(f"{len(images)} images but {len(labels)} labels")
        if not 0.0 <= validation_fraction < 1.0:
            raise SettingsError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        good = np.flatnonzero(labels == 0)
        if len(good) == 0:
            raise SettingsError("no good (label 0) images to learn from")
        n_val = int(round(validation_fraction * len(good)))
        if validation_fraction > 0 and n_val < 1:
            n_val = 1
        if len(good) - n_val < 2:
            raise SettingsError(f"{len(good)} good images are too few to hold out {n_val} for calibration; "
                                "give more good images or validation_fraction=0")
        if false_alarm_rate is not None:
            _check_conformal_calibration_size(false_alarm_rate, len(good), n_val, validation_fraction)
        rng = np.random.default_rng(getattr(self, "seed", 0))
        val_idx = np.sort(rng.permutation(good)[:n_val])
        # only supervised detectors learn from defective images; uncertain (-1) rows are never used
        usable = labels >= 0 if self.supervised else labels == 0
        train_idx = np.setdiff1d(np.flatnonzero(usable), val_idx)
        train_labels = labels[train_idx]
        if engine is not None and getattr(engine, "in_process", False):
            engine = None  # the local engine: this process, the plain path
        if engine is not None and not getattr(self, "distributed_fit", False):
            raise SettingsError(f"{self.name} is fitted in one process only; the {engine.name} engine fits "
                                f"{', '.join(n for n, c in sorted(_REGISTRY.items()) if getattr(c, 'distributed_fit', False))}")
        self._engine = engine
        try:
            self._fit([images[i] for i in train_idx], train_labels if self.supervised else None)
        finally:
            self._engine = None
        self.fitted_ = True
        calibration = [images[i] for i in val_idx] if n_val else [images[i] for i in train_idx if labels[i] == 0]
        # detectors that can be updated keep their held-out images to recalibrate after an update
        self.calibration_images_ = calibration if (n_val and getattr(self, "updatable", False)) else None
        if calibrate:  # calibrate=False: no thresholds (e.g. a candidate of --detector auto, never saved)
            self.calibrate(self._score(calibration).scores, threshold_method=threshold_method, quantile=quantile,
                           false_alarm_rate=false_alarm_rate)
        self.fit_info_ = {
            "n_train": int(len(train_idx)),
            "n_train_good": int((train_labels == 0).sum()),
            "n_train_defective": int((train_labels == 1).sum()),
            "n_calibration": int(len(calibration)),
            "calibrated_on": "held-out good images" if n_val else "training images (optimistic)",
            "validation_fraction": float(validation_fraction),
            "image_shape": _common_shape(images),
            "quantile": float(quantile),
            "false_alarm_rate": None if false_alarm_rate is None else float(false_alarm_rate),
        }
        return self

    def calibrate(self, good_scores: np.ndarray, *, threshold_method: str = "max-good", quantile: float = 0.995,
                  false_alarm_rate: float | None = None) -> None:
        """Set the thresholds from scores of good images that the detector did not learn from."""
        from gaikan.evaluation.thresholds import compute_thresholds

        self.calibration_scores_ = np.sort(np.asarray(good_scores, dtype=np.float32))
        values = compute_thresholds(self.calibration_scores_, quantile_q=quantile, conformal_alpha=false_alarm_rate)
        if threshold_method not in values:
            raise SettingsError(f"threshold method {threshold_method!r} is not available at fit time; "
                                f"choose one of {', '.join(values)}")
        self.thresholds_ = Thresholds(default_method=threshold_method, values=values)

    def p_values(self, scores) -> np.ndarray | None:
        """Conformal p-values ``(1 + #{s_i >= s}) / (n + 1)`` of ``scores`` against the stored
        calibration scores (None when the model has none). Small = unusual for a good part."""
        from gaikan.evaluation.thresholds import conformal_p_value

        cal = getattr(self, "calibration_scores_", None)
        if cal is None or len(cal) == 0:
            return None
        return np.atleast_1d(conformal_p_value(cal, np.asarray(scores, dtype=np.float64)))

    def score(self, images: Sequence[np.ndarray]) -> ScoreResult:
        self._check_fitted()
        images = check_images(images)
        result = self._score(images)
        result.scores = np.asarray(result.scores, dtype=np.float32)
        return result

    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"{self.name} is not fitted: call fit() or load a saved model first")

    # thresholds ----------------------------------------------------------------------------
    @property
    def thresholds(self) -> Thresholds:
        if not hasattr(self, "thresholds_"):
            self.thresholds_ = Thresholds()
        return self.thresholds_

    @property
    def threshold(self) -> float:
        return self.thresholds.value

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path, *, overwrite: bool = False) -> None:
        from gaikan.io.model_io import save_detector

        save_detector(self, path, overwrite=overwrite)

    # subclass hooks
    def _fit(self, images: list[np.ndarray], labels: np.ndarray | None) -> None:  # pragma: no cover
        raise NotImplementedError

    def _score(self, images: list[np.ndarray]) -> ScoreResult:  # pragma: no cover
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:  # pragma: no cover
        """Learned state as a flat dict name -> numpy array (no objects, no pickle)."""
        raise NotImplementedError

    def _load_state(self, state: dict[str, np.ndarray]) -> None:  # pragma: no cover
        raise NotImplementedError

    #: working size (height, width) the detector resizes its inputs to; subclasses set it
    @property
    def input_size(self) -> tuple[int, int]:
        size = getattr(self, "image_size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)


def load_detector(path) -> Detector:
    from gaikan.io.model_io import load_detector as _load

    return _load(path)


def _check_conformal_calibration_size(alpha: float, n_good: int, n_val: int, validation_fraction: float) -> None:
    """Refuse, before any training, a false-alarm rate the held-out calibration set cannot support,
    saying how many good images (at this validation fraction) are needed."""
    import math

    if not 0.0 < alpha < 1.0:
        raise SettingsError(f"the false-alarm rate must be in (0, 1), got {alpha}")
    needed = math.ceil(1.0 / alpha - 1.0 - 1e-9)  # n with ceil((n + 1)(1 - alpha)) <= n
    n_cal = n_val if n_val else n_good
    if n_cal >= needed:
        return
    if validation_fraction > 0:
        total = needed
        def held_out(n: int) -> int:
            return int(round(validation_fraction * n))

        while held_out(total) < needed or total - held_out(total) < 2:
            total += 1
        how = (f"at validation fraction {validation_fraction:g} that means at least {total} good images "
               f"(or a larger validation fraction)")
    else:
        how = f"give at least {needed} good images"
    raise SettingsError(
        f"false-alarm rate {alpha:g} needs at least {needed} good calibration images for a conformal "
        f"threshold, but only {n_cal} of the {n_good} good images are held out for calibration; {how}"
    )


def _common_shape(images: Sequence[np.ndarray]) -> list[int] | None:
    """The (H, W[, C]) all images share, None if they differ (recorded at fit time; ``gaikan update``
    refuses new images of another size or channel count)."""
    shapes = {tuple(int(v) for v in img.shape) for img in images}
    return list(shapes.pop()) if len(shapes) == 1 else None


def check_images(images) -> list[np.ndarray]:
    """Accept a sequence of (H, W) or (H, W, C) arrays; refuse anything else with a message
    (the rules are ``gaikan.data.images.image_problem``'s: shape, dtype, size, finite values in [0, 1])."""
    if isinstance(images, np.ndarray) and images.ndim in (3, 4) and images.dtype != object:
        images = list(images)
    images = list(images)
    if not images:
        raise SettingsError("no images were given")
    for i, img in enumerate(images):
        problem = image_problem(img)
        if problem is not None:
            raise SettingsError(f"image {i} {problem}")
    return images


def _convert(raw: str, default: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (tuple, list)):
            parts = [p for p in raw.replace(";", ",").split(",") if p]
            kind = type(default[0]) if default else str
            return tuple(kind(p) for p in parts)
        if default is None:
            for kind in (int, float):
                try:
                    return kind(raw)
                except ValueError:
                    pass
        return raw
    except ValueError:
        raise SettingsError(f"setting {key}={raw!r}: expected a value like {default!r}") from None
