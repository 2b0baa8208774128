"""The Ray engine (PyPI ``ray``, extra ``gaikan[ray]``): archive scoring and fitting across machines.

predict: Ray Data holds the list of image paths; ``map_batches`` hands batches to an actor pool of
``workers`` scorers (one CPU each). Each actor loads the model once: with runtime "auto" (the
default) the driver exports the model to ONNX once and puts the bytes in the object store, and every
actor runs them with onnxruntime on one thread; where the model does not export (a tiled model, a
detector without a scoring graph) or with runtime "torch", each actor loads the saved model directory
with torch. An actor reads, scores and draws its batch with ``gaikan.pipeline.score_paths``, the very
function the local engine runs, so unreadable files come back with the same UNREADABLE row and error.

fit: ``map_shares`` runs the detector's share function as one Ray task per worker (one CPU, one torch
thread each) on a contiguous share of the training images and returns the results in share order.

On a cluster every node needs gaikan installed (same version) and must see the input image paths and
the results directory (shared storage); with runtime "torch" also the model directory. Ray moves the
arguments and results between processes with its own serialisation; nothing of it is saved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gaikan.engine import split_shares
from gaikan.errors import GaikanError


def _ray():
    try:
        import ray
    except ImportError:
        raise GaikanError("the Ray engine needs the ray package: pip install 'gaikan[ray]' "
                          "(or pip install 'ray[data]')") from None
    return ray


def _one_thread() -> None:
    """Each Ray worker uses one CPU: one torch thread, no progress bars."""
    import torch

    from gaikan.progress import set_quiet

    torch.set_num_threads(1)
    set_quiet(True)


def _run_share(fn: Callable[[Any, list], Any], payload: Any, share: list) -> Any:
    _one_thread()
    return fn(payload, share)


def start_ray(address: str | None = None, *, num_cpus: int | None = None, attempts: int = 3) -> None:
    """``ray.init``: connect to ``address``, or start a local Ray with ``num_cpus`` (default: all cores).

    A local start is retried (``attempts`` in all): Ray gives its raylet a fixed 30 s to register, which
    a heavily loaded machine can miss. Failures become one GaikanError line."""
    ray = _ray()
    options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    where = f"the Ray cluster at {address}" if address else "a local Ray"
    for attempt in range(1 if address else attempts):
        try:
            if address:
                ray.init(address=address, **options)
            else:
                # "local": a new Ray of our own, even where `ray start` left one running on this machine
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **options)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises plain Exception for a start-up timeout
            ray.shutdown()
            error = " ".join(str(exc).split())[:300]
    raise GaikanError(f"cannot start or reach {where}: {error}")


class RayScorer:
    """A Ray Data actor: loads the model once, then reads, scores and draws batches of files."""

    def __init__(self, spec: dict):
        _one_thread()
        from gaikan import pipeline

        if "onnx" in spec:  # exported by the driver: the bytes, or their object-store reference
            data = spec["onnx"]
            if not isinstance(data, (bytes, bytearray)):
                data = _ray().get(data)
            self.detector = pipeline.onnx_scorer_from_bytes(data, threads=1)
        else:
            self.detector = pipeline.load_scorer(spec["model"], spec["kind"], threads=1)
        self.fig_dir = None if spec["fig_dir"] is None else Path(spec["fig_dir"])
        self.figures = bool(spec["figures"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from gaikan.pipeline import score_paths

        paths = [Path(str(p)) for p in batch["path"]]
        names = [str(n) for n in batch["name"]]
        preds = score_paths(self.detector, paths, names, self.fig_dir, figures=self.figures)
        by_path = {p.path: p for p in preds}
        rows = [by_path[str(p)] for p in paths]
        nan = float("nan")
        return {
            "i": np.asarray(batch["i"], dtype=np.int64),
            "score": np.asarray([nan if r.score is None else r.score for r in rows], dtype=np.float64),
            "verdict": np.asarray([r.verdict for r in rows], dtype=object),
            "threshold": np.asarray([r.threshold for r in rows], dtype=np.float64),
            "error": np.asarray([r.error for r in rows], dtype=object),
            "figure": np.asarray([r.figure for r in rows], dtype=object),
            "p_value": np.asarray([nan if r.p_value is None else r.p_value for r in rows], dtype=np.float64),
        }


class RayEngine:
    """Connects to ``address`` (a running cluster) or starts a local Ray on this machine (stopped again
    by ``close``); a Ray already initialised in this process (a test's, a notebook's) is used as is."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 0):
        ray = _ray()
        if workers < 0:
            raise GaikanError(f"--workers must be >= 0, got {workers}")
        self._started = False
        if not ray.is_initialized():
            start_ray(address)
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = int(workers) or max(1, cpus)

    # ---- fit ------------------------------------------------------------------------------------
    def map_shares(self, fn: Callable[[Any, list], Any], payload: Any, items: Sequence) -> list:
        ray = _ray()
        shares = split_shares(items, self.workers)
        task = ray.remote(num_cpus=1)(_run_share)
        payload_ref = ray.put(payload)
        return ray.get([task.remote(fn, payload_ref, share) for share in shares])

    # ---- predict --------------------------------------------------------------------------------
    def predict(self, model: str | Path, paths: Sequence[Path], names: Sequence[str], fig_dir: Path | None, *,
                runtime: str | None = None, threads: int = 0, figures: bool = True, batch_size: int = 16) -> list:
        ray = _ray()
        import ray.data

        from gaikan import pipeline
        from gaikan.progress import is_quiet

        spec = self._scorer_spec(model, runtime or "auto")
        spec.update(fig_dir=None if fig_dir is None else str(Path(fig_dir).resolve()), figures=figures)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = not is_quiet()
        ctx.print_on_execution_start = False
        items = [{"i": i, "path": str(p), "name": n} for i, (p, n) in enumerate(zip(paths, names))]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * self.workers)))
        ds = ds.map_batches(RayScorer, fn_constructor_kwargs={"spec": spec}, batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=self.workers), num_cpus=1,
                            batch_format="numpy")
        rows = ds.take_all()
        predictions = []
        for row in rows:
            i = int(row["i"])
            score = float(row["score"])
            p_value = float(row["p_value"])
            predictions.append(pipeline.Prediction(
                str(paths[i]), None if np.isnan(score) else score, str(row["verdict"]), float(row["threshold"]),
                error=str(row["error"]), figure=str(row["figure"]), p_value=None if np.isnan(p_value) else p_value))
        self.last_runtime = spec["kind"]
        return predictions

    def _scorer_spec(self, model: str | Path, runtime: str) -> dict:
        """What each actor loads: ONNX bytes in the object store, or a model path for torch/onnx."""
        from gaikan import pipeline

        model = Path(model)
        if runtime not in pipeline.RUNTIMES:
            raise GaikanError(f"unknown runtime {runtime!r}; choose one of {', '.join(pipeline.RUNTIMES)}")
        if runtime == "auto" and model.is_dir():
            detector = pipeline.load_scorer(model, "torch")  # checks the model here, once
            data = pipeline.exported_onnx(detector)
            if data is not None:
                return {"kind": "onnx", "onnx": _ray().put(data)}
            return {"kind": "torch", "model": str(model.resolve())}
        kind = "onnx" if runtime == "auto" else runtime
        pipeline.load_scorer(model, kind)  # refuses a bad model here rather than in every actor
        return {"kind": kind, "model": str(model.resolve())}

    def close(self) -> None:
        if self._started:
            _ray().shutdown()
            self._started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
