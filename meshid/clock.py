"""The clock a process reads: wall time and monotonic time, one value passed down.

A composition root (`meshid ca serve`'s setup, each command that opens the
authority, a benchmark) builds `system_clock()` once and hands it to what it
builds; nothing below reads a clock of its own. Wall time dates certificates
and records; monotonic time measures intervals (caches, throttles, durations)
and never jumps when the wall clock is set. A test builds a `ManualClock`
instead and moves both together, so time-dependent logic needs no waiting and
no patching. Pure: nothing here reads a clock until a composition root asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class Clock:
    """A wall clock (UTC-aware) and a monotonic clock (seconds), read together."""

    wall: Callable[[], datetime]
    monotonic: Callable[[], float]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def system_clock() -> Clock:
    """The host's clocks; for composition roots only (a test guards this)."""
    return Clock(wall=_utc_now, monotonic=time.monotonic)


class ManualClock(Clock):
    """A clock that moves only when told to, wall and monotonic by the same amount."""

    now: datetime
    elapsed: float

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("a clock's wall time is timezone-aware")
        super().__init__(wall=self._wall, monotonic=self._monotonic)
        self.now = start
        self.elapsed = 0.0

    def advance(self, delta: timedelta) -> None:
        """Move both clocks forward by `delta` (a monotonic clock never goes back)."""
        if delta < timedelta(0):
            raise ValueError("a clock does not go back")
        self.now += delta
        self.elapsed += delta.total_seconds()

    def _wall(self) -> datetime:
        return self.now

    def _monotonic(self) -> float:
        return self.elapsed
