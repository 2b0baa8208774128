"""Every input file accounted for: the one place that turns the paths a user gave to a batch job
(``gaikan predict``, ``python -m gaikan.edge``, any other engine) into one row per file found,
reads and scores them, and gives every file its outcome. Torch-free (numpy and Pillow only).

    scan = scan_inputs(["parts/", "extra.png"], recursive=False)
    scan.rows     # [InputRow(path, status, reason)], in order; status PENDING, SKIPPED or UNREADABLE
    scan.notes    # one-line notes for the user, e.g. sub-folders that were not searched
    for out in score_files(scan.rows, score_fn, batch_size=16):   # one Outcome per row, same order
        out.status, out.reason, out.score, out.map, out.image

Rules (``scan_inputs``):

* A folder contributes **every file** directly inside it, sorted by name; with ``recursive=True``
  also every file in its sub-folders at any depth (sorted by relative path; symbolic links to
  folders are followed once, loops are not). Without ``recursive`` a folder that has sub-folders
  gets a note naming them; hidden sub-folders (name starting with ``.``) are never searched.
* A file found in a folder is PENDING (to be read) when its suffix, in any case, is one of
  :data:`gaikan.data.images.IMAGE_SUFFIXES`; otherwise it is SKIPPED with the reason (unsupported
  file type, hidden file, not a regular file such as a FIFO or socket, or a broken symbolic link).
* A file named explicitly is always PENDING: the decoder, not the suffix, decides (a JPEG named
  ``.png`` is read as a JPEG). A FIFO, socket or device named explicitly is UNREADABLE (reading it
  could block forever); a path that does not exist is UNREADABLE "no such file or folder".
* The same file reached twice (a folder and a file in it) gets one row, the first.
* Nothing found at all (only missing paths, empty folders) is a :class:`~gaikan.errors.DataError`:
  there is no batch to account for.

Reading (``read_input``): :func:`gaikan.data.images.read_image` (decoding errors, truncation,
decompression bombs larger than ``max_pixels``), then :func:`gaikan.data.images.image_problem`
(too small, ...): every failure is an :class:`~gaikan.errors.ImageReadError` whose one-line message
names the file. Scoring (``score_files``): PENDING files are read and scored in batches by
``score_fn(list of arrays) -> (scores, maps or None)``; a batch whose scoring raises a GaikanError (or
MemoryError) is scored again image by image, so only the file at fault is UNREADABLE, with the error;
a non-finite score is refused the same way (a NaN would otherwise pass as OK).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from gaikan.data.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, image_problem, read_image
from gaikan.errors import DataError, GaikanError, ImageReadError

__all__ = ["PENDING", "SCORED", "SKIPPED", "UNREADABLE", "InputRow", "InputScan", "Outcome",
           "scan_inputs", "read_input", "score_batch", "score_files"]

PENDING = "PENDING"        # found, to be read and scored
SCORED = "SCORED"          # read and scored (the caller turns the score into OK / NG)
SKIPPED = "SKIPPED"        # found, not tried (the reason says why)
UNREADABLE = "UNREADABLE"  # tried, could not be read or scored (the reason names the file and the problem)


@dataclass
class InputRow:
    """One file found (or one path given that could not be used)."""

    path: str
    status: str = PENDING
    reason: str = ""
    found: bool = True  # False only for a path the user gave that does not exist


@dataclass
class InputScan:
    rows: list[InputRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def pending(self) -> list[InputRow]:
        return [r for r in self.rows if r.status == PENDING]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out


@dataclass
class Outcome:
    """What became of one row: SCORED (with score, map and the decoded image), SKIPPED or UNREADABLE."""

    path: str
    status: str
    reason: str = ""
    score: float | None = None
    map: np.ndarray | None = None
    image: np.ndarray | None = None


def _suffix_list() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def _special_kind(mode: int) -> str | None:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def _classify_found(path: Path) -> InputRow:
    """A file found while listing a folder."""
    name = str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return InputRow(name, SKIPPED, f"{path}: broken symbolic link (its target does not exist)")
    except OSError as exc:
        return InputRow(name, SKIPPED, f"{path}: cannot be inspected ({exc.strerror or exc})")
    kind = _special_kind(mode)
    if kind is not None or not stat.S_ISREG(mode):
        return InputRow(name, SKIPPED, f"{path}: not a regular file ({kind or 'unknown kind'})")
    if path.name.startswith("."):
        return InputRow(name, SKIPPED, f"{path}: hidden file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        shown = path.suffix or "no suffix"
        return InputRow(name, SKIPPED, f"{path}: unsupported file type ({shown}); images are read from "
                                       f"{_suffix_list()} files")
    return InputRow(name, PENDING)


def _walk(folder: Path, recursive: bool, notes: list[str]) -> list[Path]:
    """Every non-directory entry of ``folder`` (and of its sub-folders when recursive), sorted."""
    found: list[Path] = []
    not_searched: list[str] = []
    hidden: list[str] = []
    seen_dirs: set[str] = set()

    def visit(d: Path, rel: str) -> None:
        real = os.path.realpath(d)
        if real in seen_dirs:
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            notes.append(f"note: folder {d} could not be listed ({exc.strerror or exc}); its files are not included")
            return
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symbolic links
            except OSError:
                is_dir = False
            if is_dir:
                shown = f"{rel}{entry.name}/"
                if entry.name.startswith("."):
                    hidden.append(shown)
                elif recursive:
                    visit(Path(entry.path), shown)
                else:
                    not_searched.append(shown)
            else:
                found.append(Path(entry.path))

    visit(folder, "")
    if not_searched:
        listed = ", ".join(not_searched[:5]) + (f", ... ({len(not_searched)} in all)" if len(not_searched) > 5 else "")
        notes.append(f"note: {folder} has {len(not_searched)} sub-folder{'s' * (len(not_searched) > 1)} that "
                     f"{'were' if len(not_searched) > 1 else 'was'} not searched ({listed}); use --recursive to "
                     f"include {'them' if len(not_searched) > 1 else 'it'}")
    if hidden:
        notes.append(f"note: hidden sub-folder{'s' * (len(hidden) > 1)} of {folder} not searched: "
                     + ", ".join(hidden[:5]) + ("" if len(hidden) <= 5 else f", ... ({len(hidden)} in all)"))
    return found


def scan_inputs(inputs: Sequence[str | os.PathLike], *, recursive: bool = False) -> InputScan:
    """Files and folders -> one :class:`InputRow` per file found (see the module docstring for the rules)."""
    scan = InputScan()
    seen: set[str] = set()
    problems: list[str] = []

    def add(row: InputRow, path: Path) -> None:
        try:
            key = os.path.realpath(path)
        except OSError:  # pragma: no cover - realpath does not normally fail
            key = str(path)
        if key in seen:
            return
        seen.add(key)
        scan.rows.append(row)

    for item in inputs:
        p = Path(item)
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            kind = "broken symbolic link" if p.is_symlink() else "no such file or folder"
            scan.rows.append(InputRow(str(p), UNREADABLE, f"{p}: {kind}", found=False))
            problems.append(f"{p} does not exist")
            continue
        except OSError as exc:
            scan.rows.append(InputRow(str(p), UNREADABLE, f"{p}: cannot be inspected ({exc.strerror or exc})",
                                      found=False))
            problems.append(f"{p} cannot be inspected")
            continue
        if stat.S_ISDIR(mode):
            files = _walk(p, recursive, scan.notes)
            if not files:
                problems.append(f"{p} is an empty folder" if not recursive else f"{p} holds no files")
            for f in files:
                add(_classify_found(f), f)
        elif stat.S_ISREG(mode):
            add(InputRow(str(p), PENDING), p)
        else:
            kind = _special_kind(mode) or "not a regular file"
            add(InputRow(str(p), UNREADABLE, f"{p}: not a regular file or folder ({kind})"), p)
    if not any(r.found for r in scan.rows):
        detail = "; ".join(problems) or "no inputs were given"
        extra = "".join(f"; {n.removeprefix('note: ')}" for n in scan.notes)
        raise DataError(f"no input files found: {detail}{extra}")
    return scan


def read_input(path, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> np.ndarray:
    """Decode one file into an array a detector can score, or raise ImageReadError naming the file.

    ``data``: the file's bytes when they are already in memory (``path`` then only names it)."""
    image = read_image(path, max_pixels=max_pixels, data=data)
    problem = image_problem(image)
    if problem is not None:
        raise ImageReadError(f"cannot use image {os.fspath(path)}: it {problem}")
    return image


