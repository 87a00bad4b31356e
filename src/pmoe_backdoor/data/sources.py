"""A dataset from its config block, whatever the source: a torchvision download, an npz file, an image folder or
synthetic data, with an optional stratified subset; the workflow's ``prepare_data`` job calls :func:`load_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .datasets import Dataset, DatasetError, load_npz, load_torchvision, make_synthetic, stratified_subset
from .files import source_digest
from .imagefolder import load_image_folder


def check_digest(spec: dict[str, Any]) -> None:
    """A file or folder whose content no longer has the digest the workflow planned with (Snakemake records the
    planned one as the job's parameter, so the outputs would be labelled with the wrong content)."""
    if spec.get("digest") is None or "path" not in spec:
        return
    found = source_digest(spec.get("source"), spec["path"])  # None for a missing path: the loader says so
    if found is not None and found != spec["digest"]:
        raise DatasetError(f"{Path(spec['path']).resolve()}: its content changed after the workflow was planned "
                           f"(digest {found}, planned {spec['digest']}); run the workflow again")


def load_source(spec: dict[str, Any]) -> Dataset:
    """Load a dataset from a config block: ``{source: torchvision|npz|imagefolder|synthetic, ...}`` plus optional
    subset. A ``digest`` key (the workflow's content digest of the file or folder, see ``datafiles``) must still
    match the data, which it then labels in ``meta``: the data changed since the DAG was built otherwise."""
    source = spec.get("source")
    check_digest(spec)
    if source == "torchvision":
        try:
            ds = load_torchvision(spec["name"], spec.get("root", "data/raw"), download=spec.get("download", True))
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; torchvision raises RuntimeError offline
            raise DatasetError(
                f"torchvision source {spec['name']!r}: could not download or read it under "
                f"{Path(spec.get('root', 'data/raw')).resolve()} ({type(exc).__name__}: {exc}). Without network "
                "access, point the dataset at a prepared npz (source: npz, path: ...), e.g. config/cpu.yaml") from exc
    elif source == "npz":
        if "path" not in spec:
            raise DatasetError("npz source: the key 'path' (the npz file) is required")
        ds = load_npz(spec["path"], spec.get("num_classes"))
    elif source == "imagefolder":
        if "path" not in spec:
            raise DatasetError("imagefolder source: the key 'path' (the image folder) is required")
        ds = load_image_folder(spec["path"], spec.get("resize_filter", "bilinear"), spec.get("num_classes"))
    elif source == "synthetic":
        ds = make_synthetic(spec.get("num_classes", 10), spec.get("n_train", 1000), spec.get("n_test", 200),
                            spec.get("seed", 0), spec.get("noise", 40.0))
    else:
        raise DatasetError(f"dataset 'source' must be one of torchvision, npz, imagefolder, synthetic; "
                           f"got {source!r}")
    if spec.get("digest") is not None:
        ds.meta["digest"] = spec["digest"]
    subset = spec.get("subset")
    if subset:
        ds = stratified_subset(ds, subset.get("n_train"), subset.get("n_test"), subset.get("seed", 0))
    return ds
