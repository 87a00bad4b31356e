"""The 17 module slots of a pMoE and the adjacency the MSD fitness reads (Module-Switching Defense).

A slot is a unit that module switching takes whole from one source model. A slot carries the BatchNorm in front
of its conv (weights and running statistics). At the default depth (one PreActBlock per trunk group, four
experts) the count is

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

THE TABLE (the only place the adjacency is written). Each pair is listed once, on the row of its earlier slot.
- siblings: the three modules of a trunk group; each router with its own expert; neighbouring experts (e, e+1,
  not cyclic);
- consecutive: b reads a's output directly (no weight module in between): stem -> group 1, group 1 -> group 2,
  group 2 -> pre-MoE, pre-MoE -> every router and expert, every expert -> head (conv1 -> conv2 inside a block and
  router -> expert are siblings, not consecutive);
- residual: b reads a's output through one or more shortcuts, skipping the conv branch of the blocks in between;
  weight 0.5 ** d, d = the stage distance (stages: stem 0, group 1 1, group 2 2, pre-MoE 3, MoE 4, head 5).
  Every residual pair spans at least two stages; distance-1 flows are consecutive pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ...models.architectures import PMoENet

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


_SLOTS, SIBLING_PAIRS, CONSECUTIVE_PAIRS, RESIDUAL_PAIRS = _parse(TABLE)
SLOT_NAMES: tuple[str, ...] = tuple(s[0] for s in _SLOTS)
SLOT_TYPES: tuple[str, ...] = tuple(s[1] for s in _SLOTS)
SLOT_STAGES: tuple[int, ...] = tuple(s[2] for s in _SLOTS)
NUM_SLOTS = len(SLOT_NAMES)
SLOT_INDEX = {name: i for i, name in enumerate(SLOT_NAMES)}
ROUTERS = tuple(SLOT_INDEX[f"router{e}"] for e in range(1, NUM_EXPERTS + 1))
EXPERTS = tuple(SLOT_INDEX[f"expert{e}"] for e in range(1, NUM_EXPERTS + 1))

# state-dict prefixes of the whole-tensor slots (the fused router and expert layers are split in slot_parts)
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


@dataclass(frozen=True)
class SlotPart:
    """One state-dict entry, or the rows ``rows`` (a slice of dim 0) of a fused one, and the slot it belongs to."""
    key: str
    slot: int
    rows: slice | None = None


def check_architecture(model: nn.Module) -> PMoENet:
    if not isinstance(model, PMoENet):
        raise TypeError(f"module switching is defined for the pmoe architecture, got {type(model).__name__}")
    if model.moe.num_experts != NUM_EXPERTS:
        raise ValueError(f"the slot table is written for {NUM_EXPERTS} experts, the model has {model.moe.num_experts}")
    return model


def slot_parts(model: nn.Module) -> list[SlotPart]:
    """Every state-dict entry of ``model`` (fused router/expert entries split by rows) mapped to one slot.

    Raises on an entry the table does not know, so a changed architecture cannot be merged silently wrong.
    """
    moe = check_architecture(model).moe
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
            slot = next((s for p, s in _PREFIXES.items() if key.startswith(p)), None)
            if slot is None:
                raise ValueError(f"state-dict entry {key!r} belongs to no module slot")
            parts.append(SlotPart(key, SLOT_INDEX[slot]))
    return parts


def slot_tensors(model: nn.Module, slot: int | str) -> dict[str, object]:
    """The tensors (or row slices of fused tensors) of one slot, keyed ``key`` or ``key[start:stop]``."""
    index = SLOT_INDEX[slot] if isinstance(slot, str) else int(slot)
    state = model.state_dict()
    out = {}
    for part in slot_parts(model):
        if part.slot == index:
            name = part.key if part.rows is None else f"{part.key}[{part.rows.start}:{part.rows.stop}]"
            out[name] = state[part.key] if part.rows is None else state[part.key][part.rows]
    return out
