"""Training: the loop (``loop``) and K models trained as one batched computation (``packed``)."""
