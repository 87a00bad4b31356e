"""The workflow's jobs, one module per stage, named like the stage's rule file (rules/<stage>.smk) and its
scripts' folder (workflow/scripts/<stage>/): data, poison, train, evaluate, defense, analysis, deploy, report.

Each job takes plain paths, config blocks and the run's seed, writes its outputs atomically, and can be called
(and is tested) without Snakemake; ``common`` is the opening they share.
"""

from ..runtime import reuse_freed_memory

# Every compute job's script imports this package: its process keeps freed memory for reuse instead of taking fresh
# pages from the kernel for each large tensor (runtime.reuse_freed_memory; CPU training 1.1-1.5x). Done here, not in
# the scripts, because Snakemake reruns a finished job whose script changed.
reuse_freed_memory()
