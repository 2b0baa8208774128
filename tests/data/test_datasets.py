"""Data-set loaders and specs (gaikan.data.datasets)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from gaikan.data import DataSplit, ImageSet, load_data, parse_spec, read_idx
from gaikan.data.datasets import write_idx
from gaikan.errors import DataError, ImageReadError


def save_gray(path, value: int, shape=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def save_mask(path, box, shape=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(shape, np.uint8)
    m[box] = 255
    Image.fromarray(m).save(path)


# ---- specs ---------------------------------------------------------------------------------------


def test_parse_spec():
    assert parse_spec("elpv:mono") == ("elpv", "mono", {})
    assert parse_spec("IDX:/data/mnist?good=3&defect=8") == ("idx", "/data/mnist", {"good": "3", "defect": "8"})
    assert parse_spec("folder:C:\\data\\parts") == ("folder", "C:\\data\\parts", {})
    with pytest.raises(DataError):
        parse_spec("no-colon")
    with pytest.raises(DataError, match="key=value"):
        parse_spec("idx:/x?good")


def test_unknown_and_malformed_specs(tmp_path):
    with pytest.raises(DataError) as info:
        load_data("x:/somewhere")
    assert str(info.value) == (
        "unknown data spec 'x:/somewhere'; use elpv:mono|elpv:poly, mvtec:PATH, folder:PATH or idx:PATH"
    )
    with pytest.raises(DataError, match="unknown data spec"):
        load_data("just-a-path")
    with pytest.raises(DataError, match="elpv:mono or elpv:poly"):
        load_data("elpv:both")
    with pytest.raises(DataError, match="unknown option"):
        load_data(f"folder:{tmp_path}?good=1")
    with pytest.raises(DataError, match="holdout"):
        load_data(f"folder:{tmp_path}", holdout=1.0)


@pytest.mark.parametrize("kind", ["mvtec", "folder", "idx"])
def test_missing_path(tmp_path, kind):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load_data(f"{kind}:{missing}")


# ---- ImageSet ------------------------------------------------------------------------------------


def test_imageset_subset_and_checks():
    images = [np.full((8, 8), i, np.uint8) for i in range(4)]
    s = ImageSet(images, [0, 0, 1, -1], list("abcd"), ["good", "good", "x", "uncertain"],
                 masks=[np.zeros((8, 8), bool)] * 4, probabilities=[0, 0, 1, 0.5])
    assert len(s) == 4 and s.has_masks and s.labels.dtype == np.int64
    sub = s.subset([2, 0])
    assert sub.paths == ["c", "a"] and sub.labels.tolist() == [1, 0]
    assert sub.images[0][0, 0] == 2 and sub.probabilities.tolist() == [1.0, 0.0]
    assert s.subset(s.labels == 0).paths == ["a", "b"]
    assert not ImageSet(images, [0] * 4, list("abcd"), ["good"] * 4).has_masks
    with pytest.raises(ValueError, match="labels"):
        ImageSet(images, [0, 1], list("abcd"), ["good"] * 4)


# ---- MVTec ---------------------------------------------------------------------------------------


def make_mvtec(root):
    for i in range(3):
        save_gray(root / "train" / "good" / f"{i:03d}.png", 100 + i)
    for i in range(2):
        save_gray(root / "test" / "good" / f"{i:03d}.png", 110 + i)
    for i in range(2):
        save_gray(root / "test" / "crack" / f"{i:03d}.png", 50 + i)
        save_mask(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", (slice(2, 6), slice(i, i + 3)))
    save_gray(root / "test" / "hole" / "000.png", 30)
    save_mask(root / "ground_truth" / "hole" / "000_mask.png", (slice(0, 1), slice(0, 16)))
    (root / "license.txt").write_text("x")


def test_mvtec_loads(tmp_path):
    make_mvtec(tmp_path / "cat")
    split = load_data(f"mvtec:{tmp_path / 'cat'}")
    assert isinstance(split, DataSplit) and split.extra is None
    assert len(split.train) == 3 and split.train.labels.tolist() == [0, 0, 0]
    assert split.train.masks is None
    test = split.test
    assert len(test) == 5
    assert test.defect_types == ["crack", "crack", "good", "good", "hole"]
    assert test.labels.tolist() == [1, 1, 0, 0, 1]
    assert test.has_masks
    assert all(m.dtype == bool and m.shape == (16, 16) for m in test.masks)
    assert not test.masks[2].any() and not test.masks[3].any()
    assert test.masks[0].sum() == 12 and test.masks[0][2:6, 0:3].all()
    assert test.masks[4].sum() == 16
    assert test.images[0].dtype == np.uint8 and test.images[0][0, 0] == 50
    assert test.paths[0].endswith("crack/000.png")


def test_mvtec_missing_mask_and_supervised(tmp_path):
    root = tmp_path / "cat"
    make_mvtec(root)
    with pytest.raises(DataError, match="no defective training images"):
        load_data(f"mvtec:{root}", supervised=True)
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"crack/001\.png"):
        load_data(f"mvtec:{root}")


def test_mvtec_empty_train(tmp_path):
    root = tmp_path / "cat"
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in .*train/good"):
        load_data(f"mvtec:{root}")


# ---- folder --------------------------------------------------------------------------------------


def make_folder(root, n_good=10):
    for i in range(n_good):
        save_gray(root / "good" / f"g{i:02d}.png", i)
    for i in range(4):
        save_gray(root / "scratch" / f"s{i}.png", 200 + i)
    # masks: two named <stem>_mask.png, two with the image's own name
    save_mask(root / "ground_truth" / "scratch" / "s0_mask.png", (slice(0, 2), slice(0, 2)))
    save_mask(root / "ground_truth" / "scratch" / "s1_mask.png", (slice(0, 3), slice(0, 3)))
    save_mask(root / "ground_truth" / "scratch" / "s2.png", (slice(0, 4), slice(0, 4)))
    save_mask(root / "ground_truth" / "scratch" / "s3.png", (slice(0, 5), slice(0, 5)))
    for i in range(2):  # a defect type without ground truth
        save_gray(root / "dent" / f"d{i}.bmp", 150 + i)
    (root / ".cache").mkdir()


def test_folder_holdout(tmp_path):
    root = tmp_path / "parts"
    make_folder(root)
    split = load_data(f"folder:{root}")
    train, test = split.train, split.test
    assert len(train) == 8 and train.labels.tolist() == [0] * 8 and train.masks is None
    assert len(test) == 2 + 4 + 2
    assert test.labels.tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert test.defect_types == ["good", "good", "dent", "dent", "scratch", "scratch", "scratch", "scratch"]
    assert not set(train.paths) & set(test.paths)
    assert sorted(train.paths + test.paths[:2]) == sorted(str(p) for p in (root / "good").iterdir())
    # masks: good all False, dent unannotated (None), scratch from either naming
    assert test.has_masks
    assert not test.masks[0].any() and not test.masks[1].any()
    assert test.masks[2] is None and test.masks[3] is None
    assert [int(m.sum()) for m in test.masks[4:]] == [4, 9, 16, 25]


def test_folder_holdout_is_seeded(tmp_path):
    root = tmp_path / "parts"
    make_folder(root, n_good=20)
    a = load_data(f"folder:{root}", seed=3)
    b = load_data(f"folder:{root}", seed=3)
    assert a.train.paths == b.train.paths and a.test.paths == b.test.paths
    held_out = {tuple(load_data(f"folder:{root}", seed=s).test.paths[:4]) for s in range(5)}
    assert len(held_out) > 1
    c = load_data(f"folder:{root}", holdout=0.5, seed=1)
    assert len(c.train) == 10 and c.test.defect_types.count("good") == 10
    assert not set(c.train.paths) & set(c.test.paths)
    d = load_data(f"folder:{root}", holdout=0.0)
    assert len(d.train) == 20 and "good" not in d.test.defect_types


def test_folder_supervised(tmp_path):
    root = tmp_path / "parts"
    make_folder(root)
    unsup = load_data(f"folder:{root}", seed=7)
    sup = load_data(f"folder:{root}", supervised=True, seed=7)
    assert not set(sup.train.paths) & set(sup.test.paths)
    assert sup.train.defect_types.count("scratch") == 2 and sup.train.defect_types.count("dent") == 1
    assert sup.test.defect_types.count("scratch") == 2 and sup.test.defect_types.count("dent") == 1
    assert sup.train.labels.sum() == 3 and len(sup.train) == 8 + 3
    # the same good images are held out with or without supervision
    assert [p for p, t in zip(sup.test.paths, sup.test.defect_types) if t == "good"] == unsup.test.paths[:2]
    assert sup.train.has_masks  # ground truth exists, so train defects carry their masks
    assert load_data(f"folder:{root}", supervised=True, seed=7).train.paths == sup.train.paths


def test_folder_errors(tmp_path):
    root = tmp_path / "parts"
    (root / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in .*parts/good"):
        load_data(f"folder:{root}")
    other = tmp_path / "mvtec_like"
    (other / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no good/ subfolder.*mvtec:PATH"):
        load_data(f"folder:{other}")


def test_folder_missing_mask_in_annotated_type(tmp_path):
    root = tmp_path / "parts"
    make_folder(root)
    (root / "ground_truth" / "scratch" / "s3.png").unlink()
    with pytest.raises(DataError, match=r"scratch/s3\.png"):
        load_data(f"folder:{root}")


def test_unreadable_image_propagates(tmp_path):
    root = tmp_path / "parts"
    make_folder(root)
    bad = root / "good" / "g05.png"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError, match=str(bad)):
        load_data(f"folder:{root}")


# ---- IDX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    arr = (np.arange(2 * 3 * 4).reshape(2, 3, 4) - 5).astype(dtype)
    if np.dtype(dtype) == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, arr)
    raw = (tmp_path / name).read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(tmp_path / name)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_idx_known_bytes(tmp_path):
    # big-endian int16, 1-D of 2 values: magic 0x00000B01, dim 2, values 258 and -2
    (tmp_path / "x").write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 1, 2, 0xFF, 0xFE]))
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), [258, -2])


def test_idx_corrupt(tmp_path):
    good = tmp_path / "ok"
    write_idx(good, np.zeros((3, 4, 4), np.uint8))
    raw = good.read_bytes()
    (tmp_path / "magic").write_bytes(b"\x08\x03" + raw[2:])
    with pytest.raises(DataError, match=r"magic: bad magic number 0x0803"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(raw[:-5])
    with pytest.raises(DataError, match=r"short is truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="long: 1 bytes after"):
        read_idx(tmp_path / "long")
    (tmp_path / "tiny").write_bytes(b"\x00")
    with pytest.raises(DataError, match="tiny is truncated"):
        read_idx(tmp_path / "tiny")
    (tmp_path / "badgz.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(DataError, match="badgz"):
        read_idx(tmp_path / "badgz.gz")


def make_idx(root, gz=False):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    train_y = np.array([0, 1, 2, 3, 3, 8, 0, 3, 8, 5], np.uint8)
    test_y = np.array([3, 8, 1, 0, 3, 8], np.uint8)
    train_x = rng.integers(0, 256, (len(train_y), 12, 12), dtype=np.uint8)
    test_x = rng.integers(0, 256, (len(test_y), 12, 12), dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{ext}", train_x)
    write_idx(root / f"train-labels-idx1-ubyte{ext}", train_y)
    write_idx(root / f"t10k-images-idx3-ubyte{ext}", test_x)
    write_idx(root / f"t10k-labels-idx1-ubyte{ext}", test_y)
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset(tmp_path, gz):
    root = tmp_path / "mnist"
    train_x, train_y, test_x, test_y = make_idx(root, gz)
    split = load_data(f"idx:{root}?good=3&defect=8")
    assert len(split.train) == 3 and split.train.labels.tolist() == [0, 0, 0]
    assert split.train.classes.tolist() == [3, 3, 3]
    np.testing.assert_array_equal(split.train.images[0], train_x[3])
    assert split.train.paths[0].endswith("#3")
    test = split.test
    assert test.classes.tolist() == [3, 8, 3, 8]
    assert test.labels.tolist() == [0, 1, 0, 1]
    assert test.defect_types == ["good", "8", "good", "8"]
    np.testing.assert_array_equal(test.images[1], test_x[1])
    assert test.masks is None

    default = load_data(f"idx:{root}")  # class 0 good, every other class defective
    assert len(default.train) == 2 and len(default.test) == 6
    assert default.test.labels.tolist() == [1, 1, 1, 0, 1, 1]

    sup = load_data(f"idx:{root}?good=3&defect=8", supervised=True)
    assert sup.train.classes.tolist() == [3, 3, 8, 3, 8]
    assert sup.train.labels.tolist() == [0, 0, 1, 0, 1]


def test_idx_dataset_errors(tmp_path):
    root = tmp_path / "mnist"
    make_idx(root)
    with pytest.raises(DataError, match="no training images of the good class 7"):
        load_data(f"idx:{root}?good=7")
    with pytest.raises(DataError, match="both good and defect"):
        load_data(f"idx:{root}?good=3&defect=3,8")
    with pytest.raises(DataError, match="not a class number"):
        load_data(f"idx:{root}?good=three")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_data(f"idx:{root}")
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="expected \\(6,\\)"):
        load_data(f"idx:{root}")


# ---- ELPV (real data from the elpv-dataset package) ----------------------------------------------


@pytest.mark.slow
def test_elpv_mono_unsupervised():
    split = load_data("elpv:mono")
    assert (len(split.train), len(split.test), len(split.extra)) == (412, 489, 173)
    assert split.train.labels.tolist() == [0] * 412
    assert int((split.test.labels == 0).sum()) == 176 and int((split.test.labels == 1).sum()) == 313
    assert set(split.extra.labels.tolist()) == {-1}
    assert set(np.round(split.extra.probabilities, 3).tolist()) == {0.333, 0.667}
    assert set(split.test.defect_types) == {"good", "defect"}
    assert split.train.masks is None and split.test.masks is None
    img = split.test.images[0]
    assert img.dtype == np.uint8 and img.shape == (300, 300)
    assert not set(split.train.paths) & set(split.test.paths)


@pytest.mark.slow
def test_elpv_mono_supervised():
    split = load_data("elpv:mono", supervised=True)
    assert len(split.train) == 412 + 156 and int(split.train.labels.sum()) == 156
    assert len(split.test) == 176 + 157 and int(split.test.labels.sum()) == 157
    assert len(split.extra) == 173
    np.testing.assert_array_equal(split.train.probabilities[split.train.labels == 1], 1.0)


@pytest.mark.slow
def test_elpv_poly_counts():
    split = load_data("elpv:poly")
    assert (len(split.train), len(split.test), len(split.extra)) == (644, 276 + 402, 228)
