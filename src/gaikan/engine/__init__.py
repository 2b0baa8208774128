"""Where the batch work of ``fit`` and ``predict`` runs: one small interface, two engines.

    engine = get_engine("local")                       # this process (the default)
    engine = get_engine("ray", address=None, workers=2)  # Ray: a local Ray, or a cluster's address
    predictions = engine.predict(model_dir, paths, figure_names, fig_dir, runtime=None, ...)
    parts = engine.map_shares(fn, payload, items)      # [fn(payload, share) for each share of items]

``map_shares`` is how a detector's fit is split: PaDiM sends ``padim_partial_sums`` (per-position sums
of x and x x^T over a share of the images; the driver adds them, ``padim.combine_sums``), PatchCore
``patchcore_patch_features`` (patch features; the coreset selection stays on the driver). A share is
a contiguous slice of the items, in order; the results come back in share order.

``predict`` scores image files and returns one ``gaikan.pipeline.Prediction`` per path (UNREADABLE
with the read error for files that cannot be decoded: the same rows whichever engine ran them). The
caller (``gaikan.pipeline.predict_with_engine``) writes results.csv and ng_list.txt; figures are
written by whoever scores (on a cluster, ``fig_dir`` must be on storage every node sees).

Runtimes: "torch" (the saved model directory), "onnx" (an exported .onnx file) and "auto" (ONNX
through onnxruntime where the model exports, else torch). ``None`` takes the engine's default:
torch for local (the command's historical behaviour), auto for Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from gaikan.errors import GaikanError

ENGINES = ("local", "ray")


class Engine(Protocol):
    name: str
    #: how many workers share the work (1 for local)
    workers: int

    def map_shares(self, fn: Callable[[Any, list], Any], payload: Any, items: Sequence) -> list: ...

    def predict(self, model: str | Path, paths: Sequence[Path], names: Sequence[str], fig_dir: Path | None, *,
                runtime: str | None = None, threads: int = 0, figures: bool = True,
                batch_size: int = 16) -> list: ...

    def close(self) -> None: ...


def get_engine(name: str = "local", *, address: str | None = None, workers: int = 0) -> Engine:
    """The engine called ``name``: "local" or "ray" (``address``: a Ray cluster, e.g. "ray://head:10001"
    or "auto"; None starts a local Ray on this machine; ``workers``: actors / fit shares, 0 = one per CPU
    Ray reports)."""
    if name == "local":
        if address:
            raise GaikanError("--address is for --engine ray; the local engine runs in this process")
        from gaikan.engine.local import LocalEngine

        return LocalEngine()
    if name == "ray":
        from gaikan.engine.ray_engine import RayEngine

        return RayEngine(address=address, workers=workers)
    raise GaikanError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


def split_shares(items: Sequence, n: int) -> list[list]:
    """``items`` cut into at most ``n`` contiguous shares of near-equal size (none empty), in order."""
    items = list(items)
    n = max(1, min(int(n), len(items)))
    size, extra = divmod(len(items), n)
    shares, start = [], 0
    for k in range(n):
        stop = start + size + (1 if k < extra else 0)
        shares.append(items[start:stop])
        start = stop
    return shares
