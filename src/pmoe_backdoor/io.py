"""Pickle-free, atomic file helpers.

Every output is written to a temporary file in the destination folder and renamed into place, so an
interrupted job never leaves a file that looks complete. Model files are untrusted by definition: they are
read with safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds, with the
    permissions any new file gets (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp's 0600 would stay on the result
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


EMPTY_MARKER = "__no_tensors__"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, Any] | None = None) -> None:
    """Save tensors (and JSON-able metadata) as safetensors, atomically."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if EMPTY_MARKER in tensors:
        raise ValueError(f"{path}: the tensor name {EMPTY_MARKER!r} is reserved")
    if not tensors:  # safetensors writes an unreadable header for no tensors: a placeholder that loading drops
        tensors = {EMPTY_MARKER: torch.zeros(0)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors and metadata written by :func:`save_tensors` (safetensors: no code is executed).

    Every model, trigger and poison file is read here, so every failure to read one is reported here, naming the
    file (safetensors' own errors name none): FileNotFoundError for a missing file, ValueError for anything else
    that is not a readable safetensors file with :func:`save_tensors`' JSON metadata (damaged, truncated, foreign).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a .safetensors file)")
    if not path.is_file():
        raise ValueError(f"{path}: not a file (expected a .safetensors file)")
    try:
        # one opening for the tensors and the metadata, so both come from the same version of the file
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys() if key != EMPTY_MARKER}
    except Exception as exc:  # SafetensorError for a damaged file, OSError for an unreadable one, ...
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    meta = {}
    for key, value in raw_meta.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: metadata {key!r} is not JSON ({exc}); expected a file written by "
                             "pmoe-backdoor") from exc
    return tensors, meta


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``numpy.savez_compressed`` atomically; arrays must have plain dtypes (loaded without pickle)."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
