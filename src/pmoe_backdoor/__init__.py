"""pmoe_backdoor: backdoor attacks on patch-level Mixture-of-Experts (pMoE) image classifiers.

The library behind the Snakemake workflow; every piece is importable and tested without Snakemake.

- the study's pieces: ``data`` (datasets in one canonical uint8 form), ``models`` (the faithful pMoE and a dense
  WRN), ``triggers`` and ``poison`` (the attack), ``train`` and ``evaluate`` (the engine), ``packed`` (K models
  trained as one batched computation), ``fineprune`` (the defense), ``routing`` (patch-selection analysis),
  ``quantize`` (deployment precisions), ``neural_cleanse`` (trigger reconstruction);
- results: ``summaries`` (the study's tables), ``tables`` (table formats), ``figures``;
- plumbing: ``runtime`` (devices, precision, seeds, logs), ``checkpoint`` (model files), ``io`` (atomic,
  pickle-free files), ``naming`` (run names in paths);
- ``jobs``: one module per workflow stage (data, poison, train, evaluate, defense, analysis, deploy, report), the
  functions the workflow's scripts call.
"""

__version__ = "0.1.0"
