"""The service's scoring path: a runtime behind one small interface, and dynamic micro-batching.

Runtimes (``ScoringBackend``: ``prepare(image)`` in the request's thread, ``run(items)`` in a
scoring worker, or ``stages`` (the callables the batcher runs in turn: ``(run,)`` for one stage),
``workers`` = how many runs may go at once):

* ``OnnxBackend``: the model exported to ONNX (``gaikan.export``) and run by onnxruntime. One
  ``InferenceSession`` (one copy of the weights) shared by ``workers`` threads, each run on
  ``threads`` intra-op threads (the service gives cores / workers, i.e. 1 at its default of one
  worker per core; idle intra-op threads sleep rather than spin): ``InferenceSession.run`` is
  thread-safe and releases the GIL, so ``workers`` = the number of cores keeps every core busy
  with independent batches. ``prepare`` is ``gaikan.data.images.prepare_image`` (the torch path's resize),
  so the scores are the exported graph's scores of the same input as the torch path. A graph with
  a stage cut (PaDiM) runs as two sessions, features and head, for the batcher's two stages; the
  head session gets the threads of all the workers (one head runs at a time).
* ``TorchBackend``: the fitted detector itself (the fallback for models that do not export:
  tiled models, metric-learning detectors). Its torch state is not re-entrant: one worker, and
  torch uses its own intra-op threads.

``MicroBatcher``: requests are queued; a free worker takes up to ``max_batch`` queued requests at
once and runs them as one batch. It waits up to ``max_wait_ms`` for the batch to fill, but only
while more requests are on their way (announced by the service when an upload starts decoding):
a lone request is never delayed. A batch whose run fails is re-run one request at a time, so one
bad request cannot fail the others. With two stages (a backend's ``stages``), the workers run the
features one request at a time and the head on everything that has reached it once no request is
left before it (or ``max_batch`` wait): at 8 clients on 2 cores PaDiM's head batches grow from
about 2.8 requests to 7.4.
"""

from __future__ import annotations

