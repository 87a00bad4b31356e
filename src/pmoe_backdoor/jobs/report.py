"""Report stage: every run's metrics in one table, the paper's Tables 1-3 beside the published values, and the
attack and pruning figures, and the configuration used."""

from ..reporting.configpage import config_record
from ..reporting.figures import attack_figure, prune_sweep_figure
from ..reporting.summaries import attack_table, collect_runs, fine_pruning_table

__all__ = ["attack_figure", "attack_table", "collect_runs", "config_record", "fine_pruning_table",
           "prune_sweep_figure"]
