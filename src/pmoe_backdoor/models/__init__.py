"""Models: the architectures (``architectures``: the pMoE and a dense WRN), the inference form with folded
BatchNorms (``inference``), model files (``checkpoint``), routing analysis (``routing``) and K models as one batched
computation (``packed``)."""
