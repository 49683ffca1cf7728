"""Sizes as people write them (``4M``, ``10G``) and as they read them (``1.5 GiB``)."""
from __future__ import annotations

import argparse

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """``4M`` -> 4194304; plain numbers are bytes; K/M/G/T (optionally KiB/KB...) are powers of
    1024. Raises ``argparse.ArgumentTypeError`` (a ``ValueError``-like error) on nonsense."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    try:
        n = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (use e.g. 4M, 512K, 1G)") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: negative")
    return int(n * _UNITS[unit])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"
