"""The workflow's jobs, one module per stage, named like the stage's rule file (rules/<stage>.smk) and its
scripts' folder (workflow/scripts/<stage>/): data, poison, train, evaluate, defense, analysis, deploy, report.

Each job takes plain paths, config blocks and the run's seed (a job with many of them takes one frozen dataclass,
``<Name>Job``, whose ``from_context`` reads it from a rule's input, output, params and wildcards), writes its outputs
atomically, and can be called (and is tested) without Snakemake; ``common`` is the opening they share, ``wrapper`` the
one of the workflow scripts that call them.
"""

from ..runtime import reuse_freed_memory

# Every compute job's script imports this package: its process keeps freed memory for reuse instead of taking fresh
# pages from the kernel for each large tensor (runtime.reuse_freed_memory; CPU training 1.1-1.5x). Done here, not in
# the scripts, because Snakemake reruns a finished job whose script changed.
reuse_freed_memory()
