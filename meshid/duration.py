"""Durations as operators write them: ``30s``, ``15m``, ``1h``, ``7d``.

A compound such as ``1h30m`` is accepted too; anything else is refused rather
than guessed at.
"""

from __future__ import annotations

import re
from datetime import timedelta

from meshid.errors import InvalidDuration

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"([0-9]{1,9})([smhd])")  # not \d: that takes any Unicode digit
_MAX = timedelta(days=36500)


def parse_duration(text: str) -> timedelta:
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    if not text:
        raise InvalidDuration(f"{shown}: empty duration (write e.g. 30s, 15m, 1h, 7d)")
    pos = 0
    total = 0
    seen: set[str] = set()
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            raise InvalidDuration(f"{shown}: not a duration (write e.g. 30s, 15m, 1h, 7d)")
        unit = match.group(2)
        if unit in seen:
            raise InvalidDuration(f"{shown}: unit {unit!r} given twice")
        seen.add(unit)
        total += int(match.group(1)) * _UNITS[unit]
        pos = match.end()
    if total <= 0:
        raise InvalidDuration(f"{shown}: must be longer than zero")
    if total > _MAX.total_seconds():  # before timedelta(), which overflows on 999999999d…
        raise InvalidDuration(f"{shown}: longer than 100 years")
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds <= 0:
        return "0s"
    parts = []
    for unit in ("d", "h", "m", "s"):
        count, seconds = divmod(seconds, _UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
