"""A folder of image files (torchvision's ImageFolder layout) read into the canonical form.

``root/train/<class>/*`` and ``root/test/<class>/*``, in any format Pillow reads (see
:data:`~pmoe_backdoor.data.files.IMAGE_EXTENSIONS`). Class indices follow the sorted class-folder names of
``train/``; ``test/`` must have the same ones. An optional ``root/classes.txt`` (one name a line, in that order)
gives the class names, else the folder names are the names. Every image is converted to RGB and resized, whole,
to 32x32 with the chosen Pillow filter (recorded in the dataset's ``meta['resize']``; images already 32x32 are
kept as they are). Rows are ordered by class, then by file path, like ``../shared/tools/image_tar_to_npz.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .datasets import IMAGE_SHAPE, Dataset, DatasetError
from .files import CLASS_NAMES_FILE, IMAGE_EXTENSIONS, SPLITS, scan_image_folder

# config name -> Pillow's name (PIL.Image.Resampling); bilinear like the GTSRB download (data.GTSRB_RESIZE_FILTER)
RESIZE_FILTERS = {"nearest": "NEAREST", "box": "BOX", "bilinear": "BILINEAR", "hamming": "HAMMING",
                  "bicubic": "BICUBIC", "lanczos": "LANCZOS"}
LAYOUT = "an image folder holds train/<class>/<images> and test/<class>/<images>"


def image_folder_files(root: str | os.PathLike) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Check the layout; return the class folders and, per split, ``(relative path, class index)`` pairs."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder ({LAYOUT})")
    found = scan_image_folder(root)
    for split in SPLITS:
        if split not in found:
            raise DatasetError(f"{root / split}: no such folder ({LAYOUT})")
    classes = list(found["train"])
    if not classes:
        raise DatasetError(f"{root / 'train'}: no class folders ({LAYOUT})")
    if list(found["test"]) != classes:
        missing = sorted(set(classes) - set(found["test"]))
        extra = sorted(set(found["test"]) - set(classes))
        raise DatasetError(f"{root / 'test'}: its class folders must be those of {root / 'train'}; "
                           f"missing {missing}, not in train {extra}")
    rows: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        rows[split] = []
        for index, cls in enumerate(classes):
            files = found[split][cls]
            if not files:
                raise DatasetError(f"{root / split / cls}: no images (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                                   "any case)")
            rows[split] += [(rel, index) for rel in files]
    return classes, rows


def class_names(root: Path, folders: list[str]) -> list[str]:
    path = root / CLASS_NAMES_FILE
    if not path.is_file():
        return folders
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise DatasetError(f"{path}: {len(names)} class names for {len(folders)} class folders in {root / 'train'}")
    return names


def read_image(path: Path, resample: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        return np.asarray(rgb.resize((IMAGE_SHAPE[1], IMAGE_SHAPE[0]), resample), dtype=np.uint8)
    except Exception as exc:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DatasetError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


def load_image_folder(root: str | os.PathLike, resize_filter: str = "bilinear",
                      num_classes: int | None = None) -> Dataset:
    """Read an image folder into the canonical form (see the module docstring)."""
    from PIL import Image

    if resize_filter not in RESIZE_FILTERS:
        raise DatasetError(f"imagefolder source: resize_filter must be one of {list(RESIZE_FILTERS)}, "
                           f"got {resize_filter!r}")
    pil_name = RESIZE_FILTERS[resize_filter]
    root = Path(root).resolve()
    folders, rows = image_folder_files(root)
    if num_classes is not None and len(folders) != num_classes:
        raise DatasetError(f"{root}: expected {num_classes} classes, the folder has {len(folders)}")
    names = class_names(root, folders)
    resample = getattr(Image.Resampling, pil_name)
    arrays = {}
    for split in SPLITS:
        x = arrays[f"x_{split}"] = np.empty((len(rows[split]), *IMAGE_SHAPE), dtype=np.uint8)
        for i, (rel, _) in enumerate(rows[split]):
            x[i] = read_image(root / rel, resample)
        arrays[f"y_{split}"] = np.asarray([index for _, index in rows[split]], dtype=np.int64)
    meta = {"source": f"imagefolder:{root}", "resize": f"whole image to 32x32, PIL.Image.{pil_name}"}
    return Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                   np.asarray(names, dtype=str), meta).validate(str(root))
