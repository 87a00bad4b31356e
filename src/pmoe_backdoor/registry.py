"""What the registries of triggers, models and defenses share: a table by name whose lookup fails with one line
naming the choices, and implementations named "module:attribute", imported only when used (the DAG build reads the
registries and must not import torch)."""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

Entry = TypeVar("Entry")


def import_attribute(path: str) -> Any:
    """``"package.module:name"`` -> that module's attribute."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class Registry(dict[str, Entry], Generic[Entry]):
    """Entries by their ``name``; ``what`` names the choice in errors ("trigger kind")."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, entry: Entry) -> Entry:
        self[entry.name] = entry
        return entry

    def lookup(self, name: str) -> Entry:
        if name not in self:
            raise ValueError(f"{self.what} must be one of {tuple(self)}, got {name!r}")
        return self[name]
