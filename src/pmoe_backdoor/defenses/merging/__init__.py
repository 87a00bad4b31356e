"""Model merging against backdoors on pMoEs (and on PreAct-ResNet-18, the control architecture): weight averaging
(WAG) and the Module-Switching Defense (MSD, Li et al., ICLR 2026).

- :mod:`.slots`: the module slots and adjacency of each architecture (the pMoE's 17, PreAct-ResNet-18's 21), the
  state-dict-to-slot map;
- :mod:`.fitness`: the MSD fitness of strategies (vectorised, each term switchable; the function
  ``fitness.fitness`` is not re-exported here, so ``merging.fitness`` stays the module);
- :mod:`.search`: exhaustive (N = 2) and evolutionary (N >= 3) search, strategy files;
- :mod:`.merge`: WAG, merging by a strategy, the candidates (role assignments);
- :mod:`.selection`: the held-out clean set, the suspect class, the candidate to deploy;
- :mod:`.finetune`: victims fine-tuned from one ancestor;
- :mod:`.defend`: the merged models as deployed (fp32 / int8 / int4) and Fine-Pruned on the held-out clean set;
- :mod:`.report`: the tables and the strategy figure.
"""

from .finetune import FINETUNE_DEFAULTS, finetune_config, finetune_copy
from .fitness import TERMS, fitness_terms, resolve_weights
from .merge import candidate_assignments, merge_by_strategy, wag_merge
from .search import (
    EvolutionConfig,
    Strategy,
    evolutionary_search,
    exhaustive_search,
    load_strategy,
    save_strategy,
    search_strategy,
)
from .selection import InversionConfig, holdout_split, select_candidate, suspect_class
from .slots import NUM_SLOTS, SLOT_NAMES, TABLES, SlotTable, slot_parts, slot_table, slot_tensors, table_of

__all__ = [
    "FINETUNE_DEFAULTS", "finetune_config", "finetune_copy",
    "TERMS", "fitness_terms", "resolve_weights",
    "candidate_assignments", "merge_by_strategy", "wag_merge",
    "EvolutionConfig", "Strategy", "evolutionary_search", "exhaustive_search", "load_strategy", "save_strategy",
    "search_strategy",
    "InversionConfig", "holdout_split", "select_candidate", "suspect_class",
    "NUM_SLOTS", "SLOT_NAMES", "TABLES", "SlotTable", "slot_parts", "slot_table", "slot_tensors", "table_of",
]
