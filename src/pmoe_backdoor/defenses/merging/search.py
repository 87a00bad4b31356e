"""Search for the best module-switching strategy, and strategy files.

A strategy depends only on the architecture (its slot table in :mod:`.slots`: the pMoE's 17 slots,
PreAct-ResNet-18's 21) and the number of models N, so one search serves every set of victims; ``architecture``
names the table (the pMoE's when left out) and the strategy file records it. N = 2: all 2^slots strategies are
scored (in chunks, so PreAct-ResNet-18's 2^21 fit in memory) and the best is taken, ties to the lowest index
(slot 0 the most significant digit, so the lexicographically smallest; it gives the stem to model 0). N >= 3:
evolution: a seeded random population; each generation every child is a tournament winner with one slot mutated
to another model; parents and children together, duplicates removed, are ranked by fitness
(ties lexicographically) and the best ``population`` kept; no crossover.

``coupled``: router e and expert e form one gene that moves together (13 free genes instead of 17 for the pMoE;
an architecture without routers has nothing to couple, so there it is the free search).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from ...io import read_json, write_json
from .fitness import fitness, fitness_terms, resolve_weights
from .slots import SlotTable, slot_table

FORMAT = "pmoe-msd-strategy"
EXHAUSTIVE_LIMIT = 2 ** 22  # strategies an exhaustive search scores at most (N^genes)
EXHAUSTIVE_CHUNK = 2 ** 16  # strategies scored at once by it (bounds the memory of the pair comparisons)


@dataclass
class EvolutionConfig:
    population: int = 64
    generations: int = 200
    tournament: int = 8
    children: int = 64  # per generation
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "EvolutionConfig":
        unknown = set(d or {}) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"evolution config: unknown key(s) {sorted(unknown)}")
        cfg = cls(**dict(d or {}))
        for name in ("population", "generations", "tournament", "children"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"evolution config: '{name}' must be a positive integer")
        return cfg


@dataclass
class Strategy:
    assignment: tuple[int, ...]  # source model per slot, in the architecture's slot order
    num_models: int
    coupled: bool = False
    weights: dict[str, float] = field(default_factory=lambda: resolve_weights(None))
    method: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    architecture: str = "pmoe"  # the slot table (slots.TABLES) the assignment is written in

    def __post_init__(self):
        self.assignment = tuple(int(v) for v in self.assignment)
        table = self.table  # an unknown architecture is refused here
        fitness_terms(self.assignment, self.num_models, table)  # validates length and range
        if self.coupled and any(self.assignment[r] != self.assignment[e] for r, e in zip(table.routers, table.experts)):
            raise ValueError("a coupled strategy must give router e and expert e the same source")

    @property
    def table(self) -> SlotTable:
        return slot_table(self.architecture)

    @property
    def terms(self) -> dict[str, float]:
        return {k: float(v[0]) for k, v in fitness_terms(self.assignment, self.num_models, self.table).items()}

    @property
    def fitness(self) -> float:
        return float(fitness(self.assignment, self.num_models, self.weights, self.table)[0])

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "architecture": self.architecture, "num_models": self.num_models,
                "coupled": self.coupled, "method": self.method, "settings": self.settings,
                "weights": self.weights, "fitness": self.fitness, "terms": self.terms,
                "assignment": dict(zip(self.table.names, self.assignment))}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Strategy":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a strategy file (format {d.get('format')!r}, expected {FORMAT!r})")
        architecture = d.get("architecture", "pmoe")
        names = slot_table(architecture).names
        slots = d["assignment"]
        if list(slots) != list(names):
            raise ValueError(f"strategy slots {list(slots)} differ from the {architecture} architecture's "
                             f"{list(names)}")
        return cls(tuple(slots.values()), int(d["num_models"]), bool(d["coupled"]), resolve_weights(d["weights"]),
                   d.get("method", ""), dict(d.get("settings", {})), architecture)


def save_strategy(path: str | os.PathLike, strategy: Strategy) -> None:
    write_json(path, strategy.to_dict())


def load_strategy(path: str | os.PathLike) -> Strategy:
    return Strategy.from_dict(read_json(path))


def gene_of_slot(coupled: bool, architecture: str | SlotTable | None = None) -> np.ndarray:
    """(slots,) the gene each slot reads: the identity, or with coupling router e reads expert e's gene."""
    table = slot_table(architecture)
    genes = np.arange(table.num_slots)
    if coupled:
        genes[list(table.routers)] = list(table.experts)
    _, compact = np.unique(genes, return_inverse=True)
    return compact


def _expand(genomes: np.ndarray, coupled: bool, architecture: str | SlotTable | None = None) -> np.ndarray:
    return genomes[:, gene_of_slot(coupled, architecture)]


