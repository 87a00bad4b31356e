"""Tests of pmoe_backdoor.data.datasets: canonical arrays, npz validation, subsets, torchvision sources, image folders;
and of pmoe_backdoor.data.files: content digests and config-relative paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pmoe_backdoor.data.datasets import (
    GTSRB_CLASSES,
    Dataset,
    DatasetError,
    load_npz,
    load_torchvision,
    make_synthetic,
    stratified_subset,
)
from pmoe_backdoor.data.files import (
    defining_layer,
    file_digest,
    folder_digest,
    resolve_config_path,
    scan_image_folder,
    source_digest,
)
from pmoe_backdoor.data.imagefolder import load_image_folder
from pmoe_backdoor.data.sources import load_source

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED_CIFAR = Path(__file__).parents[2] / "shared/data/cifar10-subset.npz"


# ----------------------------------------------------------------------------------------------------------
# synthetic
# ----------------------------------------------------------------------------------------------------------

def test_make_synthetic_deterministic_and_valid():
    a = make_synthetic(num_classes=4, n_train=64, n_test=16, seed=3)
    b = make_synthetic(num_classes=4, n_train=64, n_test=16, seed=3)
    c = make_synthetic(num_classes=4, n_train=64, n_test=16, seed=4)
    assert a.validate() is a
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.x_train.dtype == np.uint8 and a.x_train.shape == (64, 32, 32, 3)
    assert a.y_train.dtype == np.int64 and a.y_test.shape == (16,)
    assert a.num_classes == 4
    assert np.array_equal(np.bincount(a.y_train), [16] * 4)


def test_make_synthetic_is_learnable_by_class_prototype():
    # each class is a fixed pattern plus noise: nearest class mean classifies the test set well
    ds = make_synthetic(num_classes=5, n_train=200, n_test=50, seed=0)
    means = np.stack([ds.x_train[ds.y_train == c].astype(float).mean(0) for c in range(5)])
    d = ((ds.x_test[:, None].astype(float) - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (d.argmin(1) == ds.y_test).mean() > 0.9


def test_make_synthetic_rejects_one_class():
    with pytest.raises(DatasetError, match="num_classes"):
        make_synthetic(num_classes=1)


# ----------------------------------------------------------------------------------------------------------
# npz loading and validation
# ----------------------------------------------------------------------------------------------------------

def _arrays(num_classes: int = 3, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": (np.arange(n_train) % num_classes).astype(np.int64),
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": (np.arange(n_test) % num_classes).astype(np.int64),
        "classes": np.asarray([f"c{i}" for i in range(num_classes)]),
    }


def test_save_then_load_npz_round_trip(tmp_path):
    ds = make_synthetic(num_classes=3, n_train=30, n_test=9, seed=1)
    path = tmp_path / "ds.npz"
    ds.save(path)
    back = load_npz(path, num_classes=3)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        got, want = getattr(back, name), getattr(ds, name)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert list(back.classes) == list(ds.classes)
    assert back.meta["source"] == ds.meta["source"]  # meta survives the round trip


def test_load_npz_without_meta_records_the_path(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, **_arrays())
    ds = load_npz(path)
    assert ds.meta["source"] == f"npz:{path}"
    assert ds.num_classes == 3


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _without(key):
    def f(a):
        del a[key]
    return f


def _set(key, fn):
    def f(a):
        a[key] = fn(a[key])
    return f


BAD_CASES = {
    "missing-array": (_without("y_test"), "missing array"),
    "x-float32": (_set("x_train", lambda x: x.astype(np.float32) / 255), "must be uint8"),
    "x-28x28": (_set("x_test", lambda x: np.zeros((len(x), 28, 28, 3), np.uint8)), r"\(N, 32, 32, 3\)"),
    "x-channels-first": (_set("x_train", lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                         r"\(N, 32, 32, 3\)"),
    "y-int32": (_set("y_train", lambda y: y.astype(np.int32)), "must be int64"),
    "y-too-large": (_set("y_train", lambda y: np.where(np.arange(len(y)) == 0, 3, y)), r"labels must lie in \[0, 2\]"),
    "y-negative": (_set("y_test", lambda y: np.where(np.arange(len(y)) == 0, -1, y)), r"labels must lie in \[0, 2\]"),
    "y-length": (_set("y_test", lambda y: y[:-1]), "to match"),
    "one-class": (_set("classes", lambda c: c[:1]), "at least 2 class names"),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_load_npz_bad_content(tmp_path, case):
    mutate, problem = BAD_CASES[case]
    arrays = _arrays()
    mutate(arrays)
    path = _write(tmp_path / f"bad_{case}.npz", arrays)
    with pytest.raises(DatasetError, match=problem) as info:
        load_npz(path)
    assert path.name in str(info.value)


def test_load_npz_missing_file(tmp_path):
    path = tmp_path / "nothere.npz"
    with pytest.raises(DatasetError, match="no such file") as info:
        load_npz(path)
    assert "nothere.npz" in str(info.value)


def test_load_npz_not_an_npz(tmp_path, monkeypatch):
    # a text file renamed .npz: numpy would call it pickled data to be loaded unsafely
    (tmp_path / "notes.npz").write_text("this is not a zip archive\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="not an npz file") as info:
        load_npz("notes.npz")
    message = str(info.value)
    assert message.startswith(f"{(tmp_path / 'notes.npz').resolve()}: not an npz file (")
    assert "pickle" not in message and "unsafe" not in message


def test_load_npz_single_npy_array_named_npz(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(DatasetError, match=r"not an npz file \(a single \.npy array"):
        load_npz(path)


def test_load_npz_broken_zip(tmp_path):
    good = _write(tmp_path / "good.npz", _arrays())
    path = tmp_path / "truncated.npz"
    path.write_bytes(good.read_bytes()[:200])  # zip magic, but no central directory
    with pytest.raises(DatasetError, match="not a readable npz file") as info:
        load_npz(path)
    assert str(path.resolve()) in str(info.value)


def test_load_npz_object_array_is_not_unpickled(tmp_path):
    arrays = _arrays()
    arrays["classes"] = np.asarray(["a", "b", "c"], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)  # object arrays are stored with pickle
    with pytest.raises(DatasetError, match="array 'classes' holds Python objects") as info:
        load_npz(path)
    assert str(path.resolve()) in str(info.value)


def test_load_npz_relative_path_errors_are_absolute(tmp_path, monkeypatch):
    _write(tmp_path / "three.npz", _arrays(num_classes=3))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_npz("three.npz", num_classes=5)
    assert str(info.value).startswith(f"{(tmp_path / 'three.npz').resolve()}: expected 5 classes")
    with pytest.raises(DatasetError) as info:
        load_npz("nothere.npz")
    assert str(info.value).startswith(f"{(tmp_path / 'nothere.npz').resolve()}: no such file")


def test_load_npz_num_classes_mismatch(tmp_path):
    path = _write(tmp_path / "three.npz", _arrays(num_classes=3))
    with pytest.raises(DatasetError, match="expected 5 classes") as info:
        load_npz(path, num_classes=5)
    assert "three.npz" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# stratified subsets
# ----------------------------------------------------------------------------------------------------------

def _indexed(y_train: np.ndarray, y_test: np.ndarray, num_classes: int) -> Dataset:
    """A dataset whose images encode their own row index in pixel (0, 0), channels 0 and 1."""
    def imgs(n):
        x = np.zeros((n, 32, 32, 3), np.uint8)
        x[:, 0, 0, 0] = np.arange(n) % 256
        x[:, 0, 0, 1] = np.arange(n) // 256
        return x
    return Dataset(imgs(len(y_train)), y_train.astype(np.int64), imgs(len(y_test)), y_test.astype(np.int64),
                   np.asarray([f"c{i}" for i in range(num_classes)]), {"source": "test"})


def _rows(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(int) + 256 * x[:, 0, 0, 1].astype(int)


def test_stratified_subset_balanced():
    rng = np.random.default_rng(0)
    ds = _indexed(rng.permutation(np.arange(400) % 4), rng.permutation(np.arange(80) % 4), 4)
    sub = stratified_subset(ds, 100, 20, seed=0)
    assert np.array_equal(np.bincount(sub.y_train, minlength=4), [25] * 4)
    assert np.array_equal(np.bincount(sub.y_test, minlength=4), [5] * 4)
    rows = _rows(sub.x_train)
    assert len(np.unique(rows)) == 100  # no duplicates
    assert np.array_equal(sub.y_train, ds.y_train[rows])  # images and labels stay aligned
    assert np.array_equal(rows, np.sort(rows))  # the original order is kept
    sub.validate()
    assert "subset" in sub.meta and sub.meta["source"] == "test"


def test_stratified_subset_seeded():
    rng = np.random.default_rng(1)
    ds = _indexed(rng.permutation(np.arange(300) % 3), np.arange(30) % 3, 3)
    a = stratified_subset(ds, 60, 9, seed=0)
    b = stratified_subset(ds, 60, 9, seed=0)
    c = stratified_subset(ds, 60, 9, seed=1)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(_rows(a.x_train), _rows(c.x_train))


def test_stratified_subset_proportional_largest_remainder():
    # class counts 50/30/20 of 100: a subset of 10 keeps 5/3/2 exactly
    y = np.repeat([0, 1, 2], [50, 30, 20])
    ds = _indexed(y, np.repeat([0, 1, 2], [5, 3, 2]), 3)
    sub = stratified_subset(ds, 10, 5, seed=0)
    assert np.array_equal(np.bincount(sub.y_train, minlength=3), [5, 3, 2])
    # test: shares 2.5 / 1.5 / 1.0 -> floors 2 / 1 / 1, the one left over goes to the lower class index on a tie
    assert np.array_equal(np.bincount(sub.y_test, minlength=3), [3, 1, 1])


def test_stratified_subset_none_or_large_keeps_everything_and_rejects_zero():
    ds = _indexed(np.arange(20) % 2, np.arange(10) % 2, 2)
    full = stratified_subset(ds, None, 1000, seed=0)
    assert np.array_equal(full.x_train, ds.x_train) and np.array_equal(full.y_test, ds.y_test)
    with pytest.raises(DatasetError, match="n_train"):
        stratified_subset(ds, 0, None, seed=0)


def test_load_source_synthetic_with_subset_and_errors(tmp_path):
    ds = load_source({"source": "synthetic", "num_classes": 4, "n_train": 80, "n_test": 40, "seed": 2,
                      "subset": {"n_train": 40, "n_test": 8, "seed": 1}})
    assert len(ds.y_train) == 40 and len(ds.y_test) == 8
    assert np.array_equal(np.bincount(ds.y_train), [10] * 4)
    with pytest.raises(DatasetError, match="path"):
        load_source({"source": "npz"})
    with pytest.raises(DatasetError, match="source"):
        load_source({"source": "kaggle"})


# ----------------------------------------------------------------------------------------------------------
# torchvision sources (offline fakes)
# ----------------------------------------------------------------------------------------------------------

def _colour(label: int, k: int) -> tuple[int, int, int]:
    return (40 + 60 * label, 10 + 30 * k, 7)


def _make_fake_gtsrb(root: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """torchvision's GTSRB layout: gtsrb/GTSRB/Training/<class folder>/*.ppm for train;
    gtsrb/GTSRB/Final_Test/Images/*.ppm plus gtsrb/GT-final_test.csv (';'-separated) for test.
    Every image is a solid colour that encodes (label, k); sizes vary."""
    from PIL import Image

    base = root / "gtsrb"
    sizes = [(40, 35), (29, 31), (52, 44), (33, 33)]
    train = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    for i, (label, k) in enumerate(train):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", sizes[i % 4], _colour(label, k)).save(folder / f"00000_{k:05d}.ppm")
        # the real layout also has a per-class CSV in each folder; it must be ignored
        (folder / f"GT-{label:05d}.csv").write_text("Filename;ClassId\n")
    test = [(2, 0), (0, 0), (1, 0), (0, 1), (2, 1)]  # deliberately not sorted by class
    img_dir = base / "GTSRB" / "Final_Test" / "Images"
    img_dir.mkdir(parents=True)
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, (label, k) in enumerate(test):
        w, h = sizes[(i + 1) % 4]
        Image.new("RGB", (w, h), _colour(label, k)).save(img_dir / f"{i:05d}.ppm")
        lines.append(f"{i:05d}.ppm;{w};{h};1;1;{w - 2};{h - 2};{label}")
    (base / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    return train, test


def test_load_torchvision_gtsrb_offline(tmp_path):
    train, test = _make_fake_gtsrb(tmp_path)
    ds = load_torchvision("gtsrb", tmp_path, download=False)
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (len(train), 32, 32, 3)
    assert ds.x_test.dtype == np.uint8 and ds.x_test.shape == (len(test), 32, 32, 3)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert len(ds.classes) == 43 and ds.num_classes == 43
    assert ds.classes[0] == "Speed limit (20km/h)" and list(ds.classes) == GTSRB_CLASSES
    assert "BILINEAR" in ds.meta["resize"]
    for split, items in (("train", train), ("test", test)):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        # sorted by class, stable within a class (the order torchvision lists them)
        expected = sorted(items, key=lambda t: t[0])
        assert list(y) == [label for label, _ in expected]
        for img, (label, k) in zip(x, expected):
            assert (img == np.asarray(_colour(label, k), np.uint8)).all()  # whole image, resized, aligned


def test_load_torchvision_gtsrb_resize_is_pil_bilinear(tmp_path):
    from PIL import Image

    _make_fake_gtsrb(tmp_path)
    # replace one training image by a patterned one, to see the resize filter
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (41, 37, 3), dtype=np.uint8)
    path = tmp_path / "gtsrb" / "GTSRB" / "Training" / "00001" / "00000_00000.ppm"
    Image.fromarray(arr).save(path)
    ds = load_torchvision("gtsrb", tmp_path, download=False)
    expected = np.asarray(Image.fromarray(arr).resize((32, 32), Image.BILINEAR))
    i = int(np.flatnonzero(ds.y_train == 1)[0])
    assert np.array_equal(ds.x_train[i], expected)


def test_load_torchvision_cifar10_with_fake(monkeypatch, tmp_path):
    import torchvision

    rng = np.random.default_rng(0)
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            n = 7 if train else 4
            self.targets = [2, 0, 1, 0, 2, 1, 0][:n] if train else [1, 0, 2, 0]
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.data[:, 0, 0, 0] = np.arange(n)  # remember the original row
            self.classes = ["airplane", "automobile", "bird"]

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    ds = load_torchvision("cifar10", tmp_path, download=False)
    assert calls == [(str(tmp_path), True, False), (str(tmp_path), False, False)]
    assert list(ds.classes) == ["airplane", "automobile", "bird"]
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    # stable sort by class: the original rows in order within each class
    assert list(ds.y_train) == [0, 0, 0, 1, 1, 2, 2]
    assert list(ds.x_train[:, 0, 0, 0]) == [1, 3, 6, 2, 5, 0, 4]
    assert list(ds.y_test) == [0, 0, 1, 2]
    assert list(ds.x_test[:, 0, 0, 0]) == [1, 3, 0, 2]
    assert ds.meta["source"] == "torchvision.datasets.CIFAR10"


def test_load_torchvision_unknown_name(tmp_path):
    with pytest.raises(DatasetError, match="mnist"):
        load_torchvision("mnist", tmp_path, download=False)


# ----------------------------------------------------------------------------------------------------------
# content digests and config-relative paths (pmoe_backdoor.data.files)
# ----------------------------------------------------------------------------------------------------------

def _replace_keeping_mtime(path: Path, content: bytes) -> None:
    """Rewrite a file's bytes and put its old modification time back (what a copy with `cp -p` or an
    unpacked archive does): only a content digest notices."""
    st = path.stat()
    path.write_bytes(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def test_file_digest_is_the_sha256_and_follows_a_replaced_file(tmp_path):
    path = tmp_path / "data.npz"
    path.write_bytes(b"first version")
    digest = file_digest(path)
    assert digest == "sha256:" + hashlib.sha256(b"first version").hexdigest()
    assert file_digest(path) == digest  # cached: the same answer
    _replace_keeping_mtime(path, b"other version")  # same size, same mtime
    assert file_digest(path) == "sha256:" + hashlib.sha256(b"other version").hexdigest()
    os.utime(path)  # a new mtime alone leaves the digest as it is
    assert file_digest(path) == "sha256:" + hashlib.sha256(b"other version").hexdigest()


def test_file_digest_is_cached_by_stat(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(1000))
    first = file_digest(path)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert file_digest(path) == first and opened == []


def test_source_digest_by_source(tmp_path):
    path = tmp_path / "data.npz"
    path.write_bytes(b"x")
    assert source_digest("npz", path) == file_digest(path)
    assert source_digest("npz", tmp_path / "missing.npz") is None  # Snakemake reports the missing input
    assert source_digest("torchvision", path) is None and source_digest("synthetic", path) is None
    assert source_digest("imagefolder", tmp_path) == folder_digest(tmp_path)


def test_folder_digest_follows_what_the_reader_reads(tmp_path):
    root = _make_image_folder(tmp_path / "images")
    digest = folder_digest(root)
    assert digest.startswith("sha256:") and folder_digest(root) == digest
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # the reader ignores it: so does the digest
    os.utime(root / "train" / "cat" / "a.png")  # a new mtime, the same content
    assert folder_digest(root) == digest
    image = root / "train" / "dog" / "b.JPG"
    original = image.read_bytes()
    _replace_keeping_mtime(image, original[:-1] + bytes([original[-1] ^ 1]))  # one bit, same size and mtime
    assert folder_digest(root) != digest
    _replace_keeping_mtime(image, original)
    assert folder_digest(root) == digest
    (root / "train" / "dog" / "b.JPG").rename(root / "train" / "dog" / "c.JPG")  # a renamed image
    assert folder_digest(root) != digest


def test_scan_image_folder_lists_images_by_class(tmp_path):
    root = _make_image_folder(tmp_path / "images")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    found = scan_image_folder(root)
    assert list(found) == ["train", "test"]
    assert list(found["train"]) == ["bird", "cat", "dog"]
    assert found["train"]["cat"] == ["train/cat/a.png", "train/cat/b.jpeg", "train/cat/sub/c.png"]
    assert scan_image_folder(tmp_path / "missing") == {}


def test_defining_layer_last_one_wins():
    keys = ("datasets", "cifar10", "path")
    layers = [
        ("a", {"datasets": {"cifar10": {"source": "npz", "path": "x.npz"}}}),
        ("b", {"datasets": {"cifar10": {"path": "y.npz"}}}),
        ("c", {"datasets": {"cifar10": {"paper_name": "cifar10"}}}),  # merged in, but without a path
        ("d", {"datasets": {"gtsrb": {"path": "z.npz"}}, "device": "cpu"}),
    ]
    assert defining_layer(keys, layers) == "b"
    assert defining_layer(keys, layers[:1]) == "a"
    assert defining_layer(("datasets", "gtsrb", "path"), layers) == "d"
    assert defining_layer(("datasets", "other", "path"), layers) is None
    assert defining_layer(("device", "path"), layers) is None  # a string is no mapping


def test_resolve_config_path(tmp_path, monkeypatch):
    config_dir = tmp_path / "project" / "config"
    assert resolve_config_path("../../shared/data/x.npz", config_dir) == str(tmp_path / "shared/data/x.npz")
    assert resolve_config_path("/abs/x.npz", config_dir) == "/abs/x.npz"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_config_path("~/x.npz", config_dir) == str(tmp_path / "home" / "x.npz")


# ----------------------------------------------------------------------------------------------------------
# image folders
# ----------------------------------------------------------------------------------------------------------

IMAGE_FOLDER = {  # split/class/file: (width, height, colour)
    "train/bird/x.png": (32, 32, (10, 200, 30)),
    "train/cat/a.png": (40, 35, (200, 20, 20)),
    "train/cat/b.jpeg": (20, 24, (180, 40, 40)),
    "train/cat/sub/c.png": (64, 64, (220, 10, 10)),
    "train/dog/a.png": (33, 33, (20, 20, 200)),
    "train/dog/b.JPG": (50, 30, (30, 30, 180)),
    "test/bird/y.PNG": (16, 16, (15, 190, 35)),
    "test/cat/t.jpg": (45, 45, (210, 30, 30)),
    "test/dog/u.png": (32, 32, (25, 25, 190)),
}


def _make_image_folder(root: Path) -> Path:
    from PIL import Image

    for rel, (w, h, colour) in IMAGE_FOLDER.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
        Image.new("RGB", (w, h), colour).save(path, format=fmt)
    return root


def test_load_image_folder(tmp_path):
    from PIL import Image

    root = _make_image_folder(tmp_path / "images")
    # a patterned palette image, to see the resize filter (and the conversion to RGB)
    rng = np.random.default_rng(0)
    pattern = Image.fromarray(rng.integers(0, 256, (41, 37, 3), dtype=np.uint8)).convert("P")
    pattern.save(root / "train" / "dog" / "p.png")
    (root / "test" / "dog" / "readme.txt").write_text("ignored")
    ds = load_image_folder(root)
    assert list(ds.classes) == ["bird", "cat", "dog"]
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (7, 32, 32, 3)
    assert ds.y_train.dtype == np.int64 and list(ds.y_train) == [0, 1, 1, 1, 2, 2, 2]
    assert list(ds.y_test) == [0, 1, 2] and ds.x_test.shape == (3, 32, 32, 3)
    # rows by class, then path: dog is a.png, b.JPG, p.png; PNG colours survive exactly, JPEG nearly
    assert (ds.x_train[0] == (10, 200, 30)).all() and (ds.x_train[1] == (200, 20, 20)).all()
    assert np.abs(ds.x_train[2].astype(int) - (180, 40, 40)).max() <= 8
    expected = np.asarray(pattern.convert("RGB").resize((32, 32), Image.BILINEAR))
    assert np.array_equal(ds.x_train[6], expected)
    assert ds.meta["source"] == f"imagefolder:{root.resolve()}"
    assert ds.meta["resize"] == "whole image to 32x32, PIL.Image.BILINEAR"
    nearest = load_image_folder(root, resize_filter="nearest")
    assert np.array_equal(nearest.x_train[6], np.asarray(pattern.convert("RGB").resize((32, 32), Image.NEAREST)))
    assert nearest.meta["resize"].endswith("PIL.Image.NEAREST")


def test_load_image_folder_class_names_file(tmp_path):
    root = _make_image_folder(tmp_path / "images")
    (root / "classes.txt").write_text("Bird\nCat\nDog\n")
    assert list(load_image_folder(root).classes) == ["Bird", "Cat", "Dog"]
    (root / "classes.txt").write_text("Bird\nCat\n")
    with pytest.raises(DatasetError, match="2 class names for 3 class folders"):
        load_image_folder(root)


def test_load_source_image_folder_with_subset_and_digest(tmp_path):
    root = _make_image_folder(tmp_path / "images")
    for k in range(4):  # enough images for a stratified subset
        (root / "train" / "bird" / f"x{k}.png").write_bytes((root / "train" / "bird" / "x.png").read_bytes())
    digest = folder_digest(root)
    spec = {"source": "imagefolder", "path": str(root), "resize_filter": "bicubic", "digest": digest,
            "subset": {"n_train": 6, "n_test": 3, "seed": 0}}
    ds = load_source(spec)
    assert len(ds.y_train) == 6 and np.array_equal(np.bincount(ds.y_train), [3, 2, 1])
    assert ds.meta["digest"] == digest and ds.meta["resize"].endswith("BICUBIC") and "subset" in ds.meta
    (root / "train" / "bird" / "x3.png").unlink()
    with pytest.raises(DatasetError, match="changed after the workflow was planned"):
        load_source(spec)
    with pytest.raises(DatasetError, match="resize_filter"):
        load_source(dict(spec, digest=None, resize_filter="sharp"))
    with pytest.raises(DatasetError, match="expected 4 classes"):
        load_source(dict(spec, digest=None, num_classes=4))


def test_load_source_npz_digest(tmp_path):
    path = _write(tmp_path / "data.npz", _arrays())
    spec = {"source": "npz", "path": str(path), "digest": file_digest(path)}
    assert load_source(spec).meta["digest"] == spec["digest"]
    _replace_keeping_mtime(path, _npz_bytes(_arrays(n_train=9)))
    with pytest.raises(DatasetError, match="changed after the workflow was planned") as info:
        load_source(spec)
    assert str(path.resolve()) in str(info.value)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _break(root: Path, case: str) -> Path:
    if case == "missing-folder":
        return root / "nope"
    if case == "missing-test":
        for f in sorted((root / "test").rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
        (root / "test").rmdir()
    elif case == "no-classes":
        for f in sorted((root / "train").rglob("*"), reverse=True):
            f.rmdir() if f.is_dir() else f.unlink()
    elif case == "test-classes-differ":
        (root / "test" / "dog").rename(root / "test" / "wolf")
    elif case == "empty-class":
        for f in (root / "test" / "cat").iterdir():
            f.unlink()
        (root / "test" / "cat" / "notes.txt").write_text("no images here")
    elif case == "unreadable-image":
        (root / "train" / "dog" / "b.JPG").write_text("not a jpeg")
    elif case == "one-class":
        for cls in ("bird", "dog"):
            for split in ("train", "test"):
                for f in sorted((root / split / cls).rglob("*"), reverse=True):
                    f.unlink()
                (root / split / cls).rmdir()
    return root


IMAGE_FOLDER_ERRORS = {  # the path the error starts with, relative to tmp_path, and what it says
    "missing-folder": ("images/nope", "no such folder"),
    "missing-test": ("images/test", "no such folder"),
    "no-classes": ("images/train", "no class folders"),
    "test-classes-differ": ("images/test", r"class folders must be those of .*train; missing \['dog'\], "
                                           r"not in train \['wolf'\]"),
    "empty-class": ("images/test/cat", r"no images \(looked for .bmp, .gif, .jpeg, .jpg, .png"),
    "unreadable-image": ("images/train/dog/b.JPG", "unreadable image"),
    "one-class": ("images", "at least 2 class names"),
}


@pytest.mark.parametrize("case", list(IMAGE_FOLDER_ERRORS), ids=list(IMAGE_FOLDER_ERRORS))
def test_load_image_folder_errors_name_the_folder(tmp_path, monkeypatch, case):
    root = _break(_make_image_folder(tmp_path / "images"), case)
    named, problem = IMAGE_FOLDER_ERRORS[case]
    monkeypatch.chdir(tmp_path)  # a relative path: the error names the absolute one
    with pytest.raises(DatasetError, match=problem) as info:
        load_source({"source": "imagefolder", "path": os.path.relpath(root, tmp_path)})
    assert str(info.value).startswith(f"{tmp_path.resolve() / named}: "), str(info.value)


# ----------------------------------------------------------------------------------------------------------
# the real shared subset (optional)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"shared data file {SHARED_CIFAR} is not present")
def test_shared_cifar10_subset():
    ds = load_npz(SHARED_CIFAR, num_classes=10)
    ds.validate()
    assert ds.x_train.shape == (10_000, 32, 32, 3)
    assert ds.x_test.shape == (2_000, 32, 32, 3)
    assert ds.num_classes == 10
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
    # README: exactly 1,000 training and 200 test images per class
    assert np.array_equal(np.bincount(ds.y_train, minlength=10), [1000] * 10)
    assert np.array_equal(np.bincount(ds.y_test, minlength=10), [200] * 10)
