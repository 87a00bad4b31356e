"""Merging homologous models: weight averaging (WAG, Arora et al.) and module switching by a strategy (MSD).

Both work on state dicts and return a new model (a deep copy of the first model with the merged state), leaving
the inputs untouched. Models must be homologous: the same architecture, so the same keys and shapes. WAG takes
any architecture; module switching one with a slot table (:mod:`.slots`: the pMoE, PreAct-ResNet-18).

Candidates: a strategy assigns slots to roles 0..N-1; a candidate is one assignment of the N victims to those
roles. ``roles="cyclic"`` (default) gives the N cyclic shifts (role r played by model (r + k) mod N), so every
model plays every role once; ``roles="all"`` gives all N! permutations. For two models both are M_01 (the
strategy as found) and M_10 (the models swapped). All candidates have the same fitness (it ignores labels).
"""

from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch
import torch.nn as nn

from .search import Strategy
from .slots import SlotTable, slot_parts, slot_table, table_of

ROLES = ("cyclic", "all")


def _states(models: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
    if len(models) < 1:
        raise ValueError("merging needs at least one model")
    states = [m.state_dict() for m in models]
    ref = states[0]
    for i, s in enumerate(states[1:], 1):
        if list(s) != list(ref) or any(s[k].shape != ref[k].shape for k in ref):
            raise ValueError(f"model {i} is not homologous to model 0 (state-dict keys or shapes differ)")
    return states


def _with_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    merged = copy.deepcopy(template)
    merged.load_state_dict(state)
    return merged


@torch.no_grad()
def wag_merge(models: Sequence[nn.Module]) -> nn.Module:
    """The element-wise mean of every floating-point tensor (BN running statistics included); integer tensors
    (``num_batches_tracked``) take the maximum. Accumulated in float64, so N identical models give that model
    bit for bit."""
    states = _states(models)
    out = {}
    for key, ref in states[0].items():
        stack = torch.stack([s[key].to(ref.device) for s in states])
        if ref.is_floating_point():
            out[key] = (stack.double().sum(0) / len(states)).to(ref.dtype)
        else:
            out[key] = stack.max(0).values
    return _with_state(models[0], out)


def _assignment(strategy: Strategy | Sequence[int], num_models: int, table: SlotTable) -> tuple[int, ...]:
    assignment = tuple(strategy.assignment if isinstance(strategy, Strategy) else (int(v) for v in strategy))
    if isinstance(strategy, Strategy) and strategy.architecture != table.architecture:
        raise ValueError(f"the strategy is for the {strategy.architecture} architecture, the models are "
                         f"{table.architecture}")
    if len(assignment) != table.num_slots:
        raise ValueError(f"a strategy assigns each of the {table.num_slots} slots of {table.architecture} a model; "
                         f"got {len(assignment)}")
    if isinstance(strategy, Strategy) and strategy.num_models != num_models:
        raise ValueError(f"the strategy is for {strategy.num_models} models, {num_models} were given")
    if min(assignment) < 0 or max(assignment) >= num_models:
        raise ValueError(f"the strategy names models outside 0..{num_models - 1}: {assignment}")
    return assignment


@torch.no_grad()
def merge_by_strategy(models: Sequence[nn.Module], strategy: Strategy | Sequence[int]) -> nn.Module:
    """A model whose every slot holds exactly the tensors of its assigned source (the pMoE's fused router and
    expert layers by rows, see :func:`.slots.slot_parts`)."""
    states = _states(models)
    assignment = _assignment(strategy, len(models), table_of(models[0]))
    out = {k: v.clone() for k, v in states[0].items()}
    for part in slot_parts(models[0]):
        src = states[assignment[part.slot]][part.key]
        if part.rows is None:
            out[part.key] = src.clone()
        else:
            out[part.key][part.rows] = src[part.rows]
    return _with_state(models[0], out)


def candidate_assignments(strategy: Strategy | Sequence[int], num_models: int | None = None,
                          roles: str = "cyclic", architecture: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``[(name, assignment)]``: the strategy with its roles given to the models in each admissible way.

    The name lists the model playing role 0, 1, ...: ``M_01`` is the strategy as found, ``M_10`` the swap.
    ``architecture``: the slot table a plain sequence is written in (a Strategy carries its own; the pMoE's when
    neither says).
    """
    if roles not in ROLES:
        raise ValueError(f"roles must be one of {ROLES}, got {roles!r}")
    n = num_models or (strategy.num_models if isinstance(strategy, Strategy) else max(strategy) + 1)
    if architecture is None and isinstance(strategy, Strategy):
        architecture = strategy.architecture
    base = _assignment(strategy, n, slot_table(architecture))
    perms = ([tuple((r + k) % n for r in range(n)) for k in range(n)] if roles == "cyclic"
             else list(itertools.permutations(range(n))))
    sep = "" if n <= 10 else "-"
    return [("M_" + sep.join(str(p) for p in perm), tuple(perm[r] for r in base)) for perm in perms]
