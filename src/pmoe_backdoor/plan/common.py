"""The plan's vocabulary: where results live, a run, a defense application, and config blocks as job params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..naming import CLEAN, parse_attack

RESULTS = "results"
# a trigger's second victim in a merging set is poisoned with run seed + 100, its third with + 200, ...
REPLICA_SEED_STEP = 100
# dataset sources with local data: the file or folder is an input of prepare_data and its content is digested
SOURCES_WITH_DATA = ("npz", "imagefolder")
# the keys of a defense's config block that choose which jobs exist (the job reads the others)
DEFENSE_SELECTION_KEYS = ("enabled", "precisions", "rates", "seeds")
# the training keys the fine-tuning inside Fine-Pruning and the merged models' defense do not read: they set
# their own epochs and lr (and no per-epoch evaluation), so a change of these must not rerun them
FINETUNE_OVERRIDES = ("epochs", "lr")
QUIET_FINETUNE_OVERRIDES = ("epochs", "lr", "eval_every")


def canonical(value: Any) -> Any:
    """A config block with its keys sorted at every level: Snakemake compares params as written, so key order
    alone must not make a job look changed."""
    if isinstance(value, Mapping):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def without(block: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    keys = set(keys)
    return canonical({k: v for k, v in block.items() if k not in keys})


@dataclass(frozen=True)
class Run:
    """One trained model of the main study: dataset, model, attack ('clean' or '{trigger}-{rate}') and seed."""

    dataset: str
    model: str
    attack: str
    seed: int

    @property
    def dir(self) -> str:
        return f"{RESULTS}/{self.dataset}/{self.model}/{self.attack}/seed{self.seed}"

    @property
    def trigger(self) -> str | None:
        return None if self.attack == CLEAN else parse_attack(self.attack)[0]


@dataclass(frozen=True)
class DefenseApplication:
    """One defense run on one model as deployed at one precision; ``path`` is its result file."""

    defense: str
    run_dir: str
    attack: str
    precision: str

    @property
    def path(self) -> str:
        return f"{self.run_dir}/{self.defense}/{self.precision}.json"


def table_files(name: str, extensions: Iterable[str] = ("csv", "md", "tex")) -> list[str]:
    return [f"{RESULTS}/tables/{name}.{ext}" for ext in extensions]