import json
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
#: a backend's own max batch (``--max-batch 0``). A staged graph's head reads its matrices once per
#: batch, so large batches pay. A one-stage graph (PatchCore, patch-metric) costs the same per image
#: at batch 1 and 8, and small batches shorten the wait of a request that just missed one. PatchCore
#: at 8 clients, idle: p99 288-320 ms at max batch 8, 203 ms at 2, same throughput (0.65-0.67x raw).
STAGED_MAX_BATCH = 8
ONE_STAGE_MAX_BATCH = 2


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
    """An exported model run by onnxruntime (1 intra-op thread per concurrent run).

    staged: a two-stage graph (``gaikan.export.onnx_export.split_stages``: PaDiM) runs as two
    sessions, so that the micro-batcher batches the memory-bound head on its own; False, or a
    one-stage graph, runs the whole graph at once.
    """

    runtime = "onnx"

    def __init__(self, onnx_path, *, workers: int, threads: int = 1, staged: bool = True):
        from gaikan.edge import EdgeScorer, onnx_session
        from gaikan.export.onnx_export import INPUT_NAME, OUTPUT_NAMES, STAGE_CUT, split_stages

        self.threads = max(1, int(threads))
        self.workers = max(1, int(workers))
        parts = split_stages(onnx_path) if staged else None
        if parts is None:
            self.scorer = EdgeScorer(onnx_path, threads=self.threads, batch_size=1, spin=False)
            self.input_size = self.scorer.input_size
            self.stages: tuple[Callable, ...] = (self.run,)
            self.max_batch = ONE_STAGE_MAX_BATCH
            return
        self.input_size = tuple(int(v) for v in json.loads(parts.metadata["input_size"]))
        features = onnx_session(parts.features, self.threads, spin=False)
        # one head runs at a time (the batcher gives it every request in flight): it gets the
        # threads of all the workers, as the others have nothing to do while it runs
        head = onnx_session(parts.head, self.threads * self.workers, spin=False)

        def embed(items: Sequence[np.ndarray]) -> list[np.ndarray]:
            return list(features.run([STAGE_CUT], {INPUT_NAME: np.stack(items)})[0])

        def score_embedding(items: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
            scores, maps = head.run(list(OUTPUT_NAMES), {STAGE_CUT: np.stack(items)})
            return np.asarray(scores, dtype=np.float32), list(np.asarray(maps, dtype=np.float32))

        self.scorer = None
        self.stages = (embed, score_embedding)
        self.max_batch = STAGED_MAX_BATCH

    def prepare(self, image: np.ndarray) -> np.ndarray:
        from gaikan.data.images import prepare_image
        from gaikan.edge import _check_image

        return prepare_image(_check_image(image, 0), self.input_size)

    def run(self, items: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The whole graph on a batch of prepared images (through both stages when staged)."""
        if self.scorer is None:
            return self.stages[1](self.stages[0](items))
        scores, maps = self.scorer.score_prepared(np.stack(items))
        return np.asarray(scores, dtype=np.float32), list(np.asarray(maps, dtype=np.float32))


class TorchBackend:
    """The fitted detector in torch (one run at a time: its state is not re-entrant)."""

    runtime = "torch"
    workers = 1
    max_batch = STAGED_MAX_BATCH  # one worker: batches are its only parallelism

    def __init__(self, detector):
        self.detector = detector
        self._lock = threading.Lock()
        self.stages = (self.run,)

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
    """Queue + ``workers`` threads running a model on batches of up to ``max_batch`` items.

    ``run`` is one callable, ``items -> (scores, maps)``, or a sequence of stages: each but the last
    ``items -> per-item outputs`` (the next stage's items), the last ``items -> (scores, maps)``.
    Staged (a model whose head is memory-bound: ``OnnxBackend`` with a stage cut), the first stages
    take ``stage_batch`` items at a time (compute-bound: batching gains nothing there, and small
    pieces keep every worker busy) and the last stage takes everything waiting for it, up to
    ``max_batch``, once no earlier stage is still working on an item (or ``max_batch`` are waiting):
    its batch is then every request in flight, whatever the split between the workers.
    """

    def __init__(self, run: Callable[[list], tuple[np.ndarray, list]] | Sequence[Callable[[list], Any]], *,
                 workers: int, max_batch: int = 8, max_wait_ms: float = 2.0, name: str = "model",
                 on_batch: Callable[[int, float], None] | None = None, stage_batch: int = 1):
        if workers < 1 or max_batch < 1 or max_wait_ms < 0 or stage_batch < 1:
            raise SettingsError(f"workers, max batch and stage batch must be >= 1 and max wait >= 0 ms, got "
                                f"{workers}, {max_batch}, {stage_batch} and {max_wait_ms}")
        self._stages = [run] if callable(run) else list(run)
        if not self._stages:
            raise SettingsError("a micro-batcher needs at least one stage")
        self.workers = int(workers)
        self.max_batch = int(max_batch)
        self.stage_batch = int(stage_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self._on_batch = on_batch
        # per stage: queued (item, future, ms spent in earlier stages); batches running
        self._queues: list[deque[tuple[Any, Future, float]]] = [deque() for _ in self._stages]
        self._running = [0] * len(self._stages)
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
            self._queues[0].append((item, future, 0.0))
            self._cond.notify_all()
        return future

    @property
    def queue_length(self) -> int:
        """Requests waiting for a worker (not counting the batches being scored)."""
        return sum(len(q) for q in self._queues)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests; the workers finish what is queued, then exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    # ---- workers --------------------------------------------------------------------------------
    def _ready(self) -> int | None:
        """The stage a free worker should run now (latest first), or None."""
        last = len(self._stages) - 1
        for k in range(last, 0, -1):
            waiting = len(self._queues[k])
            if waiting and (waiting >= self.max_batch
                            or not any(self._queues[j] or self._running[j] for j in range(k))):
                return k
        return 0 if self._queues[0] else None

    def _take(self) -> tuple[int, list] | None:
        with self._cond:
            while (k := self._ready()) is None:
                if self._closed and not any(self._running):
                    return None
                self._cond.wait()
            queue = self._queues[k]
            if len(self._stages) == 1:  # one stage: wait (briefly) for announced requests to fill it
                deadline = time.monotonic() + self.max_wait
                while len(queue) < self.max_batch and self._upstream > 0 and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            size = self.max_batch if k == len(self._stages) - 1 else self.stage_batch
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            self._running[k] += 1
            return k, batch

    def _work(self) -> None:
        while True:
            job = self._take()
            if job is None:
                return
            k, batch = job
            try:
                self._run_stage(k, batch)
            finally:
                with self._cond:
                    self._running[k] -= 1
                    self._cond.notify_all()

    def _run_stage(self, k: int, batch: list[tuple[Any, Future, float]]) -> None:
        if not batch:  # nothing was taken (e.g. woken by close)
            return
        t0 = time.perf_counter()
        try:
            out = self._stages[k]([item for item, _, _ in batch])
        except BaseException as exc:  # noqa: BLE001 - handed to the requests
            if len(batch) > 1:  # find the culprit: the others still get their answers
                for one in batch:
                    self._run_stage(k, [one])
                return
            batch[0][1].set_exception(exc)
            return
        ms = 1000.0 * (time.perf_counter() - t0)
        if k < len(self._stages) - 1:
            with self._cond:
                self._queues[k + 1].extend((o, future, spent + ms) for o, (_, future, spent) in zip(out, batch))
            return
        scores, maps = out
        if self._on_batch is not None:
            self._on_batch(len(batch), ms)
        for i, (_, future, spent) in enumerate(batch):
            future.set_result(BatchResult(float(scores[i]), maps[i], len(batch), spent + ms))
