"""One clock per process: the wall clock and the monotonic clock, as one value.

Pure. A composition root builds one `Clock` and passes it down, so that every
judgement of time in the process (certificate validity, expiry, not-yet-valid,
renewal) reads the same clock, and a test can swap in a `ManualClock` that it
moves by hand instead of waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class Clock:
    """The system's clocks. No fields: frozen, yet `ManualClock` may keep its own state."""

    def wall(self) -> datetime:
        """Now, UTC-aware."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        return time.monotonic()


class ManualClock(Clock):
    """A clock that moves only when told to, for tests."""

    def __init__(self, wall: datetime | None = None, monotonic: float = 0.0) -> None:
        start = wall if wall is not None else datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware wall time")
        self._wall = start.astimezone(UTC)
        self._monotonic = monotonic

    def wall(self) -> datetime:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both clocks forward (never back: a monotonic clock cannot)."""
        if seconds < 0:
            raise ValueError("a clock only moves forward")
        self._wall += timedelta(seconds=seconds)
        self._monotonic += seconds

    def set_wall(self, wall: datetime) -> None:
        """Jump the wall clock, as an operator or NTP might; the monotonic clock stays."""
        if wall.tzinfo is None:
            raise ValueError("ManualClock needs a timezone-aware wall time")
        self._wall = wall.astimezone(UTC)
