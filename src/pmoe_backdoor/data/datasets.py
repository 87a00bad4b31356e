"""Datasets in one canonical form.

A prepared dataset is four arrays plus class names, exactly as in ``../shared/data/*.npz``:
``x_train`` / ``x_test`` uint8 (N, 32, 32, 3) RGB channels-last, ``y_train`` / ``y_test`` int64 class
indices, ``classes`` a string array. Four sources produce it: torchvision's downloaders (CIFAR10 and GTSRB,
checksummed by torchvision), a local npz file (validated), a folder of image files (``imagefolder``) and a
deterministic synthetic generator. Errors name files by their absolute path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import save_npz

IMAGE_SHAPE = (32, 32, 3)
GTSRB_RESIZE_FILTER = "PIL.Image.BILINEAR"  # recorded in the prepared file's metadata
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an npz is a zip archive (the second: an empty one)
NPY_MAGIC = b"\x93NUMPY"


class DatasetError(ValueError):
    """A dataset file or source that is not in the expected form."""


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def validate(self, origin: str = "dataset") -> "Dataset":
        validate_arrays(
            {"x_train": self.x_train, "y_train": self.y_train, "x_test": self.x_test,
             "y_test": self.y_test, "classes": self.classes},
            origin,
        )
        return self

    def save(self, path: str | os.PathLike) -> None:
        extra = {f"meta_{k}": np.asarray(str(v)) for k, v in self.meta.items()}
        save_npz(path, x_train=self.x_train, y_train=self.y_train, x_test=self.x_test,
                 y_test=self.y_test, classes=np.asarray(self.classes, dtype=str), **extra)


def validate_arrays(arrays: dict[str, np.ndarray], origin: str) -> None:
    """Check shapes, dtypes and label ranges; raise :class:`DatasetError` naming ``origin`` and the problem."""
    required = ("x_train", "y_train", "x_test", "y_test", "classes")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DatasetError(f"{origin}: missing array(s) {missing}; expected {list(required)}")
    classes = arrays["classes"]
    if classes.ndim != 1 or len(classes) < 2:
        raise DatasetError(f"{origin}: 'classes' must be a 1-D array of at least 2 class names, "
                           f"got shape {classes.shape}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise DatasetError(f"{origin}: 'x_{split}' must be uint8 (0-255 pixels), got {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
            raise DatasetError(f"{origin}: 'x_{split}' must have shape (N, 32, 32, 3) (channels last), got {x.shape}")
        if y.dtype != np.int64:
            raise DatasetError(f"{origin}: 'y_{split}' must be int64 class indices, got {y.dtype}")
        if y.shape != (x.shape[0],):
            raise DatasetError(f"{origin}: 'y_{split}' must have shape ({x.shape[0]},) to match 'x_{split}', "
                               f"got {y.shape}")
        if len(y) == 0:
            raise DatasetError(f"{origin}: the {split} split is empty")
        if y.min() < 0 or y.max() >= len(classes):
            raise DatasetError(
                f"{origin}: 'y_{split}' labels must lie in [0, {len(classes) - 1}] for {len(classes)} classes, "
                f"found [{y.min()}, {y.max()}]")


def load_npz(path: str | os.PathLike, num_classes: int | None = None) -> Dataset:
    """Load and validate a dataset in the canonical form (no pickle)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise DatasetError(f"{path}: no such file (expected an npz with x_train, y_train, x_test, y_test, classes)")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head.startswith(ZIP_MAGIC):
        # numpy would take any other file for a pickle and say so; say what the file is not instead
        what = "a single .npy array" if head.startswith(NPY_MAGIC) else f"it starts with {head!r}"
        raise DatasetError(f"{path}: not an npz file ({what}; an npz is a zip archive of .npy arrays, "
                           "as numpy.savez writes)")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                try:
                    arrays[key] = f[key]
                except ValueError as exc:  # an object array: reading it would unpickle
                    raise DatasetError(f"{path}: array {key!r} holds Python objects (pickled), which are not "
                                       "loaded; store strings with a plain dtype, e.g. np.asarray(names, dtype=str)"
                                       ) from exc
    except DatasetError:
        raise
    except Exception as exc:  # zipfile / format errors
        raise DatasetError(f"{path}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
    validate_arrays(arrays, str(path))
    if num_classes is not None and len(arrays["classes"]) != num_classes:
        raise DatasetError(f"{path}: expected {num_classes} classes, the file has {len(arrays['classes'])}")
    meta = {k[5:]: str(v) for k, v in arrays.items() if k.startswith("meta_")}
    meta.setdefault("source", f"npz:{path}")
    return Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                   arrays["classes"].astype(str), meta)