ScoreFn = Callable[[list], tuple]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def score_batch(paths: Sequence[str], images: Sequence[np.ndarray], score_fn: ScoreFn) -> list[Outcome]:
    """Score decoded images; one Outcome per image. When the whole batch fails (GaikanError or
    MemoryError) each image is scored alone, so only the image at fault gets the error."""

    def run(batch):
        scores, maps = score_fn(list(batch))
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(batch):
            raise GaikanError(f"the scorer returned {len(scores)} scores for {len(batch)} images")
        return scores, maps

    def outcomes(sub_paths, sub_images, scores, maps):
        out = []
        for i, (path, image) in enumerate(zip(sub_paths, sub_images)):
            s = float(scores[i])
            if not np.isfinite(s):
                out.append(Outcome(path, UNREADABLE, f"cannot score image {path}: the detector gave a non-finite "
                                                     f"score ({s})"))
                continue
            amap = None if maps is None else np.asarray(maps[i])
            out.append(Outcome(path, SCORED, score=s, map=amap, image=image))
        return out

    try:
        scores, maps = run(images)
        return outcomes(paths, images, scores, maps)
    except (GaikanError, MemoryError) as exc:
        if len(images) == 1:
            return [Outcome(paths[0], UNREADABLE, f"cannot score image {paths[0]}: {_one_line(exc)}")]
    result: list[Outcome] = []
    for path, image in zip(paths, images):
        result.extend(score_batch([path], [image], score_fn))
    return result


