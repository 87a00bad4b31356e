"""The MSD fitness of module-switching strategies, vectorised over a (B, slots) matrix of source indices.

F = - w_intra A_intra - w_cons A_cons - w_res A_res - w_bal B_bal + w_div R_div, all weights 1 by default; a
weight 0 switches a term off (ablation). The pairs, types and stages come from an architecture's table in
:mod:`.slots` (``architecture``: its name or the table; the pMoE's when left out). For the pMoE:

- A_intra: same-source sibling pairs (the three modules of a trunk group, router e with expert e, experts e and
  e+1);
- A_cons: same-source pairs along direct (consecutive) connections;
- A_res: same-source pairs along the residual paths, each weighted 0.5 ** (stage distance);
- B_bal: sum over slot types (stem, conv1, conv2, shortcut, pre, router, expert, head) and models of
  |slots of that type taken from that model - slots of that type / N|. A type with one slot (stem, pre, head)
  adds the constant 2 (N - 1) / N whatever the strategy; constants do not change which strategy is best;
- R_div: the number of distinct compositions among the six stages (stem, group 1, group 2, pre-MoE, MoE, head),
  a stage's composition being the tuple of its slots' sources in slot order (the MoE stage: routers 1..4 then
  experts 1..4). Tuples of different lengths are different, so what varies is whether group 1 and group 2
  differ and how many different sources stem, pre-MoE and head have; the MoE stage always counts 1.

PreAct-ResNet-18 reads the same terms off its own table: siblings within a block, its slot types stem, conv1,
conv2, shortcut, head, and its ten stages (stem, the eight blocks, head; the blocks with a shortcut conv have
three slots, the others two, so only blocks of the same kind can repeat a composition).

All terms depend only on which slots share a source, not on which model that is: relabelling the models
(a candidate role assignment) leaves the fitness unchanged.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .slots import SlotTable, slot_table

TERMS = ("intra", "cons", "res", "bal", "div")
SIGNS = {"intra": -1.0, "cons": -1.0, "res": -1.0, "bal": -1.0, "div": 1.0}
DEFAULT_WEIGHTS = {t: 1.0 for t in TERMS}


class _Indexed:
    """A table's pairs, types and stages as index arrays (built once per table)."""

    def __init__(self, table: SlotTable):
        self.num_slots = table.num_slots
        self.sib = self._pairs(table, table.siblings)
        self.cons = self._pairs(table, table.consecutive)
        self.res = self._pairs(table, table.residual)
        self.res_w = np.array([0.5 ** d for _, _, d in table.residual])
        self.types = {t: np.array([i for i, s in enumerate(table.types) if s == t])
                      for t in dict.fromkeys(table.types)}
        self.stages = [np.array([i for i, s in enumerate(table.stages) if s == st])
                       for st in sorted(set(table.stages))]

    @staticmethod
    def _pairs(table: SlotTable, pairs) -> tuple[np.ndarray, np.ndarray]:
        return (np.array([table.index[p[0]] for p in pairs], dtype=np.int64),
                np.array([table.index[p[1]] for p in pairs], dtype=np.int64))


_INDEXED: dict[str, _Indexed] = {}


def _indexed(architecture: str | SlotTable | None) -> _Indexed:
    table = slot_table(architecture)
    if table.architecture not in _INDEXED:
        _INDEXED[table.architecture] = _Indexed(table)
    return _INDEXED[table.architecture]


def resolve_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """The default weights updated by ``weights``; an unknown term is an error naming the known ones."""
    unknown = set(weights or {}) - set(TERMS)
    if unknown:
        raise ValueError(f"fitness weights: unknown term(s) {sorted(unknown)}; known: {list(TERMS)}")
    return {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in (weights or {}).items()}}


def as_matrix(assignments, num_models: int, architecture: str | SlotTable | None = None) -> np.ndarray:
    """(B, slots) int array of source indices from one strategy or many; checked against ``num_models``."""
    num_slots = slot_table(architecture).num_slots
    a = np.asarray(assignments, dtype=np.int64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != num_slots:
        raise ValueError(f"a strategy assigns each of the {num_slots} slots a model; got shape {a.shape}")
    if num_models < 2:
        raise ValueError(f"module switching needs at least 2 models, got {num_models}")
    if a.size and (a.min() < 0 or a.max() >= num_models):
        raise ValueError(f"source indices must lie in [0, {num_models}), got {a.min()}..{a.max()}")
    return a


def fitness_terms(assignments, num_models: int, architecture: str | SlotTable | None = None
                  ) -> dict[str, np.ndarray]:
    """The five raw (unweighted, unsigned) terms, each a float64 array over the strategies."""
    a = as_matrix(assignments, num_models, architecture)
    ix = _indexed(architecture)
    terms = {
        "intra": (a[:, ix.sib[0]] == a[:, ix.sib[1]]).sum(1).astype(np.float64),
        "cons": (a[:, ix.cons[0]] == a[:, ix.cons[1]]).sum(1).astype(np.float64),
        "res": ((a[:, ix.res[0]] == a[:, ix.res[1]]) * ix.res_w).sum(1),
    }
    models = np.arange(num_models)
    bal = np.zeros(len(a), dtype=np.int64)  # in units of 1/N: integer sums, so the order of models cannot matter
    for idx in ix.types.values():
        counts = (a[:, idx, None] == models).sum(1)  # (B, N)
        bal += np.abs(num_models * counts - len(idx)).sum(1)
    terms["bal"] = bal / num_models
    duplicates = np.zeros(len(a))
    for i, si in enumerate(ix.stages):
        dup = np.zeros(len(a), dtype=bool)
        for sj in ix.stages[:i]:
            if len(sj) == len(si):
                dup |= (a[:, si] == a[:, sj]).all(1)
        duplicates += dup
    terms["div"] = len(ix.stages) - duplicates
    return terms


def combine(terms: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None) -> np.ndarray:
    w = resolve_weights(weights)
    return sum(SIGNS[t] * w[t] * np.asarray(terms[t], dtype=np.float64) for t in TERMS)


def fitness(assignments, num_models: int, weights: Mapping[str, float] | None = None,
            architecture: str | SlotTable | None = None) -> np.ndarray:
    """F for each strategy (float64 array of length B)."""
    return combine(fitness_terms(assignments, num_models, architecture), weights)
