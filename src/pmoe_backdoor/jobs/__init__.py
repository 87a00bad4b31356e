"""The workflow's jobs, one module per stage, named like the stage's rule file (rules/<stage>.smk) and its
scripts' folder (workflow/scripts/<stage>/): data, poison, train, evaluate, defense, analysis, deploy, report.

Each job takes plain paths, config blocks and the run's seed, writes its outputs atomically, and can be called
(and is tested) without Snakemake; ``common`` is the opening they share.
"""
