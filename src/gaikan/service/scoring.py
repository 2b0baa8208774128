"""The service's scoring path: a runtime behind one small interface, and dynamic micro-batching.

Runtimes (``ScoringBackend``: ``prepare(image)`` in the request's thread, ``run(items)`` in a
scoring worker, ``workers`` = how many ``run`` calls may go at once):

* ``OnnxBackend``: the model exported to ONNX (``gaikan.export``) and run by onnxruntime. One
  ``InferenceSession`` (one copy of the weights) shared by ``workers`` threads, each run on
  ``threads`` intra-op threads (the service gives cores / workers, i.e. 1 at its default of one
  worker per core; idle intra-op threads sleep rather than spin): ``InferenceSession.run`` is
  thread-safe and releases the GIL, so ``workers`` = the number of cores keeps every core busy
  with independent batches. ``prepare`` is ``gaikan.data.images.prepare_image`` (the torch path's resize),
  so the scores are the exported graph's scores of the same input as the torch path.
* ``TorchBackend``: the fitted detector itself (the fallback for models that do not export:
  tiled models, metric-learning detectors). Its torch state is not re-entrant: one worker, and
  torch uses its own intra-op threads.

``MicroBatcher``: requests are queued; a free worker takes up to ``max_batch`` queued requests at
once and runs them as one batch. It waits up to ``max_wait_ms`` for the batch to fill, but only
while more requests are on their way (announced by the service when an upload starts decoding):
a lone request is never delayed. A batch whose run fails is re-run one request at a time, so one
bad request cannot fail the others.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from gaikan.errors import GaikanError, SettingsError

RUNTIMES = ("auto", "onnx", "torch")


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class BatchResult:
    """One request's share of a batch: its score, anomaly map (working size, or None), batch size."""

    score: float
    amap: np.ndarray | None
    batch_size: int
    score_ms: float


class OnnxBackend:
    """An exported model run by onnxruntime (1 intra-op thread per concurrent run)."""

    runtime = "onnx"

    def __init__(self, onnx_path, *, workers: int, threads: int = 1):
        from gaikan.edge import EdgeScorer

        self.threads = max(1, int(threads))
        self.scorer = EdgeScorer(onnx_path, threads=self.threads, batch_size=1, spin=False)
        self.input_size = self.scorer.input_size
        self.workers = max(1, int(workers))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        from gaikan.data.images import prepare_image
        from gaikan.edge import _check_image

        return prepare_image(_check_image(image, 0), self.input_size)

    def run(self, items: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        scores, maps = self.scorer.score_prepared(np.stack(items))
        return np.asarray(scores, dtype=np.float32), list(np.asarray(maps, dtype=np.float32))


class TorchBackend:
    """The fitted detector in torch (one run at a time: its state is not re-entrant)."""

    runtime = "torch"
    workers = 1

    def __init__(self, detector):
        self.detector = detector
        self._lock = threading.Lock()

    def prepare(self, image: np.ndarray) -> np.ndarray:
        from gaikan.detectors.base import check_images

        return check_images([image])[0]

    def run(self, items: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray | None]]:
        with self._lock:
            result = self.detector.score(list(items))
        maps = [None] * len(items) if result.maps is None else [np.asarray(m, dtype=np.float32)
                                                                 for m in result.maps]
        return np.asarray(result.scores, dtype=np.float32), maps


class MicroBatcher:
    """Queue + ``workers`` threads running ``run(items)`` on batches of up to ``max_batch`` items."""

    def __init__(self, run: Callable[[list], tuple[np.ndarray, list]], *, workers: int, max_batch: int = 8,
                 max_wait_ms: float = 2.0, name: str = "model",
                 on_batch: Callable[[int, float], None] | None = None):
        if workers < 1 or max_batch < 1 or max_wait_ms < 0:
            raise SettingsError(f"workers and max batch must be >= 1 and max wait >= 0 ms, got {workers}, "
                                f"{max_batch} and {max_wait_ms}")
        self._run = run
        self.workers = int(workers)
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self._on_batch = on_batch
        self._items: deque[tuple[Any, Future]] = deque()
        self._cond = threading.Condition()
        self._upstream = 0  # requests announced (decoding) but not yet submitted
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"gaikan-score-{name}-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    # ---- producer side --------------------------------------------------------------------------
    def announce(self) -> None:
        """A request is on its way (decoding): a worker filling a batch may wait for it."""
        with self._cond:
            self._upstream += 1

    def withdraw(self) -> None:
        """An announced request will not come (refused upload)."""
        with self._cond:
            self._upstream = max(0, self._upstream - 1)
            self._cond.notify_all()

    def submit(self, item, *, announced: bool = False) -> Future:
        """Queue one prepared item; the future's result is a :class:`BatchResult`."""
        future: Future = Future()
        with self._cond:
            if announced:
                self._upstream = max(0, self._upstream - 1)
            if self._closed:
                raise GaikanError("this model has been shut down")
            self._items.append((item, future))
            self._cond.notify_all()
        return future

    @property
    def queue_length(self) -> int:
        """Requests waiting for a worker (not counting the batches being scored)."""
        return len(self._items)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests; the workers finish what is queued, then exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # ---- workers --------------------------------------------------------------------------------
    def _take(self) -> list[tuple[Any, Future]] | None:
        with self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._items) < self.max_batch and self._upstream > 0 and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self.max_batch, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._score(batch)

    def _score(self, batch: list[tuple[Any, Future]]) -> None:
        if not batch:  # nothing was taken (e.g. woken by close)
            return
        t0 = time.perf_counter()
        try:
            scores, maps = self._run([item for item, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to the requests
            if len(batch) > 1:  # find the culprit: the others still get their answers
                for one in batch:
                    self._score([one])
                return
            batch[0][1].set_exception(exc)
            return
        ms = 1000.0 * (time.perf_counter() - t0)
        if self._on_batch is not None:
            self._on_batch(len(batch), ms)
        for i, (_, future) in enumerate(batch):
            future.set_result(BatchResult(float(scores[i]), maps[i], len(batch), ms))