def make_synthetic(num_classes: int = 10, n_train: int = 1000, n_test: int = 200, seed: int = 0,
                   noise: float = 40.0) -> Dataset:
    """A deterministic, learnable dataset: each class is a smooth random colour pattern plus pixel noise."""
    if num_classes < 2:
        raise DatasetError(f"synthetic: num_classes must be at least 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    # upsample the 4x4 prototypes to 32x32 by pixel repetition: large, position-dependent colour blocks
    prototypes = coarse.repeat(8, axis=1).repeat(8, axis=2)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n, dtype=np.int64) % num_classes
        rng.shuffle(y)
        x = prototypes[y] + rng.normal(0, noise, size=(n, *IMAGE_SHAPE))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    classes = np.asarray([f"class_{c}" for c in range(num_classes)])
    return Dataset(x_train, y_train, x_test, y_test, classes,
                   {"source": f"synthetic(num_classes={num_classes}, seed={seed}, noise={noise})"})


def stratified_subset(ds: Dataset, n_train: int | None, n_test: int | None, seed: int) -> Dataset:
    """Draw a seeded, class-stratified subset (per-class counts proportional to the full split)."""
    rng = np.random.default_rng(seed)

    def pick(y: np.ndarray, n: int | None, split: str) -> np.ndarray:
        if n is None or n >= len(y):
            return np.arange(len(y))
        if n <= 0:
            raise DatasetError(f"subset: n_{split} must be positive, got {n}")
        counts = np.bincount(y, minlength=ds.num_classes)
        quota = np.floor(counts * n / len(y)).astype(int)
        # hand the remainder to the classes with the largest fractional parts (ties by class index)
        remainder = n - quota.sum()
        frac = counts * n / len(y) - quota
        quota[np.argsort(-frac, kind="stable")[:remainder]] += 1
        chosen = [rng.choice(np.flatnonzero(y == c), q, replace=False) for c, q in enumerate(quota) if q > 0]
        return np.sort(np.concatenate(chosen))

    tr, te = pick(ds.y_train, n_train, "train"), pick(ds.y_test, n_test, "test")
    meta = dict(ds.meta, subset=f"n_train={len(tr)}, n_test={len(te)}, seed={seed}")
    return Dataset(ds.x_train[tr], ds.y_train[tr], ds.x_test[te], ds.y_test[te], ds.classes, meta)


def _sort_by_class(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # the authors' arrays were sorted by class; a stable sort keeps the original order within a class
    order = np.argsort(y, kind="stable")
    return x[order], y[order]


def load_torchvision(name: str, root: str | os.PathLike, download: bool = True) -> Dataset:
    """Build the canonical form from torchvision's CIFAR10 or GTSRB (torchvision checks the archives' MD5).

    GTSRB images are whole images (no ROI crop) resized to 32x32 with PIL bilinear, as recorded in
    ``meta['resize']``. Both splits are sorted by class, like the authors' ``*_sorted.npy`` files.
    """
    import torchvision

    root = Path(root)
    if name == "cifar10":
        splits = []
        for train in (True, False):
            d = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
            splits.append(_sort_by_class(np.asarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64)))
        classes = np.asarray(d.classes)
        meta = {"source": "torchvision.datasets.CIFAR10"}
    elif name == "gtsrb":
        from PIL import Image

        splits = []
        for split in ("train", "test"):
            d = torchvision.datasets.GTSRB(str(root), split=split, download=download)
            xs, ys = [], []
            for path, label in d._samples:  # (path, class id) pairs; the images have varied sizes
                with Image.open(path) as im:
                    xs.append(np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.uint8))
                ys.append(label)
            splits.append(_sort_by_class(np.stack(xs), np.asarray(ys, dtype=np.int64)))
        classes = np.asarray(GTSRB_CLASSES)
        meta = {"source": "torchvision.datasets.GTSRB", "resize": f"whole image to 32x32, {GTSRB_RESIZE_FILTER}"}
    else:
        raise DatasetError(f"torchvision source: unknown dataset name {name!r}; expected 'cifar10' or 'gtsrb'")
    (x_train, y_train), (x_test, y_test) = splits
    return Dataset(x_train, y_train, x_test, y_test, classes, meta).validate(
        f"torchvision {name} in {root.resolve()}")


GTSRB_CLASSES = [
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
]
