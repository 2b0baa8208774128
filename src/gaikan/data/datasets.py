"""Data sets: a data spec string in, train/test :class:`ImageSet` records out.

Data specs (``gaikan fit --data SPEC``)::

    elpv:mono | elpv:poly      ELPV solar cells (PyPI package elpv-dataset), fixed split elpv_split.csv
    mvtec:PATH                 one MVTec AD category: train/good, test/<type>, ground_truth/<type>
    folder:PATH                good/ + one folder per defect type (+ optional ground_truth/<type>)
    idx:PATH[?good=G&defect=D] MNIST-style IDX files; class G is "good", classes D (default: all
                               others) are "defective"

Every loader returns a :class:`DataSplit` whose test set never contains a training image, so
fitting and evaluating on the same spec is honest. Labels: 0 good, 1 defective, -1 uncertain.
"""

from __future__ import annotations

import csv
import gzip
import importlib.resources
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gaikan.data.images import IMAGE_SUFFIXES, list_images, read_image, read_mask, to_gray
from gaikan.errors import DataError

__all__ = [
    "ImageSet",
    "DataSplit",
    "load_data",
    "parse_spec",
    "read_idx",
    "write_idx",
    "SPEC_HELP",
]

SPEC_HELP = "use elpv:mono|elpv:poly, mvtec:PATH, folder:PATH or idx:PATH"

GOOD = "good"


