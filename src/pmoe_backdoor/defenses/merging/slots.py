"""The module slots of each architecture merging supports, and the adjacency the MSD fitness reads
(Module-Switching Defense, Li et al.).

A slot is a unit that module switching takes whole from one source model. A slot carries the BatchNorm in front
of its conv (weights and running statistics). An architecture's slots and adjacency form a :class:`SlotTable`;
:func:`table_of` picks the table of a model, :func:`slot_table` the table of an architecture name (the
``arch`` of the model registry), which is what a strategy file records.

The adjacency follows three rules, the same for both architectures:
- siblings: the modules of one block (conv1, conv2 and the shortcut conv; for the pMoE also each router with its
  own expert and neighbouring experts);
- consecutive: b reads a's output directly (no weight module in between);
- residual: b reads a's output through one or more shortcuts (identity or 1x1 conv), skipping the conv branch of
  the blocks in between; weight 0.5 ** d, d = the stage distance. Every residual pair spans at least two stages;
  distance-1 flows are consecutive pairs.
Each pair is counted once (in the pMoE's table, on the row of its earlier slot). The trunk rows of that table are what
:func:`residual_chain` derives for its two blocks (tests/test_merging.py checks this), and the PreAct-ResNet-18
table is derived by that function from its eight blocks.

pMoE (``models.PMoENet``, 17 slots). At the default depth (one PreActBlock per trunk group, four experts):

    stem (1) + group 1: bn1+conv1, bn2+conv2, shortcut (3) + group 2: the same (3) + pre-MoE: pre_bn+pre_conv (1)
    + router 1..4 (4) + expert 1..4 (4) + head: BN + linear (1) = 17.

A deeper trunk would add three slots per extra block (its bn1+conv1, bn2+conv2, shortcut); the table below is
written for the architecture ``models.PMoENet`` builds, which has one block per group and ``num_experts`` 4
(other expert counts are refused). Slots that hold no tensors at some width stay slots: at widen factor 1
group 1 maps 16 to 16 channels at stride 1, so its shortcut is the identity and the ``g1.shortcut`` slot is empty.
The strategy is therefore a function of the architecture and N only.

Fused tensors are split by rows (dim 0): router e is row e-1 of ``moe.router.weight``; expert e owns channels
``(e-1)*C..e*C`` of ``moe.expert_bn`` (weight, bias, running mean and variance; C = the MoE map's channels) and
the rows ``PatchMoE.expert_slice(e-1)`` of ``moe.expert_conv`` (weight and bias). The fused BN's single
``num_batches_tracked`` counter belongs to no expert in particular; by convention it goes with expert 1.

THE TABLE of the pMoE (the only place its adjacency is written).
- siblings: the three modules of a trunk group; each router with its own expert; neighbouring experts (e, e+1,
  not cyclic);
- consecutive: stem -> group 1, group 1 -> group 2, group 2 -> pre-MoE, pre-MoE -> every router and expert, every
  expert -> head (conv1 -> conv2 inside a block and router -> expert are siblings, not consecutive);
- residual: stages stem 0, group 1 1, group 2 2, pre-MoE 3, MoE 4, head 5.

PreAct-ResNet-18 (``models.controls.PreActResNet18``, 21 slots): stem, then per block b1..b8 its bn1+conv1
(``bK.conv1``), its bn2+conv2 (``bK.conv2``) and, where it has one, its 1x1 shortcut conv (``bK.shortcut``), then
the head's fc (there is no BN after the last block in this implementation, so the head is the Linear alone):

    stem (1) + 8 blocks x (conv1, conv2) (16) + shortcuts of b3, b5, b7 (3) + head (1) = 21.

Which blocks have a shortcut conv does not depend on the width (only the first block of stages 2..4 changes stride
and channels; the first block of stage 1 maps the stem's width to itself), so neither does the table; a model
whose shortcuts differ from it is refused. Stages: stem 0, block k k, head 9, so a residual distance counts the
blocks skipped. The rows, as :func:`residual_chain` derives them:
- siblings: (conv1, conv2) of every block, and (conv1, shortcut), (conv2, shortcut) of b3, b5, b7. Here the
  shortcut conv reads the block's bn1 output (in the conv1 slot), so conv1 and the shortcut share an input;
- consecutive: whatever wrote a block's input directly (the stem, or the previous block's conv2 and shortcut)
  with the block's readers (its conv1 and shortcut); the last block's conv2 with the head;
- residual: whatever reached a block's input through earlier shortcuts with the block's readers, d = stage
  difference (e.g. stem -> b2.conv1 at 2 through b1's identity, stem -> head at 9, b8's inputs -> head).

Li et al.'s code (github.com/weijun-l/module-switching-defense) was not reachable from here, so how it cuts a
ResNet into modules was not checked; the rules above are the paper's, applied as the pMoE's table applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from ...models.architectures import PMoENet
from ...models.controls import PreActResNet18
from .slot_table import SlotTable, from_rows, residual_chain

TABLE = """
slot         type      stage  siblings               consecutive                          residual
stem         stem      0      -                      g1.conv1 g1.shortcut                 g2.conv1:2 g2.shortcut:2 pre:3
g1.conv1     conv1     1      g1.conv2 g1.shortcut   -                                    -
g1.conv2     conv2     1      g1.shortcut            g2.conv1 g2.shortcut                 pre:2
g1.shortcut  shortcut  1      -                      g2.conv1 g2.shortcut                 pre:2
g2.conv1     conv1     2      g2.conv2 g2.shortcut   -                                    -
g2.conv2     conv2     2      g2.shortcut            pre                                  -
g2.shortcut  shortcut  2      -                      pre                                  -
pre          pre       3      -                      router1 router2 router3 router4      -
                                                     expert1 expert2 expert3 expert4
