"""pmoe_backdoor: backdoor attacks on patch-level Mixture-of-Experts (pMoE) image classifiers.

The library behind the Snakemake workflow; every piece is importable and tested without Snakemake. Grouped by
concern, each group's registry (where it has one) at its root:

- ``data``: datasets in one canonical uint8 form, from torchvision, npz files, image folders or synthetic;
- ``models``: the faithful pMoE and a dense WRN (``architectures``), their inference form, model files
  (``checkpoint``), routing analysis, K models as one batched computation (``packed``);
- ``attacks``: triggers, poisoning, and the compression-activated attack (with its fake quantisation);
- ``defenses``: Fine-Pruning, Neural Cleanse, STRIP, Activation Clustering, Spectral Signatures, merging (WAG, MSD);
- ``deployment``: the precisions a model is deployed at (simulated int8 / int4, oneDNN int8 kernels);
- ``training``: the training loop and packed training; ``evaluate``: BA, ASR, per-class accuracy;
- ``reporting``: the study's tables and figures, table formats, the config page;
- ``plan``: which jobs a config plans and what each is given (no torch: the DAG build imports it);
- plumbing: ``runtime`` (devices, precision, seeds, logs), ``io`` (atomic, pickle-free files), ``naming`` (run
  names in paths), ``config_check`` and ``study_checks`` (the config's schema and cross-field checks), ``status``
  (``pmoe-status``), ``cpu_estimate``;
- ``jobs``: one module per workflow stage, the functions the workflow's scripts call.
"""

__version__ = "0.1.0"