# ---- records ----------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """A list of images with their labels and what is known about them.

    images:        numpy arrays (H, W) or (H, W, C), uint8 or float32 in [0, 1].
    labels:        int64 (N,): 0 good, 1 defective, -1 uncertain.
    paths:         where each image came from (a file path, or ``FILE#INDEX`` for IDX records).
    defect_types:  "good" for good images, else the defect type (folder name, "defect", a digit).
    masks:         ground truth: bool (H, W) per image (all False for a good image), or None for an
                   image without annotation; the whole field is None when the set has no ground
                   truth at all.
    probabilities: ELPV's annotated defect probability per image (None elsewhere).
    classes:       raw class ids (IDX digits) per image, for samplers that work by class.
    """

    images: list[np.ndarray]
    labels: np.ndarray
    paths: list[str]
    defect_types: list[str]
    masks: list[np.ndarray | None] | None = None
    probabilities: np.ndarray | None = None
    classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.images = list(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.paths = [str(p) for p in self.paths]
        self.defect_types = [str(t) for t in self.defect_types]
        n = len(self.images)
        lengths = {"labels": len(self.labels), "paths": len(self.paths),
                   "defect_types": len(self.defect_types)}
        if self.masks is not None:
            self.masks = list(self.masks)
            lengths["masks"] = len(self.masks)
        if self.probabilities is not None:
            self.probabilities = np.asarray(self.probabilities, dtype=np.float64).reshape(-1)
            lengths["probabilities"] = len(self.probabilities)
        if self.classes is not None:
            self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
            lengths["classes"] = len(self.classes)
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"ImageSet with {n} images but lengths {wrong}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def has_masks(self) -> bool:
        """True when the set carries ground truth (``masks`` is a list)."""
        return self.masks is not None

    def subset(self, indices) -> "ImageSet":
        """A new ImageSet with the images at ``indices`` (integer indices or a boolean mask).

        The arrays are shared, not copied.
        """
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean index of shape {idx.shape} for {len(self)} images")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.intp).reshape(-1)
        return ImageSet(
            images=[self.images[i] for i in idx],
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx],
            defect_types=[self.defect_types[i] for i in idx],
            masks=None if self.masks is None else [self.masks[i] for i in idx],
            probabilities=None if self.probabilities is None else self.probabilities[idx],
            classes=None if self.classes is None else self.classes[idx],
        )


@dataclass
class DataSplit:
    """What :func:`load_data` returns: the spec it was loaded from and its train/test sets.

    ``extra`` holds images outside the main metric (ELPV's uncertain cells, label -1).
    """

    spec: str
    train: ImageSet
    test: ImageSet
    extra: ImageSet | None = None


# ---- spec parsing -----------------------------------------------------------------------------


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split ``"kind:argument?key=value&key=value"`` into ``(kind, argument, options)``.

    ``kind`` is lower-cased. Only the text after the last ``?`` is read as options, so a Windows
    path (``folder:C:\\data``) keeps its colon. Raises DataError for a spec without ``kind:``.
    """
    if not isinstance(spec, str):
        raise DataError(f"data spec must be a string, got {type(spec).__name__}")
    kind, sep, rest = spec.strip().partition(":")
    if not sep or not kind:
        raise DataError(f"unknown data spec {spec!r}; {SPEC_HELP}")
    options: dict[str, str] = {}
    argument = rest
    if "?" in rest:
        argument, _, query = rest.rpartition("?")
        for part in filter(None, query.split("&")):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise DataError(f"data spec {spec!r}: option {part!r} is not key=value")
            options[key.strip()] = value.strip()
    return kind.strip().lower(), argument, options


def load_data(spec: str, *, supervised: bool = False, holdout: float = 0.2, seed: int = 0) -> DataSplit:
    """Load a data set by spec (see the module docstring) into a :class:`DataSplit`.

    supervised: also put defective images into ``train`` (ELPV: column ``split_sup``; folder: half
                of each defect folder, chosen with ``seed``; IDX: the defect classes' training
                images). MVTec has no defective training images, so it refuses.
    holdout, seed: ``folder:`` only (the other data sets come with a fixed split): the share of
                ``good/`` held out as test images, drawn with ``numpy.random.default_rng(seed)``.

    Raises DataError for an unknown or malformed spec, a missing path, an empty ``good/`` or
    training set, and a missing mask; an unreadable image raises ImageReadError naming the file.
    """
    kind, argument, options = parse_spec(spec)
    loaders: dict[str, Callable[..., DataSplit]] = {
        "elpv": _load_elpv,
        "mvtec": _load_mvtec,
        "folder": _load_folder,
        "idx": _load_idx,
    }
    if kind not in loaders:
        raise DataError(f"unknown data spec {spec!r}; {SPEC_HELP}")
    allowed = {"idx": {"good", "defect"}}.get(kind, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        hint = f"; {kind}: understands {', '.join(sorted(allowed))}" if allowed else ""
        raise DataError(f"data spec {spec!r}: unknown option(s) {', '.join(unknown)}{hint}")
    if not argument.strip():
        raise DataError(f"data spec {spec!r} names no {'type' if kind == 'elpv' else 'PATH'}; {SPEC_HELP}")
    if not 0.0 <= float(holdout) < 1.0:
        raise DataError(f"holdout must be in [0, 1), got {holdout}")
    return loaders[kind](spec, argument, options, supervised=bool(supervised),
                         holdout=float(holdout), seed=int(seed))


# ---- helpers ----------------------------------------------------------------------------------


def _read_many(paths: Sequence[Path | str], reader: Callable = read_image) -> list[np.ndarray]:
    """Decode files in a few threads (Pillow releases the GIL while decoding); order is kept and
    the first failing file's error propagates."""
    if len(paths) < 8:
        return [reader(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(reader, paths))


def _existing_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a directory")
    return path


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(gt_dir: Path, image: Path, *, same_name: bool) -> Path | None:
    """``gt_dir/<stem>_mask.<suffix>`` (PNG first), and with ``same_name`` also
    ``gt_dir/<name>`` and ``gt_dir/<stem>.png``."""
    suffixes = [".png"] + [s for s in (image.suffix, *IMAGE_SUFFIXES) if s != ".png"]
    candidates = [gt_dir / f"{image.stem}_mask{s}" for s in dict.fromkeys(suffixes)]
    if same_name:
        candidates += [gt_dir / image.name, gt_dir / f"{image.stem}.png"]
    return next((c for c in candidates if c.is_file()), None)


def _check_mask_shape(mask: np.ndarray, image: np.ndarray, mask_path, image_path) -> None:
    if mask.shape != image.shape[:2]:
        raise DataError(
            f"mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but image {image_path} is "
            f"{image.shape[0]}x{image.shape[1]}"
        )


def _load_masks(
    images: list[np.ndarray], paths: list[Path], mask_paths: list[Path | None]
) -> list[np.ndarray | None]:
    """Read the masks named in ``mask_paths`` (None -> all False for good ones is the caller's
    business: here None stays None) and check their sizes against the images."""
    wanted = [p for p in mask_paths if p is not None]
    read = iter(_read_many(wanted, read_mask))
    masks: list[np.ndarray | None] = []
    for image, image_path, mask_path in zip(images, paths, mask_paths):
        if mask_path is None:
            masks.append(None)
            continue
        mask = next(read)
        _check_mask_shape(mask, image, mask_path, image_path)
        masks.append(mask)
    return masks


def _no_mask(image: np.ndarray) -> np.ndarray:
    return np.zeros(image.shape[:2], dtype=bool)


# ---- ELPV -------------------------------------------------------------------------------------


def elpv_data_dir() -> Path:
    """The ``data`` folder of the installed ``elpv_dataset`` package (labels.csv, images/)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the ELPV data set is not installed: pip install elpv-dataset")
    data_dir = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not (data_dir / "labels.csv").is_file() or not (data_dir / "images").is_dir():
        raise DataError(f"the elpv_dataset package at {data_dir.parent} has no data/labels.csv "
                        "and data/images/")
    return data_dir


def _elpv_split_rows() -> list[dict[str, str]]:
    text = importlib.resources.files("gaikan.data").joinpath("elpv_split.csv").read_text("utf-8")
    return list(csv.DictReader(text.splitlines()))


def _elpv_labels(data_dir: Path, rows: list[dict[str, str]]) -> dict[str, float]:
    """The installed package's annotated probability per file, after checking that the fixed
    split describes the same cells (files, types, probabilities up to the split file's 4 decimals)."""
    installed = {}
    for line in (data_dir / "labels.csv").read_text("utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3:
            installed[parts[0]] = (float(parts[1]), parts[2])
    for row in rows:
        found = installed.get(row["file"])
        if found is None or found[1] != row["type"] or abs(found[0] - float(row["probability"])) > 1e-3:
            raise DataError(
                f"elpv_split.csv row {row['file']} ({row['type']}, p={row['probability']}) does not "
                f"match {data_dir / 'labels.csv'} ({found}); is elpv-dataset 1.0.0.post1 installed?"
            )
    return {name: p for name, (p, _) in installed.items()}


def _load_elpv(spec, argument, options, *, supervised, holdout, seed) -> DataSplit:
    cell_type = argument.strip().lower()
    if cell_type not in ("mono", "poly"):
        raise DataError(f"unknown ELPV cell type {argument!r} in {spec!r}; use elpv:mono or elpv:poly")
    data_dir = elpv_data_dir()
    rows = [r for r in _elpv_split_rows() if r["type"] == cell_type]
    probability = _elpv_labels(data_dir, rows)
    column = "split_sup" if supervised else "split"

    def make(part: str) -> ImageSet:
        chosen = [r for r in rows if r[column] == part]
        paths = [data_dir / r["file"] for r in chosen]
        images = [_as_gray_uint8(img) for img in _read_many(paths)]
        labels = np.array([int(r["label"]) for r in chosen], dtype=np.int64)
        kinds = {0: GOOD, 1: "defect", -1: "uncertain"}
        return ImageSet(
            images=images,
            labels=labels,
            paths=[str(p) for p in paths],
            defect_types=[kinds[int(v)] for v in labels],
            masks=None,
            probabilities=np.array([probability[r["file"]] for r in chosen]),
        )

    return DataSplit(spec=spec, train=make("train"), test=make("test"), extra=make("extra"))


def _as_gray_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8 and img.ndim == 2:
        return img
    return np.round(to_gray(img) * 255.0).astype(np.uint8)


# ---- MVTec AD ---------------------------------------------------------------------------------


def _load_mvtec(spec, argument, options, *, supervised, holdout, seed) -> DataSplit:
    root = _existing_dir(Path(argument).expanduser(), "MVTec category folder")
    if supervised:
        raise DataError(f"{spec}: MVTec has no defective training images, so it cannot be used for "
                        "supervised training")
    train_dir = _existing_dir(root / "train" / GOOD, "MVTec training folder")
    train_paths = list_images(train_dir)
    if not train_paths:
        raise DataError(f"no images in {train_dir}")
    test_dir = _existing_dir(root / "test", "MVTec test folder")
    gt_root = root / "ground_truth"

    paths: list[Path] = []
    types: list[str] = []
    mask_paths: list[Path | None] = []
    for type_dir in _subdirs(test_dir):
        for image in list_images(type_dir):
            paths.append(image)
            types.append(type_dir.name)
            if type_dir.name == GOOD:
                mask_paths.append(None)
                continue
            mask = _find_mask(gt_root / type_dir.name, image, same_name=False)
            if mask is None:
                raise DataError(
                    f"no ground-truth mask for {image}: expected {gt_root / type_dir.name / (image.stem + '_mask.png')}"
                )
            mask_paths.append(mask)
    if not paths:
        raise DataError(f"no images in the subfolders of {test_dir}")

    train_images = _read_many(train_paths)
    test_images = _read_many(paths)
    masks = _load_masks(test_images, paths, mask_paths)
    masks = [_no_mask(img) if m is None else m for img, m in zip(test_images, masks)]
    train = ImageSet(train_images, np.zeros(len(train_paths)), train_paths, [GOOD] * len(train_paths))
    test = ImageSet(test_images, [0 if t == GOOD else 1 for t in types], paths, types, masks=masks)
    return DataSplit(spec=spec, train=train, test=test)


# ---- folder -----------------------------------------------------------------------------------


def _load_folder(spec, argument, options, *, supervised, holdout, seed) -> DataSplit:
    root = _existing_dir(Path(argument).expanduser(), "data folder")
    good_dir = root / GOOD
    if not good_dir.is_dir():
        hint = " (an MVTec layout? use mvtec:PATH)" if (root / "train").is_dir() else ""
        raise DataError(f"data folder {root} has no good/ subfolder{hint}")
    good_paths = list_images(good_dir)
    if not good_paths:
        raise DataError(f"no images in {good_dir}")
    gt_root = root / "ground_truth"
    has_gt = gt_root.is_dir()
    defect_dirs = [d for d in _subdirs(root) if d.name not in (GOOD, "ground_truth")]

    rng = np.random.default_rng(seed)
    n_good = len(good_paths)
    n_test_good = min(n_good - 1, int(round(holdout * n_good)))
    order = rng.permutation(n_good)
    test_good = [good_paths[i] for i in np.sort(order[:n_test_good])]
    train_good = [good_paths[i] for i in np.sort(order[n_test_good:])]

    train_paths: list[Path] = list(train_good)
    train_types: list[str] = [GOOD] * len(train_good)
    test_paths: list[Path] = list(test_good)
    test_types: list[str] = [GOOD] * len(test_good)
    for d in defect_dirs:
        files = list_images(d)
        to_train = np.zeros(len(files), dtype=bool)
        if supervised:
            to_train[rng.permutation(len(files))[: len(files) // 2]] = True
        for f, t in zip(files, to_train):
            (train_paths if t else test_paths).append(f)
            (train_types if t else test_types).append(d.name)

    def mask_paths_for(paths: list[Path], types: list[str]) -> list[Path | None]:
        out: list[Path | None] = []
        for p, t in zip(paths, types):
            gt_dir = gt_root / t
            if t == GOOD or not gt_dir.is_dir():
                out.append(None)
                continue
            m = _find_mask(gt_dir, p, same_name=True)
            if m is None:
                raise DataError(f"no ground-truth mask for {p}: expected {gt_dir / (p.stem + '_mask.png')} "
                                f"or {gt_dir / p.name}")
            out.append(m)
        return out

    def make(paths: list[Path], types: list[str], with_masks: bool) -> ImageSet:
        images = _read_many(paths)
        masks = None
        if with_masks:
            masks = _load_masks(images, paths, mask_paths_for(paths, types))
            masks = [_no_mask(img) if (m is None and t == GOOD) else m
                     for img, m, t in zip(images, masks, types)]
        labels = [0 if t == GOOD else 1 for t in types]
        return ImageSet(images, labels, paths, types, masks=masks)

    # train sets of good images only carry no masks (nothing to localise); see ImageSet.masks
    train = make(train_paths, train_types, with_masks=has_gt and supervised)
    test = make(test_paths, test_types, with_masks=has_gt)
    return DataSplit(spec=spec, train=train, test=test)


# ---- IDX (MNIST-style) ------------------------------------------------------------------------

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed files are recognised by content).

    Layout: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32 per dimension,
    then the data in C order, big-endian. Returns a native-endian array of that shape.
    Raises DataError naming the file for a bad magic number, a truncated file or trailing bytes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"IDX file {path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"IDX file {path}: bad magic number 0x{raw[:4].hex()}, expected 0x0000TTNN with type "
            f"TT in {{08,09,0b,0c,0d,0e}} and NN >= 1 dimensions"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise DataError(f"IDX file {path} is truncated: shape {shape} needs {expected} data bytes, "
                        f"found {found}")
    if found > expected:
        raise DataError(f"IDX file {path}: {found - expected} bytes after the data of shape {shape}")
    data = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress`` or the name ends in .gz).

    The inverse of :func:`read_idx`, for tests and for converting data into the IDX layout.
    """
    array = np.asarray(array)
    codes = {(v.kind, v.itemsize): k for k, v in _IDX_TYPES.items()}
    key = (array.dtype.kind, array.dtype.itemsize)
    if key not in codes:
        raise DataError(f"IDX cannot store dtype {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"IDX cannot store an array with {array.ndim} dimensions")
    code = codes[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).tobytes()
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)


_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _idx_file(root: Path, key: str) -> Path:
    for name in _IDX_NAMES[key]:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"IDX folder {root} has no {_IDX_NAMES[key][0]} (or .gz)")


def _idx_pair(root: Path, part: str) -> tuple[np.ndarray, np.ndarray, Path]:
    image_file = _idx_file(root, f"{part}_images")
    label_file = _idx_file(root, f"{part}_labels")
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"IDX file {image_file} holds shape {images.shape}, expected (N, H, W) images")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"IDX file {label_file} holds labels of shape {labels.shape}, expected "
                        f"({len(images)},) to match {image_file.name}")
    return images, labels.astype(np.int64), image_file


def _int_option(spec: str, key: str, value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"data spec {spec!r}: {key}={value!r} is not a class number (or a comma "
                        "list of them)") from None


def _load_idx(spec, argument, options, *, supervised, holdout, seed) -> DataSplit:
    root = _existing_dir(Path(argument).expanduser(), "IDX folder")
    good_list = _int_option(spec, "good", options.get("good", "0"))
    if len(good_list) != 1:
        raise DataError(f"data spec {spec!r}: good= takes exactly one class")
    good = good_list[0]
    train_x, train_y, train_file = _idx_pair(root, "train")
    test_x, test_y, test_file = _idx_pair(root, "test")
    if "defect" in options:
        defect = sorted(set(_int_option(spec, "defect", options["defect"])))
        if not defect:
            raise DataError(f"data spec {spec!r}: defect= names no class")
    else:
        defect = sorted(set(np.unique(np.concatenate([train_y, test_y])).tolist()) - {good})
    if good in defect:
        raise DataError(f"data spec {spec!r}: class {good} is both good and defect")
    selected = np.array([good, *defect], dtype=np.int64)

    def make(x: np.ndarray, y: np.ndarray, file: Path, keep: np.ndarray) -> ImageSet:
        idx = np.flatnonzero(keep)
        classes = y[idx]
        return ImageSet(
            images=[x[i] for i in idx],
            labels=(classes != good).astype(np.int64),
            paths=[f"{file}#{i}" for i in idx],
            defect_types=[GOOD if c == good else str(c) for c in classes],
            classes=classes,
        )

    train_keep = np.isin(train_y, selected) if supervised else train_y == good
    if not np.any(train_y == good):
        raise DataError(f"no training images of the good class {good} in {train_file}")
    train = make(train_x, train_y, train_file, train_keep)
    test = make(test_x, test_y, test_file, np.isin(test_y, selected))
    if len(test) == 0:
        raise DataError(f"no test images of classes {selected.tolist()} in {test_file}")
    return DataSplit(spec=spec, train=train, test=test)
