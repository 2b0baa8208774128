"""Build the broad benchmark of real surfaces (issue 8): MVTec-AD-layout categories made of real
texture photographs that ship in Debian packages, with synthetic defects and their masks.

    python bench/surfaces_data.py [--out bench/.work/surfaces] [--seed 0] [--force]

or, from Python (what bench/surfaces.py calls)::

    from surfaces_data import build_surfaces
    specs = build_surfaces(Path("bench/.work/surfaces"))   # ["mvtec:.../concrete", ...]

Sources (install with ``make bench-deps``): Debian ``openarena-081-textures`` (photographic game
textures, GPL-2+, read from inside its ``pak4-textures.pk3`` zip) and ``mypaint-data-extras`` (paper
and cork scans, GPL-2+). Every source file is pinned by its SHA-256: a changed package is refused,
so a rebuild gives the same images (same seed -> byte-identical PNGs, checked by the build hash).

Per category (``CATEGORIES``) the source image is split into two disjoint horizontal bands: the top
``TRAIN_BAND`` (60 %) gives the training crops, the bottom band the test crops, so no test image
shares pixels with a training image. A crop is a square of 128 * U(0.94, 1.06) pixels at a uniform
random position inside its band, resized to 128 x 128 (Pillow bicubic), flipped at random where
the category allows it, and multiplied by a gain U(0.97, 1.03) (lighting jitter).

Defects (``DEFECTS``; 5 images each, 45 per category), on test-band crops, 9 kinds of 2 origins:
gaikan's own ``gaikan.data.synthetic`` (scratch, spot, cut-paste; low-contrast ones are blended back
towards the clean crop with weight beta) and the independent PyPI package ``defect-synthesis``
0.1.0 (cracks grown by a branching random walk, colour stains with diffused edges, clusters of
pits, and elastic warps that move texture without adding any colour). Folder names are
``<kind>_<size>``; ``surfaces.json`` records for every test image its kind, size class, generator,
mask area and parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import sys
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / ".work" / "surfaces"
RECIPE_VERSION = 2

SIZE = 128  # side of every image, pixels
N_TRAIN = 100
N_TEST_GOOD = 30
N_PER_DEFECT = 5
TRAIN_BAND = 0.6  # share of the source's rows (from the top) that training crops come from
CROP_SCALE = (0.94, 1.06)  # crop side = SIZE * U(CROP_SCALE), resized to SIZE
GAIN = (0.97, 1.03)
MIN_MASK_PIXELS = 6

OPENARENA_PK3 = "/usr/share/games/openarena/baseoa/pak4-textures.pk3"
MYPAINT = "/usr/share/mypaint/backgrounds"


class SurfaceDataError(RuntimeError):
    """A source is missing or not the pinned file, or the output folder is someone else's."""


@dataclass(frozen=True)
class Category:
    name: str
    package: str  # Debian package that ships the source
    file: str  # file on disk
    member: str | None  # member inside ``file`` when it is a zip (OpenArena .pk3), else None
    sha256: str  # first 16 hex digits of the SHA-256 of the source bytes
    flips: str  # "" none, "h" horizontal, "hv" both (only where the material has no up/down)
    material: str


CATEGORIES: tuple[Category, ...] = (
    Category("concrete", "openarena-081-textures", OPENARENA_PK3, "textures/base_wall/concrete.jpg",
             "b1d3852a396682b5", "hv", "grey cast concrete with pores (512 x 512)"),
    Category("rust", "openarena-081-textures", OPENARENA_PK3, "textures/gothic_floor/blocks17floor2.jpg",
             "979d1b8ee2311d33", "hv", "red-brown rusted steel, granular (512 x 512)"),
    Category("tread_plate", "openarena-081-textures", OPENARENA_PK3, "textures/proto2/tin_floor01.jpg",
             "2af06c5006ed2aef", "", "diamond-pattern steel tread plate, periodic studs (512 x 512)"),
    Category("rock", "openarena-081-textures", OPENARENA_PK3, "textures/cosmo_block/rock01.jpg",
             "9665fd1e09be89f3", "", "rough sandstone lit from one side (512 x 512)"),
    Category("wood", "openarena-081-textures", OPENARENA_PK3, "textures/acc_dm5/wood01.jpg",
             "a60d885a8684103d", "h", "weathered wood with horizontal grain (512 x 512)"),
    Category("brushed_metal", "openarena-081-textures", OPENARENA_PK3, "textures/base_trim/dirty_pewter_big.jpg",
             "722d8393f238b7f6", "hv", "dark pewter with fine random scratches (512 x 512)"),
    Category("cork", "mypaint-data-extras", f"{MYPAINT}/ramon/HR_Cork.png", None,
             "abb1c9d5ae5ef55b", "hv", "pressed cork board scan (512 x 512)"),
    Category("paper", "mypaint-data-extras", f"{MYPAINT}/mrmamurk/mamurk_a_1.png", None,
             "01dc26395fd4d1e5", "hv", "grey fibrous drawing paper scan, low contrast (960 x 768)"),
    Category("canvas", "mypaint-data-extras", f"{MYPAINT}/ramon/HR_Canvas 01.png", None,
             "3bbe8fc626a26ef7", "h", "woven painting canvas, fabric-like weave (512 x 512)"),
)


