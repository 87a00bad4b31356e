"""Where a dataset's files are and what they hold, with the standard library only.

The Snakefile imports this module while it builds the DAG, so it must stay cheap to import (no numpy, no torch):

* :func:`resolve_config_path`: a relative path in a config resolves against the folder of the config file that
  set it (:func:`defining_layer` finds that file among Snakemake's merged config files).
* :func:`source_digest`: the content digest of a dataset's file (``source: npz``) or image folder
  (``source: imagefolder``); it is a parameter of ``prepare_data``, so a replaced file reruns the workflow from
  there even when its modification time is old.
* :func:`scan_image_folder`: the images of an image folder, the same list for the digest and the reader.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# the formats Pillow reads that an image folder may hold (matched case-insensitively)
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")
CLASS_NAMES_FILE = "classes.txt"  # optional, in an image folder: the class names, one a line, in folder order
DIGEST_ALGORITHM = "sha256"  # the checksums ../shared/data/README.md publishes, so a file's digest can be compared

# in-process cache: absolute path -> (stat key, hex digest); a DAG build may ask for a digest more than once
_FILE_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}


# ----- config paths ------------------------------------------------------------------------------------------

def defining_layer(keys: Sequence[str], layers: Iterable[tuple[Any, Mapping[str, Any]]]) -> Any | None:
    """The tag of the last of ``layers`` (``(tag, config dict)`` in increasing precedence, as Snakemake merges
    them) that sets the nested key ``keys``, e.g. ``("datasets", "cifar10", "path")``; None when none does."""
    found = None
    for tag, cfg in layers:
        node: Any = cfg
        for key in keys:
            if not isinstance(node, Mapping) or key not in node:
                break
            node = node[key]
        else:
            found = tag
    return found


def resolve_config_path(value: str | os.PathLike, base: str | os.PathLike) -> str:
    """``value`` as an absolute, normalised path: ``~`` expanded, a relative one taken from folder ``base``."""
    return os.path.abspath(os.path.join(base, os.path.expanduser(os.fspath(value))))


# ----- image folders -----------------------------------------------------------------------------------------

def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(root: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [image paths relative to root, sorted]}}`` of ``root/<split>/<class>/**`` (torchvision's
    ImageFolder layout; subfolders of a class folder count, hidden names and non-image files do not). Splits or
    folders that are missing are left out: the reader checks the layout, the digest only fingerprints it."""
    root = Path(root)
    found: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        with os.scandir(split_dir) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        found[split] = {}
        for cls in classes:
            files = []
            for dirpath, dirnames, filenames in os.walk(split_dir / cls, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = Path(dirpath).relative_to(root).as_posix()
                files += [f"{rel}/{name}" for name in filenames if is_image_name(name)]
            found[split][cls] = sorted(files)
    return found


# ----- content digests ---------------------------------------------------------------------------------------

def _content_digest(path: str) -> str:
    """The hex digest of a file's bytes, cached in-process by its size, mtime, ctime and inode (a file replaced
    with its old mtime restored still has a new ctime, so the cache never answers for old content)."""
    st = os.stat(path)
    key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    cached = _FILE_DIGESTS.get(path)
    if cached is None or cached[0] != key:
        h = hashlib.new(DIGEST_ALGORITHM)
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 22):  # one read for an image; 4 MiB at a time for a large npz
                h.update(chunk)
        cached = (key, h.hexdigest())
        _FILE_DIGESTS[path] = cached
    return cached[1]


def file_digest(path: str | os.PathLike) -> str:
    """``sha256:<hex>`` of a file's bytes (the form ``sha256sum`` prints, after the prefix)."""
    return f"{DIGEST_ALGORITHM}:{_content_digest(os.path.abspath(path))}"


def folder_digest(root: str | os.PathLike) -> str:
    """``sha256:<hex>`` over what the image-folder reader reads: the class folders, each image's relative path,
    size and bytes, and ``classes.txt``. Contents rather than mtimes, so that a file replaced under an old mtime
    still changes it: the 60,000 CIFAR-10 JPEGs of ../shared/data/cifar10-jpeg.tar.xz take 1.0-1.4 s on 2 busy
    cores (a walk that only stats every file: 0.3 s). Not cached: the workflow asks once per Snakemake process."""
    root = os.path.abspath(root)
    h = hashlib.new(DIGEST_ALGORITHM)
    h.update(b"pmoe-backdoor image folder v1\n")
    for split, classes in scan_image_folder(root).items():
        for cls, files in classes.items():
            h.update(f"class {split}/{cls}\n".encode())
            for rel in files:
                with open(f"{root}/{rel}", "rb", buffering=0) as fh:
                    data = fh.read()
                h.update(f"image {rel} {len(data)}\n".encode())
                h.update(data)
    names = os.path.join(root, CLASS_NAMES_FILE)
    if os.path.isfile(names):
        h.update(f"names {_content_digest(names)}\n".encode())
    return f"{DIGEST_ALGORITHM}:{h.hexdigest()}"


def source_digest(source: str, path: str | os.PathLike) -> str | None:
    """The content digest of a dataset source's data: a file (npz) or an image folder; None for sources
    without local data (torchvision downloads, synthetic) and for a path that does not exist (yet): the
    missing input is Snakemake's to report."""
    if source == "npz" and os.path.isfile(path):
        return file_digest(path)
    if source == "imagefolder" and os.path.isdir(path):
        return folder_digest(path)
    return None
