"""Defenses: Fine-Pruning (``fine_pruning``), Neural Cleanse, STRIP, Activation Clustering, Spectral Signatures,
plain fine-tuning, and the merging defenses (``merging``: weight averaging and the Module-Switching Defense).

The registry of the defenses that the workflow runs on one model at one deployment precision (one generic rule,
``defend``, over ``{defense}`` and ``{precision}``; their summaries make the blindspot table). A defense is one module
of this package holding

- ``DEFENSE = {...}``, a literal block read here without importing the module (the DAG build imports no torch):
  ``name`` (the ``{defense}`` wildcard and its config block's key), ``title`` (in tables), ``level`` (``input``:
  decides per test input; ``data``: inspects the training set; ``model``: inspects or repairs the model), and
  optionally ``on_clean_models`` (default true: its flags on clean models are false positives; false for a defense
  that removes a backdoor rather than detecting one), ``artifacts`` (tensors it leaves beside its summary) and
  ``needs`` (a model capability of :class:`pmoe_backdoor.models.ModelKind`, e.g. ``routing``: the plan runs it only
  on models that have it);
- ``run(ctx: DefenseContext) -> DefenseResult``.

Adding a defense: that module, its config block in config/schema.yaml (``default: {}`` with its keys' defaults), and
a test; tests/test_registries.py checks that every registered defense has its block.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..models import ModelKind
from ..registry import Registry

SCHEMA = Path(__file__).resolve().parents[3] / "config" / "schema.yaml"

if TYPE_CHECKING:  # the types of what the job hands a defense; imported only by type checkers
    import torch

    from ..jobs.common import JobData, RunId

LEVELS = ("input", "data", "model")
# what a defense may need of a model: the ModelKind flags (routing, module_slots, prunable_channels)
CAPABILITIES = tuple(f.name for f in fields(ModelKind) if f.name not in ("name", "builder"))


@dataclass(frozen=True)
class DefenseSpec:
    """A registered defense, as its module's ``DEFENSE`` block declares it."""

    name: str
    title: str
    level: str
    module: str
    on_clean_models: bool = True
    artifacts: bool = False
    needs: str | None = None  # a ModelKind capability the examined model must have (None: every model)

    def load(self) -> Any:
        """The defense's module (its ``run``)."""
        return importlib.import_module(self.module)


@dataclass
class DefenseContext:
    """What the generic defense job hands a defense: one model of one run, as deployed at ``precision``."""

    job: JobData  # the dataset as tensors and the device
    run: RunId
    precision: str
    target: int  # the attack's target label (the config's), for the summaries
    config: dict[str, Any]  # the defense's config block
    model: torch.nn.Module  # the model as deployed at ``precision``
    deploy: Callable[[torch.nn.Module], torch.nn.Module]  # another model at the same precision and calibration
    load_model: Callable[[], torch.nn.Module]  # the trained fp32 model, fresh
    triggers: dict[str, str] = field(default_factory=dict)  # trigger files by name (the run's own, or for a clean
    #                                                          model every analysed trigger of its seed)
    poison: str | None = None  # the poison record of the training set the model was trained on
    # the training set the model was trained on (poisoned for an attack) as (images, labels)
    training_set: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class DefenseResult:
    """A defense's decision on one model and everything it measured."""

    flagged: bool  # detected (a detection defense) or removed (a removal defense: ASR after it below its level)
    target_found: bool | None = None  # among the labels it flags is the attack's target (None: it flags no label)
    details: dict[str, Any] = field(default_factory=dict)  # written into the summary beside the decision
    artifacts: dict[str, Any] = field(default_factory=dict)  # tensors saved beside the summary
    artifacts_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DefenseSummary:
    """A defense's summary file as the tables read it (written by the generic job)."""

    defense: str  # the registry name
    title: str
    dataset: str
    model: str
    attack: str
    seed: int
    precision: str
    flagged: bool
    target_found: bool | None
    asr_after: float | None
    fields: dict[str, Any]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "summary") -> "DefenseSummary":
        try:
            spec = DEFENSES[d["defense_name"]]
            return cls(spec.name, spec.title, d["dataset"], d["model"], d["attack"], int(d["seed"]), d["precision"],
                       bool(d["flagged"]), d["target_found"], d.get("asr_after"), d)
        except KeyError as exc:
            raise ValueError(f"{where}: not a defense summary of a registered defense (missing {exc})") from None


def _declared(path: Path) -> dict[str, Any] | None:
    """The literal ``DEFENSE = {...}`` block of a module, or None when it declares none."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DEFENSE" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def _discover() -> dict[str, DefenseSpec]:
    found = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        block = _declared(path)
        if block is None:
            continue
        spec = DefenseSpec(module=f"{__name__}.{path.stem}", **block)
        if spec.name != path.stem or spec.level not in LEVELS:
            raise ValueError(f"{path}: DEFENSE needs name {path.stem!r} (the module's) and a level of {LEVELS}")
        if spec.needs is not None and spec.needs not in CAPABILITIES:
            raise ValueError(f"{path}: DEFENSE's needs must be a model capability of {CAPABILITIES}, "
                             f"got {spec.needs!r}")
        found[spec.name] = spec
    return found


# the table's order: the paper's defenses first, then the baselines
_ORDER = ("neural_cleanse", "strip", "activation_clustering", "spectral_signatures")
DEFENSES: Registry[DefenseSpec] = Registry("defense")
for _name, _spec in sorted(_discover().items(), key=lambda kv: (_ORDER.index(kv[0]) if kv[0] in _ORDER
                                                                 else len(_ORDER), kv[0])):
    DEFENSES.register(_spec)


@functools.lru_cache(maxsize=None)
def schema_defaults(name: str) -> dict[str, Any]:
    """The defaults config/schema.yaml gives the keys of a defense's config block. The workflow hands a defense its
    validated block (defaults filled in); a job built by hand (a test, a notebook) may hand it only some keys, and
    the generic job fills the rest from here, so the schema stays the one place that states them."""
    import yaml

    if not SCHEMA.is_file():
        raise FileNotFoundError(f"{SCHEMA}: the config schema, needed for the defaults of the {name!r} block")
    props = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))["properties"][name]["properties"]
    return {k: v["default"] for k, v in props.items() if isinstance(v, dict) and "default" in v}
