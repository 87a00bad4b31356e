"""Attacks: triggers (``triggers``), poisoned training sets (``poison``), and backdoors that appear only after
compression (``compression``, trained with the fake quantisation of ``fakequant``)."""
