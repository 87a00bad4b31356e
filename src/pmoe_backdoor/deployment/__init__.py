"""Deployment precisions: simulated int8 (W8A8), int8_dynamic and int4 (``quantize``) and the same int8 on oneDNN's
integer kernels (``int8_backend``)."""
