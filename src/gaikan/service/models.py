"""The models a service serves: each loaded once behind a name, with its runtime, its micro-batcher
and its drift monitor, and swapped for a new version without dropping a request.

Loading (``load_served_model``): the saved model is read (``gaikan.io.model_io``, checksums and
all); with runtime ``auto`` (the default) or ``onnx`` it is exported to ONNX once and cached under
``CACHE_DIR/<tensor sha256>-<gaikan version>-x<export revision>.onnx`` (the service's ``DATA_DIR/onnx``), then the
exported graph is checked against the torch detector on a probe image (relative difference of the
scores <= 1e-3) before it is used. ``auto`` falls back to torch, with the reason in
``ServedModel.runtime_note``, when the model does not export (tiled models, metric-learning
detectors), onnxruntime is missing or the check fails; ``onnx`` refuses instead.

Model version: the manifest's ``version`` when it has one (written by a model-updating command),
otherwise its ``created`` time stamp: the same for every copy of a saved model, different for a
refit. The model id (detector + tensor checksum) names the exact weights.

Swapping (``ModelRegistry.swap``): the new version is loaded while the old one keeps serving; the
name then points to the new one for every request that starts afterwards. Requests that started
on the old one hold a lease on it and finish there (their log rows carry the old id and version);
the old batcher is shut down when the last lease is released.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import gaikan
from gaikan.errors import GaikanError, SettingsError
from gaikan.service.scoring import RUNTIMES, MicroBatcher, OnnxBackend, TorchBackend, available_cores

ONNX_CHECK_RTOL = 1e-3
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def check_model_name(name: str) -> str:
    if not name or len(name) > 64 or not set(name) <= NAME_CHARS:
        raise SettingsError(f"model name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return name


def parse_model_specs(specs: list[str]) -> dict[str, Path]:
    """``--model`` values -> {name: dir}: ``NAME=DIR`` each, or one plain ``DIR`` (named "default")."""
    out: dict[str, Path] = {}
    plain = []
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, _, path = spec.partition("=")
            name = check_model_name(name.strip())
            if name in out:
                raise SettingsError(f"--model {spec}: the name {name!r} is given twice")
            out[name] = Path(path)
        else:
            plain.append(Path(spec))
    if plain and (len(plain) > 1 or out):
        raise SettingsError("several models: give each one a name, --model NAME=DIR (e.g. --model "
                            f"mono={plain[0]})")
    if plain:
        out["default"] = plain[0]
    if not out:
        raise SettingsError("no model given: --model DIR or --model NAME=DIR (repeated)")
    return out


def model_version(manifest: dict) -> str:
    return str(manifest.get("version") or manifest.get("created") or "unknown")


class ServedModel:
    """One loaded model version: runtime backend + micro-batcher + drift monitor."""

    def __init__(self, name, model_dir, manifest, detector, backend, runtime_note: str, *, max_batch: int,
                 max_wait_ms: float, drift_settings: dict | None, on_batch=None):
        from gaikan.evaluation.thresholds import conformal_p_value
        from gaikan.io.model_io import model_id
        from gaikan.service.monitor import DriftMonitor

        self.name = name
        self.model_dir = Path(model_dir)
        self.manifest = manifest
        self.model_id = model_id(manifest)
        self.model_checksum = manifest["tensors"]["sha256"]
        self.model_version = model_version(manifest)
        self.detector_name = manifest["detector"]
        self.threshold = float(detector.threshold)
        self.threshold_method = detector.thresholds.default_method
        cal = getattr(detector, "calibration_scores_", None)
        self.calibration = None if cal is None or len(cal) == 0 else np.sort(np.asarray(cal, dtype=np.float64))
        self.backend = backend
        self.runtime = backend.runtime
        self.runtime_note = runtime_note
        self.batcher = MicroBatcher(backend.stages, workers=backend.workers, max_batch=max_batch,
                                    max_wait_ms=max_wait_ms, name=name,
                                    on_batch=None if on_batch is None else (lambda n, ms: on_batch(name, n, ms)))
        self.drift = None
        if self.calibration is not None and drift_settings is not None:
            self.drift = DriftMonitor(self.calibration, self.threshold, **drift_settings)
        self._p_value = conformal_p_value
        self._lock = threading.Lock()
        self._active = 0
        self._retired = False

    def p_value(self, score: float) -> float | None:
        return None if self.calibration is None else float(self._p_value(self.calibration, score))

    def queue_length(self) -> int:
        return self.batcher.queue_length

    def info(self) -> dict:
        return {"name": self.name, "model_id": self.model_id, "model_version": self.model_version,
                "model_checksum": self.model_checksum, "detector": self.detector_name,
                "input_size": list(self.manifest["input_size"]), "threshold": self.threshold,
                "threshold_method": self.threshold_method, "runtime": self.runtime,
                "runtime_note": self.runtime_note, "workers": self.batcher.workers,
                "max_batch": self.batcher.max_batch, "max_wait_ms": 1000.0 * self.batcher.max_wait,
                "n_calibration": 0 if self.calibration is None else len(self.calibration),
                "drift_monitor": self.drift is not None}

    # ---- leases (swap without dropping requests) -----------------------------------------------
    def _acquire(self) -> None:
        with self._lock:
            self._active += 1

    def _release(self) -> None:
        with self._lock:
            self._active -= 1
            done = self._retired and self._active == 0
        if done:
            threading.Thread(target=self.batcher.close, daemon=True).start()

    def retire(self) -> None:
        """No new requests will come (the name points to a newer version): close once idle."""
        with self._lock:
            self._retired = True
            done = self._active == 0
        if done:
            threading.Thread(target=self.batcher.close, daemon=True).start()


_EXPORTED: dict[str, Path] = {}  # this process's exports, by file name (reused by another data dir)


def _export_cached(detector, manifest, cache_dir: Path) -> Path:
    import shutil

    from gaikan.export.onnx_export import EXPORT_REVISION, export_onnx

    cache_dir.mkdir(parents=True, exist_ok=True)
    name = f"{manifest['tensors']['sha256']}-{gaikan.__version__}-x{EXPORT_REVISION}.onnx"
    path = cache_dir / name
    if not path.is_file():
        earlier = _EXPORTED.get(name)
        if earlier is not None and earlier.is_file():
            tmp = cache_dir / f".{name}.copy"
            shutil.copyfile(earlier, tmp)
            tmp.replace(path)
        else:
            export_onnx(detector, path, force=True)
    _EXPORTED[name] = path
    return path


def _check_onnx_agrees(detector, backend: OnnxBackend) -> None:
    rng = np.random.default_rng(0)
    h, w = detector.input_size
    probe = rng.integers(0, 256, (h, w), dtype=np.uint8)
    expected = float(detector.score([probe]).scores[0])
    got = float(backend.run([backend.prepare(probe)])[0][0])
    if not abs(got - expected) <= ONNX_CHECK_RTOL * max(abs(expected), 1e-6):
        raise GaikanError(f"the exported model scores a probe image {got:.6g}, torch {expected:.6g} "
                          f"(relative difference above {ONNX_CHECK_RTOL})")


def load_served_model(name: str, model_dir, *, cache_dir, runtime: str = "auto", workers: int = 0,
                      max_batch: int = 0, max_wait_ms: float = 2.0, drift_settings: dict | None = None,
                      on_batch=None) -> ServedModel:
    """Load ``model_dir`` under ``name`` with the chosen runtime (see the module docstring)."""
    from gaikan.detectors.base import load_detector

    if runtime not in RUNTIMES:
        raise SettingsError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    check_model_name(name)
    detector = load_detector(model_dir)
    manifest = detector.manifest_
    workers = int(workers) or available_cores()
    backend, note = None, ""
    if runtime in ("auto", "onnx"):
        try:
            import onnxruntime  # noqa: F401

            path = _export_cached(detector, manifest, Path(cache_dir))
            threads = max(1, available_cores() // workers)
            backend = OnnxBackend(path, workers=workers, threads=threads)
            _check_onnx_agrees(detector, backend)
            note = (f"onnxruntime, {workers} workers x {threads} thread{'s' if threads > 1 else ''}"
                    f"{', features and head batched apart' if len(backend.stages) > 1 else ''} ({path.name})")
        except (GaikanError, ImportError) as exc:
            if runtime == "onnx":
                raise GaikanError(f"model {name} ({model_dir}) cannot run in onnxruntime: {exc}") from None
            backend, note = None, f"torch fallback: {exc}"
    if backend is None:
        backend = TorchBackend(detector)
        note = note or "torch (as asked)"
    served = ServedModel(name, model_dir, manifest, detector, backend, note, max_batch=max_batch or backend.max_batch,
                         max_wait_ms=max_wait_ms, drift_settings=drift_settings, on_batch=on_batch)
    return served


class ModelRegistry:
    """name -> the ServedModel currently behind it; leases and swaps."""

    def __init__(self, models: dict[str, ServedModel]):
        self._models = dict(models)
        self._lock = threading.Lock()
        self._swap_locks = {name: threading.Lock() for name in models}

    def names(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def get(self, name: str) -> ServedModel:
        with self._lock:
            return self._models[name]

    def all(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models.values())

    @contextmanager
    def lease(self, name: str):
        """The model behind ``name`` now, kept alive until the block ends (KeyError if unknown)."""
        with self._lock:
            served = self._models[name]
            served._acquire()
        try:
            yield served
        finally:
            served._release()

    def swap(self, name: str, load) -> tuple[ServedModel, ServedModel]:
        """Load a new version with ``load()`` (the old one keeps serving meanwhile), then switch.
        Returns (old, new)."""
        with self._lock:
            if name not in self._models:
                raise KeyError(name)
            swap_lock = self._swap_locks[name]
        with swap_lock:
            new = load()
            with self._lock:
                old = self._models[name]
                self._models[name] = new
            old.retire()
        return old, new

    def close(self) -> None:
        for served in self.all():
            served.retire()
            served.batcher.close()
