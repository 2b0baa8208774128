"""Scoring on the device with an exported ONNX model: numpy, Pillow and onnxruntime only (no torch).

    from gaikan.edge import EdgeScorer
    scorer = EdgeScorer("model.onnx")                  # written by `gaikan export`
    scores, maps = scorer.score(["a.png", "b.png"])    # paths or numpy arrays; maps (N, H, W)
    scorer.verdicts(scores)                            # ["OK", "NG"]: NG iff score > threshold

    python -m gaikan.edge model.onnx [--recursive] INPUTS...   # path,score,verdict for every file found

Images are read and prepared exactly as the torch path does (``gaikan.data.images.read_image``, then
``to_float01``, alpha dropped, Pillow bilinear resize per channel in mode "F" to the working size,
gray replicated to RGB: ``gaikan.data.images.prepare_image``, shared with the torch path), then fed to the graph as
float32 (N, 3, H, W) in [0, 1]. Folders and per-file errors follow ``gaikan.data.inputs`` (the rules
of ``gaikan predict``: every file found gets a row; a bad file never stops the batch). This module
imports only numpy, Pillow, onnxruntime and the torch-free parts of gaikan (``gaikan.errors``,
``gaikan.data.images``, ``gaikan.data.inputs``); a test keeps it that way.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from gaikan.data.images import image_problem, prepare_image
from gaikan.data.inputs import SCORED, SKIPPED, read_input, scan_inputs, score_files
from gaikan.errors import GaikanError, ModelFormatError, SettingsError

FORMAT_NAME = "gaikan-onnx"  # = gaikan.export.onnx_export.FORMAT_NAME (not imported: that module needs torch)
READS_FORMAT_VERSIONS = (1,)


def _check_image(img, i: int) -> np.ndarray:
    problem = image_problem(img)
    if problem is not None:
        raise SettingsError(f"image {i} {problem}")
    return img


class EdgeScorer:
    """An exported gaikan model (.onnx) run by onnxruntime on the CPU.

    threads: onnxruntime intra-op threads (0 = onnxruntime's default, all cores).
    batch_size: images per run (memory grows with it: PatchCore's distance block is
        batch x positions x bank size floats).
    """

    def __init__(self, path, *, threads: int = 0, batch_size: int = 1):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such ONNX model file")
        if batch_size < 1 or threads < 0:
            raise SettingsError(f"batch_size must be >= 1 and threads >= 0, got {batch_size} and {threads}")
        self.batch_size = int(batch_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any load failure is the file's problem
            text = " ".join(str(exc).split())[:300]
            raise ModelFormatError(f"{self.path}: not a loadable ONNX model ({text})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("gaikan_format") != FORMAT_NAME:
            raise ModelFormatError(f"{self.path}: not a gaikan ONNX model (no gaikan_format={FORMAT_NAME!r} "
                                   "in its metadata); write it with `gaikan export`")
        version = meta.get("gaikan_format_version", "?")
        if not version.isdigit() or int(version) not in READS_FORMAT_VERSIONS:
            raise ModelFormatError(f"{self.path}: gaikan ONNX format version {version}, this gaikan reads "
                                   f"{', '.join(map(str, READS_FORMAT_VERSIONS))}")
        try:
            self.metadata = dict(meta)
            self.name = meta["detector"]
            self.settings = json.loads(meta["settings"])
            self.input_size = tuple(int(v) for v in json.loads(meta["input_size"]))
            self.threshold = float(meta["threshold"])
            self.threshold_method = meta.get("threshold_method", "")
            self.thresholds = {k: float(v) for k, v in json.loads(meta.get("thresholds", "{}")).items()}
            self.calibration_scores = np.sort(np.asarray(json.loads(meta.get("calibration_scores", "[]")),
                                                         dtype=np.float32))
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelFormatError(f"{self.path}: gaikan metadata is incomplete or malformed ({exc})") from None
        self.input_name = self.session.get_inputs()[0].name

    def prepare(self, images: Sequence) -> np.ndarray:
        """Paths or arrays -> float32 (N, 3, H, W) in [0, 1] at the working size."""
        out = np.empty((len(images), 3, *self.input_size), dtype=np.float32)
        for i, img in enumerate(images):
            if isinstance(img, (str, os.PathLike)):
                img = read_input(img)
            out[i] = prepare_image(_check_image(img, i), self.input_size)
        return out

    def score_prepared(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the graph on a prepared (N, 3, H, W) batch -> (scores (N,), maps (N, H, W))."""
        scores, maps = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return scores, maps

    def score(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Image paths or numpy arrays -> (scores (N,) float32, anomaly maps (N, H, W) float32)."""
        images = list(images)
        if not images:
            raise SettingsError("no images were given")
        scores, maps = [], []
        for start in range(0, len(images), self.batch_size):
            s, m = self.score_prepared(self.prepare(images[start:start + self.batch_size]))
            scores.append(s)
            maps.append(m)
        return np.concatenate(scores).astype(np.float32), np.concatenate(maps).astype(np.float32)

    def verdicts(self, scores) -> list[str]:
        """'NG' iff score > threshold, else 'OK'."""
        return ["NG" if float(s) > self.threshold else "OK" for s in np.atleast_1d(scores)]

    def p_values(self, scores) -> np.ndarray | None:
        """Conformal p-values (1 + #{s_i >= s}) / (n + 1) against the stored calibration scores."""
        cal = self.calibration_scores
        if len(cal) == 0:
            return None
        s = np.atleast_1d(np.asarray(scores, dtype=np.float64))
        greater_equal = len(cal) - np.searchsorted(cal.astype(np.float64), s, side="left")
        return (1.0 + greater_equal) / (len(cal) + 1.0)


USAGE = ("usage: python -m gaikan.edge MODEL.onnx [--recursive] INPUT [INPUT ...]\n"
         "INPUT: image files and/or folders of images (--recursive: their sub-folders too).\n"
         "prints path,score,verdict, one row for every file found: OK / NG (NG iff score > the model's\n"
         "threshold), UNREADABLE or SKIPPED (the reason on stderr)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gaikan.edge model.onnx [--recursive] INPUTS...``: one CSV row path,score,verdict for
    every file found (the accounting rules of ``gaikan.data.inputs``, as in ``gaikan predict``): OK /
    NG for a scored image, ``path,,UNREADABLE`` (its error on stderr, exit code 1) or ``path,,SKIPPED``
    (e.g. an unsupported file type; the reason on stderr, exit code unchanged). Notes (sub-folders not
    searched) go to stderr. Exit code 2 when the model cannot be loaded or no file is found."""
    import csv

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 0
    recursive = any(a in ("-r", "--recursive") for a in argv)
    argv = [a for a in argv if a not in ("-r", "--recursive")]
    if len(argv) < 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        scorer = EdgeScorer(argv[0])
        scan = scan_inputs(argv[1:], recursive=recursive)
    except GaikanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in scan.notes:
        print(note, file=sys.stderr)
    status = 0
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["path", "score", "verdict"])
    for out in score_files(scan.rows, scorer.score, batch_size=scorer.batch_size):
        if out.status == SCORED:
            writer.writerow([out.path, f"{out.score:.6g}", scorer.verdicts([out.score])[0]])
            continue
        writer.writerow([out.path, "", out.status])
        print(f"{'skipped' if out.status == SKIPPED else 'error'}: {out.reason}", file=sys.stderr)
        if out.status != SKIPPED:
            status = 1
        sys.stdout.flush()
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