# ---- sources and crops --------------------------------------------------------------------------


def _source_bytes(cat: Category) -> bytes:
    path = Path(cat.file)
    hint = f"install the Debian package {cat.package} (make bench-deps)"
    if not path.is_file():
        raise SurfaceDataError(f"{cat.name}: source {path} not found: {hint}")
    if cat.member is None:
        data = path.read_bytes()
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                data = zf.read(cat.member)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise SurfaceDataError(f"{cat.name}: cannot read {cat.member} from {path}: {exc}") from exc
    found = hashlib.sha256(data).hexdigest()[:16]
    if found != cat.sha256:
        where = f"{path}:{cat.member}" if cat.member else str(path)
        raise SurfaceDataError(f"{cat.name}: source {where} has SHA-256 {found}..., expected "
                               f"{cat.sha256}... (another version of {cat.package}?); the benchmark "
                               "would not be the pinned one")
    return data


def load_source(cat: Category) -> np.ndarray:
    """The category's source photograph as uint8 RGB (H, W, 3), after checking its pin."""
    with Image.open(io.BytesIO(_source_bytes(cat))) as im:
        return np.asarray(im.convert("RGB"))


def _crop(src: np.ndarray, rows: tuple[int, int], cat: Category, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    lo, hi = rows
    side = int(round(SIZE * rng.uniform(*CROP_SCALE)))
    side = min(side, hi - lo, src.shape[1])
    y = int(rng.integers(lo, hi - side + 1))
    x = int(rng.integers(0, src.shape[1] - side + 1))
    patch = Image.fromarray(src[y:y + side, x:x + side]).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    out = np.asarray(patch, dtype=np.float32)
    flip_h = "h" in cat.flips and bool(rng.random() < 0.5)
    flip_v = "v" in cat.flips and bool(rng.random() < 0.5)
    if flip_h:
        out = out[:, ::-1]
    if flip_v:
        out = out[::-1]
    gain = float(rng.uniform(*GAIN))
    out = np.clip(np.round(out * gain), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out), {"y": y, "x": x, "side": side, "flip_h": flip_h, "flip_v": flip_v,
                                       "gain": round(gain, 4)}


# ---- defects -------------------------------------------------------------------------------------


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def _faint(clean: np.ndarray, defective: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """Low contrast: inside the mask move only ``beta`` of the way from the clean to the defective pixel."""
    out = clean.astype(np.float32)
    out[mask] += beta * (defective.astype(np.float32)[mask] - out[mask])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _scratch_small(img, rng):
    from gaikan.data.synthetic import add_scratch

    width, length = float(rng.uniform(1.0, 1.6)), float(rng.uniform(12, 24))
    out, mask = add_scratch(img, rng, width=width, length=length)
    return _to_u8(out), mask, {"width": round(width, 2), "length": round(length, 1)}


def _scratch_lowcontrast(img, rng):
    from gaikan.data.synthetic import add_scratch

    width, length, beta = float(rng.uniform(1.5, 2.5)), float(rng.uniform(25, 50)), float(rng.uniform(0.3, 0.45))
    out, mask = add_scratch(img, rng, width=width, length=length)
    return _faint(img, _to_u8(out), mask, beta), mask, {"width": round(width, 2), "length": round(length, 1),
                                                         "beta": round(beta, 3)}


def _spot_small(img, rng):
    from gaikan.data.synthetic import add_spot

    radius = float(rng.uniform(2.0, 3.5))
    out, mask = add_spot(img, rng, radius=radius)
    return _to_u8(out), mask, {"radius": round(radius, 2)}


def _spot_lowcontrast(img, rng):
    from gaikan.data.synthetic import add_spot

    radius, beta = float(rng.uniform(5.0, 9.0)), float(rng.uniform(0.3, 0.45))
    out, mask = add_spot(img, rng, radius=radius)
    return _faint(img, _to_u8(out), mask, beta), mask, {"radius": round(radius, 2), "beta": round(beta, 3)}


def _cutpaste(img, rng):
    from gaikan.data.synthetic import add_cutpaste

    out, mask = add_cutpaste(img, rng, area=(0.006, 0.025))
    return _to_u8(out), mask, {"area": round(float(mask.mean()), 4)}


def _defect_synthesis(make: Callable, img: np.ndarray, rng: np.random.Generator):
    """Run a ``defect_synthesis`` generator (it draws from the global ``random`` and ``numpy.random``
    states and works on BGR uint8): seeded from ``rng``, global states restored afterwards."""
    seed = int(rng.integers(0, 2**31 - 1))
    saved_py, saved_np = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed)
        generator, params = make()
        result = generator.apply(np.ascontiguousarray(img[..., ::-1]))
    finally:
        random.setstate(saved_py)
        np.random.set_state(saved_np)
    params["seed"] = seed
    return np.ascontiguousarray(result.image[..., ::-1]), result.anomaly_mask > 0, params


def _luminance(img: np.ndarray) -> float:
    """Mean Rec. 601 luminance of a uint8 RGB image, 0..255."""
    return float((img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).mean())


DARK = 100.0  # mean luminance (0..255) below which a crop counts as dark


def _ds_crack(img, rng):
    """defect-synthesis draws cracks dark; on a dark crop (mean luminance < DARK) it runs on the
    inverted crop and the result is inverted back, so the crack is bright there (contrasting, as
    gaikan.data.synthetic's polarity=None does)."""
    from defect_synthesis import CrackGenerator

    kerf = float(rng.uniform(0.35, 0.55))
    invert = _luminance(img) < DARK

    def make():
        return CrackGenerator(base_length_range=(20, 45), base_width_range=(1, 1), branch_probability=0.3,
                              max_branches=2, roughness=1.5, kerf_darkness=kerf), {"kerf_darkness": round(kerf, 3),
                                                                                    "inverted": invert}

    if not invert:
        return _defect_synthesis(make, img, rng)
    out, mask, params = _defect_synthesis(make, 255 - img, rng)
    return 255 - out, mask, params


def _ds_stain(img, rng):
    from defect_synthesis import StainGenerator

    # a colour that shows: pale "water" on dark crops, else oil / rust / chemical
    kind = "water" if _luminance(img) < DARK else ("oil", "rust", "chemical")[int(rng.integers(3))]

    def make():
        return (StainGenerator(radius_range=(6, 12), roughness=0.4, opacity_range=(0.25, 0.45), stain_type=kind),
                {"stain_type": kind})

    return _defect_synthesis(make, img, rng)


def _ds_pits(img, rng):
    from defect_synthesis import PittingGenerator

    def make():
        return (PittingGenerator(cluster_size_range=(3, 8), pit_radius_range=(1, 2), spread_radius=8,
                                 depth_darkness=0.4), {})

    return _defect_synthesis(make, img, rng)


def _ds_warp(img, rng):
    from defect_synthesis import TextureWarpGenerator

    strength = float(rng.uniform(5.0, 8.0))

    def make():
        return (TextureWarpGenerator(warp_radius_range=(12, 22), distortion_strength=strength),
                {"distortion_strength": round(strength, 2)})

    return _defect_synthesis(make, img, rng)


@dataclass(frozen=True)
class DefectKind:
    folder: str  # test/<folder>, ground_truth/<folder>
    kind: str
    size: str  # size class: small | lowcontrast | medium
    generator: str  # "gaikan.data.synthetic" or "defect-synthesis 0.1.0"
    summary: str


DEFECTS: tuple[tuple[DefectKind, Callable], ...] = (
    (DefectKind("scratch_small", "scratch", "small", "gaikan.data.synthetic",
                "add_scratch, width U(1.0, 1.6) px, length U(12, 24) px"), _scratch_small),
    (DefectKind("scratch_lowcontrast", "scratch", "lowcontrast", "gaikan.data.synthetic",
                "add_scratch, width U(1.5, 2.5) px, length U(25, 50) px, blended at beta U(0.3, 0.45)"),
     _scratch_lowcontrast),
    (DefectKind("spot_small", "spot", "small", "gaikan.data.synthetic",
                "add_spot (blob), radius U(2.0, 3.5) px"), _spot_small),
    (DefectKind("spot_lowcontrast", "spot", "lowcontrast", "gaikan.data.synthetic",
                "add_spot (blob), radius U(5, 9) px, blended at beta U(0.3, 0.45)"), _spot_lowcontrast),
    (DefectKind("cutpaste_medium", "cutpaste", "medium", "gaikan.data.synthetic",
                "add_cutpaste, area U(0.6 %, 2.5 %) of the image, flipped + brightness/contrast jitter"),
     _cutpaste),
    (DefectKind("crack_small", "crack", "small", "defect-synthesis 0.1.0",
                "CrackGenerator, length 20-45 px, width 1 px, <= 2 branches, kerf_darkness U(0.35, 0.55); bright on dark crops"),
     _ds_crack),
    (DefectKind("stain_lowcontrast", "stain", "lowcontrast", "defect-synthesis 0.1.0",
                "StainGenerator, radius 6-12 px, opacity 0.25-0.45, water colour on dark crops, else oil|rust|chemical"), _ds_stain),
    (DefectKind("pits_small", "pits", "small", "defect-synthesis 0.1.0",
                "PittingGenerator, 3-8 pits of radius 1-2 px within ~8 px, depth_darkness 0.4"), _ds_pits),
    (DefectKind("warp_medium", "warp", "medium", "defect-synthesis 0.1.0",
                "TextureWarpGenerator, radius 12-22 px, displacement U(5, 8) px (no colour added)"), _ds_warp),
)


def _apply_defect(fn: Callable, clean: np.ndarray, rng: np.random.Generator):
    """Redraw (up to 20 times) until the mask has MIN_MASK_PIXELS pixels and the image changed inside it."""
    for attempt in range(20):
        out, mask, params = fn(clean, rng)
        changed = np.abs(out.astype(np.int16) - clean.astype(np.int16)).max(axis=-1) > 0
        if mask.sum() >= MIN_MASK_PIXELS and (changed & mask).sum() >= MIN_MASK_PIXELS // 2:
            params["attempts"] = attempt + 1
            return out, mask, params
    raise SurfaceDataError(f"{fn.__name__}: no visible defect in 20 draws")


# ---- build ---------------------------------------------------------------------------------------


def recipe(seed: int, categories: tuple[Category, ...] = CATEGORIES) -> dict:
    """Everything that decides the images; a stored build is reused only if this is unchanged."""
    return {
        "recipe_version": RECIPE_VERSION, "seed": int(seed), "size": SIZE, "n_train": N_TRAIN,
        "n_test_good": N_TEST_GOOD, "n_per_defect": N_PER_DEFECT, "train_band": TRAIN_BAND,
        "crop_scale": list(CROP_SCALE), "gain": list(GAIN), "min_mask_pixels": MIN_MASK_PIXELS,
        "categories": [asdict(c) for c in categories], "defects": [asdict(d) for d, _ in DEFECTS],
    }


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", optimize=False, compress_level=6)


def build_category(cat: Category, out_dir: Path, seed: int) -> dict:
    """Write one category (MVTec layout) into ``out_dir`` and return its manifest entry."""
    src = load_source(cat)
    h = src.shape[0]
    split = int(round(TRAIN_BAND * h))
    if split < SIZE * CROP_SCALE[1] + 1 or h - split < SIZE * CROP_SCALE[1] + 1:
        raise SurfaceDataError(f"{cat.name}: source of {h} rows is too small for two bands of {SIZE}-px crops")
    rng = np.random.default_rng([int(seed), zlib.crc32(cat.name.encode())])
    entry = {"name": cat.name, "source_shape": list(src.shape), "train_rows": [0, split], "test_rows": [split, h],
             "images": []}

    def record(rel: str, crop: dict, **extra) -> None:
        entry["images"].append({"file": rel, "crop": crop, **extra})

    for i in range(N_TRAIN):
        img, crop = _crop(src, (0, split), cat, rng)
        rel = f"train/good/{i:03d}.png"
        _save_png(out_dir / rel, img)
        record(rel, crop)
    for i in range(N_TEST_GOOD):
        img, crop = _crop(src, (split, h), cat, rng)
        rel = f"test/good/{i:03d}.png"
        _save_png(out_dir / rel, img)
        record(rel, crop)
    for kind, fn in DEFECTS:
        for i in range(N_PER_DEFECT):
            clean, crop = _crop(src, (split, h), cat, rng)
            img, mask, params = _apply_defect(fn, clean, rng)
            rel = f"test/{kind.folder}/{i:03d}.png"
            _save_png(out_dir / rel, img)
            _save_png(out_dir / f"ground_truth/{kind.folder}/{i:03d}_mask.png", mask.astype(np.uint8) * 255)
            record(rel, crop, kind=kind.kind, size=kind.size, generator=kind.generator,
                   mask_area=round(float(mask.mean()), 5), params=params)
    return entry


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*.png")):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


MANIFEST = "surfaces.json"


def build_surfaces(root: Path = DEFAULT_OUT, seed: int = 0, *, force: bool = False,
                   categories: tuple[Category, ...] = CATEGORIES) -> list[str]:
    """Build (or reuse) every category under ``root`` and return their ``mvtec:`` specs.

    A build whose stored recipe (``root/surfaces.json``) equals the current one is reused as it is.
    Otherwise ``root`` must be empty or absent, or ``force=True`` (then the category folders and the
    manifest are replaced; nothing else under ``root`` is touched).
    """
    root = Path(root)
    wanted = recipe(seed, categories)
    manifest_path = root / MANIFEST
    specs = [f"mvtec:{root / c.name}" for c in categories]
    if manifest_path.is_file():
        stored = json.loads(manifest_path.read_text("utf-8"))
        if stored.get("recipe") == wanted and all((root / c.name / "train" / "good").is_dir() for c in categories):
            return specs
        if not force:
            raise SurfaceDataError(f"{root} holds a surfaces build of another recipe (seed "
                                   f"{stored.get('recipe', {}).get('seed')}); pass force=True / --force to replace it")
    elif root.exists() and any(root.iterdir()) and not force:
        raise SurfaceDataError(f"{root} exists, is not empty and has no {MANIFEST}; refusing to write into it "
                               "(choose another folder or pass force=True / --force)")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    start = time.perf_counter()
    entries = []
    for cat in categories:
        target = root / cat.name
        if target.exists():
            shutil.rmtree(target)
        entry = build_category(cat, target, seed)
        entry["tree_sha256"] = _tree_hash(target)
        entries.append(entry)
    import defect_synthesis

    manifest = {"recipe": wanted, "defect_synthesis_version": defect_synthesis.__version__,
                "build_seconds": round(time.perf_counter() - start, 2), "categories": entries}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n", "utf-8")
    return specs


def write_thumbnails(root: Path, out_dir: Path, *, index: int = 0) -> list[Path]:
    """One strip per category, ``out_dir/<category>.png``: two test goods and image ``index`` of
    every defect folder at 1:1 (128 px) with the defect's bounding box drawn 2 px outside it in
    red, and the masks below (128-colour PNG, so the files stay small)."""
    from PIL import ImageDraw

    root, out_dir = Path(root), Path(out_dir)
    manifest = json.loads((root / MANIFEST).read_text("utf-8"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    gap, label_h = 2, 12
    for entry in manifest["categories"]:
        cat = root / entry["name"]
        tiles = [("good", cat / f"test/good/{i:03d}.png", None) for i in range(2)]
        tiles += [(k.folder, cat / f"test/{k.folder}/{index:03d}.png",
                   cat / f"ground_truth/{k.folder}/{index:03d}_mask.png") for k, _ in DEFECTS]
        step = SIZE + gap
        sheet = Image.new("RGB", (len(tiles) * step - gap, 2 * (SIZE + label_h) + gap), "white")
        draw = ImageDraw.Draw(sheet)
        for j, (label, image_path, mask_path) in enumerate(tiles):
            x = j * step
            with Image.open(image_path) as im:
                sheet.paste(im.convert("RGB"), (x, label_h))
            draw.text((x + 1, 0), label.replace("_", " "), fill="black")
            mask = np.zeros((SIZE, SIZE), bool)
            if mask_path is not None:
                with Image.open(mask_path) as m:
                    mask = np.asarray(m) > 0
            sheet.paste(Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"), (x, 2 * label_h + SIZE + gap))
            if mask.any():
                ys, xs = np.nonzero(mask)
                draw.rectangle((x + xs.min() - 2, label_h + ys.min() - 2, x + xs.max() + 2, label_h + ys.max() + 2),
                               outline=(255, 0, 0))
        draw.text((1, label_h + SIZE + 1), f"{entry['name']} (masks below)", fill="black")
        path = out_dir / f"{entry['name']}.png"
        sheet.quantize(128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace a build of another recipe")
    parser.add_argument("--thumbnails", type=Path, default=None,
                        help="also write one strip per category into this folder (e.g. docs/surfaces)")
    args = parser.parse_args(argv)
    try:
        specs = build_surfaces(args.out, args.seed, force=args.force)
    except SurfaceDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((args.out / MANIFEST).read_text("utf-8"))
    for spec, entry in zip(specs, manifest["categories"]):
        print(f"{spec}  ({len(entry['images'])} images, tree {entry['tree_sha256']})")
    if args.thumbnails is not None:
        for path in write_thumbnails(args.out, args.thumbnails):
            print(f"thumbnails: {path}")
    print(f"manifest {args.out / MANIFEST} (build took {manifest['build_seconds']} s; a build of the same recipe is reused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
