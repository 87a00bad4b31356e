"""Data stage: any source (torchvision download, npz, image folder, synthetic) into the canonical npz."""

from __future__ import annotations

from typing import Any

from ..data.sources import load_source


def prepare_data(spec: dict[str, Any], out: str) -> None:
    ds = load_source(spec)
    print(f"prepared {ds.meta.get('source')}: {len(ds.y_train)} train / {len(ds.y_test)} test, "
          f"{ds.num_classes} classes")
    ds.save(out)
