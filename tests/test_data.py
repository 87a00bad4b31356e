"""Tests of pmoe_backdoor.data: canonical arrays, npz validation, subsets, torchvision sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pmoe_backdoor.data import (
    GTSRB_CLASSES,
    Dataset,
    DatasetError,
    load_npz,
    load_source,
    load_torchvision,
    make_synthetic,
    stratified_subset,
)

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


def test_load_npz_not_an_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("this is not a zip archive\n")
    with pytest.raises(DatasetError, match="not a readable npz") as info:
        load_npz(path)
    assert "notes.npz" in str(info.value)


def test_load_npz_object_array_is_not_unpickled(tmp_path):
    arrays = _arrays()
    arrays["classes"] = np.asarray(["a", "b", "c"], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)  # object arrays are stored with pickle
    with pytest.raises(DatasetError, match="pickled.npz"):
        load_npz(path)


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