router1      router    4      expert1                -                                    -
router2      router    4      expert2                -                                    -
router3      router    4      expert3                -                                    -
router4      router    4      expert4                -                                    -
expert1      expert    4      expert2                head                                 -
expert2      expert    4      expert3                head                                 -
expert3      expert    4      expert4                head                                 -
expert4      expert    4      -                      head                                 -
head         head      5      -                      -                                    -
"""
NUM_EXPERTS = 4


def _parse(table: str):
    """Read TABLE by the columns its header line sets (a row starting with blanks continues the row above)."""
    header, *rows = [ln for ln in table.strip("\n").splitlines() if ln.strip()]
    names = header.split()
    starts = [header.index(n) for n in names]
    slots, siblings, consecutive, residual = [], [], [], []
    for ln in rows:
        cells = dict(zip(names, (ln[a:b].split() for a, b in zip(starts, starts[1:] + [None]))))
        if cells["slot"]:
            slots.append((cells["slot"][0], cells["type"][0], int(cells["stage"][0])))
        name = slots[-1][0]
        siblings += [(name, b) for b in cells["siblings"] if b != "-"]
        consecutive += [(name, b) for b in cells["consecutive"] if b != "-"]
        for item in cells["residual"]:
            if item != "-":
                b, d = item.split(":")
                residual.append((name, b, int(d)))
    return tuple(slots), tuple(siblings), tuple(consecutive), tuple(residual)


# ----- the pMoE -----

_SLOTS, SIBLING_PAIRS, CONSECUTIVE_PAIRS, RESIDUAL_PAIRS = _parse(TABLE)
SLOT_NAMES: tuple[str, ...] = tuple(s[0] for s in _SLOTS)
SLOT_TYPES: tuple[str, ...] = tuple(s[1] for s in _SLOTS)
SLOT_STAGES: tuple[int, ...] = tuple(s[2] for s in _SLOTS)
NUM_SLOTS = len(SLOT_NAMES)
SLOT_INDEX = {name: i for i, name in enumerate(SLOT_NAMES)}
ROUTERS = tuple(SLOT_INDEX[f"router{e}"] for e in range(1, NUM_EXPERTS + 1))
EXPERTS = tuple(SLOT_INDEX[f"expert{e}"] for e in range(1, NUM_EXPERTS + 1))
PMOE = from_rows("pmoe", _SLOTS, SIBLING_PAIRS, CONSECUTIVE_PAIRS, RESIDUAL_PAIRS, ROUTERS, EXPERTS)

# state-dict prefixes of the whole-tensor slots (the fused router and expert layers are split in _pmoe_parts)
_PREFIXES = {
    "trunk.stem.": "stem",
    "trunk.group1.bn1.": "g1.conv1", "trunk.group1.conv1.": "g1.conv1",
    "trunk.group1.bn2.": "g1.conv2", "trunk.group1.conv2.": "g1.conv2",
    "trunk.group1.shortcut.": "g1.shortcut",
    "trunk.group2.bn1.": "g2.conv1", "trunk.group2.conv1.": "g2.conv1",
    "trunk.group2.bn2.": "g2.conv2", "trunk.group2.conv2.": "g2.conv2",
    "trunk.group2.shortcut.": "g2.shortcut",
    "pre_bn.": "pre", "pre_conv.": "pre",
    "head.": "head",
}

# ----- PreAct-ResNet-18 -----

# two blocks per stage; only the first block of stages 2..4 (stride 2, twice the channels) has a shortcut conv
PREACT_RESNET18_SHORTCUTS = (False, False, True, False, True, False, True, False)
PREACT_RESNET18 = from_rows("preact_resnet18", *residual_chain(
    [(f"b{k}", has) for k, has in enumerate(PREACT_RESNET18_SHORTCUTS, 1)]))


def _preact_resnet18_prefixes() -> dict[str, str]:
    prefixes = {"stem.": "stem", "head.": "head"}
    for k in range(1, len(PREACT_RESNET18_SHORTCUTS) + 1):
        block = f"blocks.{k - 1}."
        prefixes.update({block + "bn1.": f"b{k}.conv1", block + "conv1.": f"b{k}.conv1",
                         block + "bn2.": f"b{k}.conv2", block + "conv2.": f"b{k}.conv2",
                         block + "shortcut.": f"b{k}.shortcut"})
    return prefixes


TABLES: dict[str, SlotTable] = {t.architecture: t for t in (PMOE, PREACT_RESNET18)}
_MODEL_CLASSES = {PMoENet: PMOE, PreActResNet18: PREACT_RESNET18}
_PREFIXES_OF = {"pmoe": _PREFIXES, "preact_resnet18": _preact_resnet18_prefixes()}


def slot_table(architecture: str | SlotTable | None = None) -> SlotTable:
    """The table of an architecture name (the registry's ``arch``; None: the pMoE's), or the table itself."""
    if isinstance(architecture, SlotTable):
        return architecture
    name = "pmoe" if architecture is None else architecture
    if name not in TABLES:
        raise ValueError(f"module switching has no slot table for architecture {name!r} (known: {sorted(TABLES)})")
    return TABLES[name]


@dataclass(frozen=True)
class SlotPart:
    """One state-dict entry, or the rows ``rows`` (a slice of dim 0) of a fused one, and the slot it belongs to."""
    key: str
    slot: int
    rows: slice | None = None


def table_of(model: nn.Module) -> SlotTable:
    """The slot table of ``model``'s architecture; refuses a model the table does not describe."""
    table = next((t for cls, t in _MODEL_CLASSES.items() if isinstance(model, cls)), None)
    if table is None:
        raise TypeError(f"module switching is defined for the architectures {sorted(TABLES)}, "
                        f"got {type(model).__name__}")
    if table is PMOE and model.moe.num_experts != NUM_EXPERTS:
        raise ValueError(f"the slot table is written for {NUM_EXPERTS} experts, the model has {model.moe.num_experts}")
    if table is PREACT_RESNET18:
        shortcuts = tuple(block.shortcut is not None for block in model.blocks)
        if shortcuts != PREACT_RESNET18_SHORTCUTS:
            raise ValueError(f"the slot table is written for shortcut convs in blocks "
                             f"{_blocks_with(PREACT_RESNET18_SHORTCUTS)}, the model has them in "
                             f"{_blocks_with(shortcuts)}")
    return table


