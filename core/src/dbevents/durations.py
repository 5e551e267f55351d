"""Parsing human durations such as "7d", "12h", "90s", "250ms"."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration(text: str | int | float) -> float:
    """Seconds in ``text``; a bare number is seconds. ValueError names the problem."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like '7d', got {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"a duration cannot be negative, got {text!r}")
        return float(text)
    m = _RE.match(text)
    if not m:
        raise ValueError(
            f"expected a duration like '7d', '12h', '30m', '45s' or '500ms', got {text!r}"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """``seconds`` the way a user writes it in the config: 7d, 12h, 90s, 250ms.
    The largest unit that divides it evenly (weeks left out: 14d reads better
    than 2w); otherwise seconds with their decimals."""
    for unit in ("d", "h", "m", "s", "ms"):
        count = seconds / _UNITS[unit]
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"