def _exhaustive_size(num_models: int, coupled: bool, architecture: str | SlotTable | None) -> tuple[int, int]:
    """(genes, N^genes), refusing more strategies than EXHAUSTIVE_LIMIT."""
    genes = int(gene_of_slot(coupled, architecture).max()) + 1
    total = num_models ** genes
    if total > EXHAUSTIVE_LIMIT:
        raise ValueError(f"{num_models}^{genes} = {total} strategies are too many to score; use evolution")
    return genes, total


def _strategy_rows(num_models: int, coupled: bool, architecture: str | SlotTable | None, start: int,
                   stop: int) -> np.ndarray:
    """Strategies start..stop-1 as int8 rows, row i = i written in base N (gene 0 most significant)."""
    genes = int(gene_of_slot(coupled, architecture).max()) + 1
    idx = np.arange(start, stop, dtype=np.int64)
    powers = num_models ** np.arange(genes - 1, -1, -1, dtype=np.int64)
    return _expand(((idx[:, None] // powers) % num_models).astype(np.int8), coupled, architecture)


def all_strategies(num_models: int = 2, coupled: bool = False,
                   architecture: str | SlotTable | None = None) -> np.ndarray:
    """Every strategy as an (N^genes, slots) int8 matrix, row i = i written in base N (gene 0 most significant)."""
    _, total = _exhaustive_size(num_models, coupled, architecture)
    return _strategy_rows(num_models, coupled, architecture, 0, total)


def exhaustive_search(num_models: int = 2, coupled: bool = False, weights: Mapping[str, float] | None = None,
                      architecture: str = "pmoe") -> Strategy:
    weights = resolve_weights(weights)
    table = slot_table(architecture)
    _, total = _exhaustive_size(num_models, coupled, table)
    best_row, best_score = None, -np.inf
    for start in range(0, total, EXHAUSTIVE_CHUNK):
        rows = _strategy_rows(num_models, coupled, table, start, min(start + EXHAUSTIVE_CHUNK, total))
        scores = fitness(rows, num_models, weights, table)
        i = int(np.argmax(scores))  # the first maximum of the chunk; a later chunk must beat it strictly
        if scores[i] > best_score:
            best_row, best_score = rows[i], scores[i]
    return Strategy(tuple(best_row), num_models, coupled, weights, "exhaustive", {"strategies": total},
                    table.architecture)


def _rank(genomes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique genomes sorted by fitness (descending), ties lexicographically."""
    genomes, first = np.unique(genomes, axis=0, return_index=True)
    scores = scores[first]
    order = np.argsort(-np.round(scores, 9), kind="stable")
    return genomes[order], scores[order]


def evolutionary_search(num_models: int, coupled: bool = False, weights: Mapping[str, float] | None = None,
                        config: EvolutionConfig | Mapping[str, Any] | None = None,
                        architecture: str = "pmoe") -> Strategy:
    cfg = config if isinstance(config, EvolutionConfig) else EvolutionConfig.from_dict(config)
    weights = resolve_weights(weights)
    table = slot_table(architecture)
    genes = int(gene_of_slot(coupled, table).max()) + 1
    rng = np.random.default_rng(cfg.seed)
    score = lambda g: fitness(_expand(g, coupled, table), num_models, weights, table)
    pop = rng.integers(0, num_models, size=(cfg.population, genes))
    pop, fit = _rank(pop, score(pop))
    history = [float(fit[0])]
    for _ in range(cfg.generations):
        entrants = rng.integers(0, len(pop), size=(cfg.children, cfg.tournament))
        winners = entrants[np.arange(cfg.children), np.argmax(fit[entrants], axis=1)]
        children = pop[winners].copy()
        rows = np.arange(cfg.children)
        pos = rng.integers(0, genes, size=cfg.children)
        children[rows, pos] = (children[rows, pos] + rng.integers(1, num_models, size=cfg.children)) % num_models
        pop, fit = _rank(np.concatenate([pop, children]), np.concatenate([fit, score(children)]))
        pop, fit = pop[:cfg.population], fit[:cfg.population]
        history.append(float(fit[0]))
    settings = {**asdict(cfg), "best_by_generation": history}
    return Strategy(tuple(_expand(pop[:1], coupled, table)[0]), num_models, coupled, weights, "evolution", settings,
                    table.architecture)


def search_strategy(num_models: int, coupled: bool = False, weights: Mapping[str, float] | None = None,
                    evolution: EvolutionConfig | Mapping[str, Any] | None = None,
                    architecture: str = "pmoe") -> Strategy:
    """Exhaustive for N = 2, evolution for N >= 3."""
    if num_models == 2:
        return exhaustive_search(2, coupled, weights, architecture)
    return evolutionary_search(num_models, coupled, weights, evolution, architecture)
