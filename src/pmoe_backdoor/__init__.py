"""pmoe_backdoor: backdoor attacks on patch-level Mixture-of-Experts (pMoE) image classifiers.

The library behind the Snakemake workflow; every piece is importable and tested without Snakemake.
Modules: ``data`` (datasets in one canonical uint8 form), ``models`` (the faithful pMoE and a dense WRN),
``triggers`` and ``poison`` (the attack), ``train`` and ``evaluate`` (the engine), ``io`` (atomic,
pickle-free files).
"""

__version__ = "0.1.0"
