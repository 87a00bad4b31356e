"""An architecture's module slots for module switching (MSD) as one value, :class:`SlotTable`, and the rule that
derives the adjacency of a chain of pre-activation residual blocks (:func:`residual_chain`); the tables themselves
are in :mod:`.slots`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class SlotTable:
    """The slots of one architecture in strategy order (name, type, stage), the three kinds of pairs, and the
    router / expert slots that a coupled strategy moves together (none for an architecture without routers)."""

    architecture: str
    names: tuple[str, ...]
    types: tuple[str, ...]
    stages: tuple[int, ...]
    siblings: tuple[tuple[str, str], ...]
    consecutive: tuple[tuple[str, str], ...]
    residual: tuple[tuple[str, str, int], ...]
    routers: tuple[int, ...] = ()
    experts: tuple[int, ...] = ()
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "index", {name: i for i, name in enumerate(self.names)})
        if len(self.index) != len(self.names) or not len(self.names) == len(self.types) == len(self.stages):
            raise ValueError(f"{self.architecture}: slot names must be unique and have one type and stage each")
        unknown = {s for p in self.siblings + self.consecutive + self.residual for s in p[:2]} - set(self.names)
        if unknown:
            raise ValueError(f"{self.architecture}: pairs name unknown slots {sorted(unknown)}")

    @property
    def num_slots(self) -> int:
        return len(self.names)

    def slot(self, slot: int | str) -> int:
        return self.index[slot] if isinstance(slot, str) else int(slot)


def from_rows(architecture: str, rows, siblings, consecutive, residual, routers=(), experts=()) -> SlotTable:
    names, types, stages = (tuple(col) for col in zip(*rows))
    return SlotTable(architecture, names, types, stages, tuple(siblings), tuple(consecutive), tuple(residual),
                     tuple(routers), tuple(experts))


def residual_chain(blocks: Sequence[tuple[str, bool]], first: str = "stem", last: str = "head"):
    """(rows, siblings, consecutive, residual) of ``first``, a chain of pre-activation blocks and ``last``.

    ``blocks``: (name, has a shortcut slot) per block, each block holding the slots ``name.conv1``, ``name.conv2``
    and, when it has a shortcut slot, ``name.shortcut``. A block's readers are its conv1 and shortcut; its output is
    written directly by its conv2 and shortcut, and reaches on (through the shortcut, identity or conv) whatever
    reached its input. ``first`` has stage 0, block k stage k, ``last`` stage len(blocks) + 1.
    """
    rows = [(first, first, 0)]
    siblings, consecutive, residual = [], [], []
    direct, through_shortcuts = [(first, 0)], []  # who writes the current map, and at which stage

    def read(readers: list[str], stage: int) -> None:
        consecutive.extend((w, r) for w, _ in direct for r in readers)
        residual.extend((w, r, stage - s) for w, s in through_shortcuts for r in readers)

    for stage, (name, has_shortcut) in enumerate(blocks, 1):
        conv1, conv2, shortcut = f"{name}.conv1", f"{name}.conv2", f"{name}.shortcut"
        rows += [(conv1, "conv1", stage), (conv2, "conv2", stage)] + ([(shortcut, "shortcut", stage)]
                                                                       if has_shortcut else [])
        siblings += [(conv1, conv2)] + ([(conv1, shortcut), (conv2, shortcut)] if has_shortcut else [])
        read([conv1] + ([shortcut] if has_shortcut else []), stage)
        through_shortcuts = through_shortcuts + direct
        direct = [(conv2, stage)] + ([(shortcut, stage)] if has_shortcut else [])
    rows.append((last, last, len(blocks) + 1))
    read([last], len(blocks) + 1)
    return rows, siblings, consecutive, residual
