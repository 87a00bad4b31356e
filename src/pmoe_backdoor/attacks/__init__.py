"""Attacks: triggers (``triggers``), poisoned training sets (``poison``), and backdoors that appear only after
compression (``compression``, trained with the fake quantisation of ``fakequant``).

The trigger registry lives here, without torch: the DAG build reads what a kind of trigger *is* (does each run draw
its own, does routing analysis apply) before any tensor exists; its implementation, a ``Trigger`` subclass, is
imported only when a trigger is built or loaded. Adding a trigger: a ``Trigger`` subclass (``apply``, ``params``,
``from_config``, ``from_file``), one ``register_trigger`` line below, and its parameters in config/schema.yaml's
``trigger`` definition (tests/test_registries.py checks the schema's kinds against this registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..registry import Registry, import_attribute


@dataclass(frozen=True)
class TriggerKind:
    """A kind of trigger (the config's ``kind``) and the properties the workflow decides on."""

    name: str
    implementation: str  # "module:Class" of its Trigger subclass
    # drawn anew from each run's seed (the authors drew WaNet's grid once per notebook session), else one trigger
    # from attack.trigger_seed for every run
    fresh_per_run: bool = False
    # the authors' fine-tuning array kept the triggered images with their true labels (an in-place side effect of
    # their square trigger): Fine-Pruning's faithful 'authors' fine-tuning set includes them
    contaminates_authors_finetuning: bool = False
    # writes fixed pixels (a box): routing statistics can count how often that patch reaches the experts
    patch_located: bool = False

    def load(self) -> type:
        return import_attribute(self.implementation)


# keys of a trigger's config block that change how the attacker trains, not the pattern: the trigger file is made
# without them, the run's training settings carry them (attacks.router_evasion; patch-located kinds only)
TRAINING_TERMS = ("router_evasion",)

TRIGGERS: Registry[TriggerKind] = Registry("trigger kind")
register_trigger = TRIGGERS.register
trigger_kind = TRIGGERS.lookup


def make_trigger(kind: str, params: dict[str, Any] | None = None, seed: int = 0) -> Any:
    """A trigger of ``kind`` from its config block (unknown keys are an error naming them) and the seed it draws
    from (when it draws anything)."""
    return trigger_kind(kind).load().from_config(dict(params or {}), seed)


register_trigger(TriggerKind("square", "pmoe_backdoor.attacks.triggers:SquareTrigger",
                             contaminates_authors_finetuning=True, patch_located=True))
register_trigger(TriggerKind("blend", "pmoe_backdoor.attacks.triggers:BlendTrigger"))
register_trigger(TriggerKind("warp", "pmoe_backdoor.attacks.triggers:WarpTrigger", fresh_per_run=True))