def _blocks_with(shortcuts: Sequence[bool]) -> list[int]:
    return [k for k, has in enumerate(shortcuts, 1) if has]


def check_architecture(model: nn.Module) -> PMoENet:
    """``model`` if it is a pMoE the pMoE table describes (merging code reads :func:`table_of`)."""
    if table_of(model) is not PMOE:
        raise TypeError(f"expected the pmoe architecture, got {type(model).__name__}")
    return model


def _pmoe_parts(model: PMoENet) -> list[SlotPart]:
    moe = model.moe
    c_in, c_out = moe.in_channels, moe.expert_channels
    parts: list[SlotPart] = []
    for key in model.state_dict():
        if key == "moe.router.weight":
            parts += [SlotPart(key, ROUTERS[e], slice(e, e + 1)) for e in range(NUM_EXPERTS)]
        elif key == "moe.expert_bn.num_batches_tracked":
            parts.append(SlotPart(key, EXPERTS[0]))
        elif key.startswith("moe.expert_bn."):
            parts += [SlotPart(key, EXPERTS[e], slice(e * c_in, (e + 1) * c_in)) for e in range(NUM_EXPERTS)]
        elif key.startswith("moe.expert_conv."):
            parts += [SlotPart(key, EXPERTS[e], slice(e * c_out, (e + 1) * c_out)) for e in range(NUM_EXPERTS)]
        else:
            parts.append(_whole(key, PMOE))
    return parts


def _whole(key: str, table: SlotTable) -> SlotPart:
    slot = next((s for p, s in _PREFIXES_OF[table.architecture].items() if key.startswith(p)), None)
    if slot is None:
        raise ValueError(f"state-dict entry {key!r} belongs to no module slot of {table.architecture}")
    return SlotPart(key, table.index[slot])


def slot_parts(model: nn.Module) -> list[SlotPart]:
    """Every state-dict entry of ``model`` (the pMoE's fused router/expert entries split by rows) mapped to one slot
    of its architecture's table.

    Raises on an entry the table does not know, so a changed architecture cannot be merged silently wrong.
    """
    table = table_of(model)
    if table is PMOE:
        return _pmoe_parts(model)
    return [_whole(key, table) for key in model.state_dict()]


def slot_tensors(model: nn.Module, slot: int | str) -> dict[str, object]:
    """The tensors (or row slices of fused tensors) of one slot, keyed ``key`` or ``key[start:stop]``."""
    index = table_of(model).slot(slot)
    state = model.state_dict()
    out = {}
    for part in slot_parts(model):
        if part.slot == index:
            name = part.key if part.rows is None else f"{part.key}[{part.rows.start}:{part.rows.stop}]"
            out[name] = state[part.key] if part.rows is None else state[part.key][part.rows]
    return out