def score_files(rows: Sequence[InputRow], score_fn: ScoreFn, *, batch_size: int = 16,
                max_pixels: int = DEFAULT_MAX_PIXELS,
                read: Callable[..., np.ndarray] | None = None) -> Iterator[Outcome]:
    """One :class:`Outcome` per row, in the rows' order: PENDING rows are read with :func:`read_input`
    (or ``read(path, max_pixels=...)``) and scored ``batch_size`` at a time by ``score_fn``; SKIPPED and
    UNREADABLE rows are passed through with their reason. Images are held for one batch only."""
    if batch_size < 1:
        raise GaikanError(f"batch_size must be >= 1, got {batch_size}")
    reader = read or read_input
    rows = list(rows)
    start = 0
    while start < len(rows):
        chunk, start, pending = [], start, 0
        # take rows until batch_size pending ones are in the chunk
        while start < len(rows) and pending < batch_size:
            chunk.append(rows[start])
            pending += rows[start].status == PENDING
            start += 1
        decoded: dict[int, Outcome] = {}
        ok_idx, ok_paths, ok_images = [], [], []
        for i, row in enumerate(chunk):
            if row.status != PENDING:
                decoded[i] = Outcome(row.path, row.status, row.reason)
                continue
            try:
                image = reader(row.path, max_pixels=max_pixels)
            except GaikanError as exc:
                decoded[i] = Outcome(row.path, UNREADABLE, _one_line(exc))
                continue
            except MemoryError:
                decoded[i] = Outcome(row.path, UNREADABLE, f"cannot read image {row.path}: not enough memory to "
                                                           "decode it")
                continue
            ok_idx.append(i)
            ok_paths.append(row.path)
            ok_images.append(image)
        if ok_images:
            for i, outcome in zip(ok_idx, score_batch(ok_paths, ok_images, score_fn)):
                decoded[i] = outcome
        ok_images = []
        for i in range(len(chunk)):
            yield decoded.pop(i)
