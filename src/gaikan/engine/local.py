"""The local engine: everything in this process (the embedded default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from gaikan.progress import batches, track


class LocalEngine:
    name = "local"
    workers = 1
    #: detectors fit on it exactly as without an engine (Detector.fit)
    in_process = True

    def map_shares(self, fn: Callable[[Any, list], Any], payload: Any, items: Sequence) -> list:
        return [fn(payload, list(items))]

    def predict(self, model: str | Path, paths: Sequence[Path], names: Sequence[str], fig_dir: Path | None, *,
                runtime: str | None = None, threads: int = 0, figures: bool = True, batch_size: int = 16) -> list:
        from gaikan.pipeline import load_scorer, score_paths

        detector = load_scorer(model, runtime or "torch", threads=threads)
        predictions = []
        for sl in track(batches(len(paths), batch_size), "predict", total=None):
            predictions += score_paths(detector, paths[sl], names[sl], fig_dir, figures=figures)
        return predictions

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
