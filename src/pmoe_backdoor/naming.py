"""How runs are named in paths and tables: an attack is 'clean' or '{trigger}-{rate}' with the rate in percent.

The one place that builds and parses these names (the rules, the tables and the figures all use it).
"""

from __future__ import annotations

CLEAN = "clean"


def fmt_rate(rate: float | str) -> str:
    """A poisoning rate (percent) as it appears in paths: 0.1 -> '0.1', 2.0 -> '2'."""
    return f"{float(rate):g}"


def attack_name(trigger: str, rate: float | str) -> str:
    return f"{trigger}-{fmt_rate(rate)}"


def parse_attack(attack: str) -> tuple[str, float]:
    """'square-0.5' -> ('square', 0.5); 'clean' -> ('clean', 0.0)."""
    if attack == CLEAN:
        return CLEAN, 0.0
    trigger, sep, rate = attack.rpartition("-")
    try:
        if not sep or not trigger:
            raise ValueError
        return trigger, float(rate)
    except ValueError:
        raise ValueError(f"attack {attack!r}: expected 'clean' or '<trigger>-<rate percent>', "
                         "e.g. 'square-2'") from None
