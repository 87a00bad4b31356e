"""Defenses: Fine-Pruning (``fine_pruning``), Neural Cleanse, STRIP, Activation Clustering, Spectral Signatures,
and the merging defenses (``merging``: weight averaging and the Module-Switching Defense)."""
