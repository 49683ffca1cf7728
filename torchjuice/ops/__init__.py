"""Operations on a whole volume: compaction, garbage collection, fsck, the trash, metrics export.

These run below the PyTorch layer: they use the metadata engine, the block layer and the object
store of a :class:`~torchjuice.volume.Volume` directly. The command line wraps them
(``torchjuice gc|fsck|dump|load|compact``); ``docs/operations.md`` explains them.
"""
from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*$", re.I)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str | float | int) -> float:
    """``90`` / ``90s`` / ``30m`` / ``1h`` / ``2d`` / ``1w`` -> seconds. ValueError on nonsense."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 30m, 1h, 2d)")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


__all__ = ["parse_duration"]
