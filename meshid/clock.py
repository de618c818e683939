"""The clock a process reads: wall time and monotonic time, one value passed down.

A composition root (`meshid ca serve`'s setup, each command that opens the
authority, `meshid sidecar run`, a benchmark) builds the system clock once
(`Clock()` or `system_clock()`) and hands it to what it builds; nothing below
reads a clock of its own. Wall time dates and judges certificates and records;
monotonic time measures intervals (caches, throttles, durations) and never
jumps when the wall clock is set. A test builds a `ManualClock` instead and
moves both together, so time-dependent logic needs no waiting and no
patching. Pure: nothing here reads a clock until a composition root asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Clock:
    """A wall clock (UTC-aware) and a monotonic clock (seconds), read together.

    Built with no arguments, it reads the host's clocks.
    """

    wall: Callable[[], datetime] = _utc_now
    monotonic: Callable[[], float] = time.monotonic


def system_clock() -> Clock:
    """The host's clocks; for composition roots only (a test guards this in ca/)."""
    return Clock()


class ManualClock(Clock):
    """A clock that moves only when told to, wall and monotonic by the same amount."""

    now: datetime
    elapsed: float

    def __init__(self, start: datetime | None = None, *, monotonic: float = 0.0) -> None:
        begin = start if start is not None else _utc_now()
        if begin.tzinfo is None:
            raise ValueError("a clock's wall time is timezone-aware")
        super().__init__(wall=self._wall, monotonic=self._monotonic)
        self.now = begin.astimezone(UTC)
        self.elapsed = monotonic

    def advance(self, delta: timedelta | float) -> None:
        """Move both clocks forward by `delta` (a monotonic clock never goes back)."""
        seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now += timedelta(seconds=seconds)
        self.elapsed += seconds

    def set_wall(self, wall: datetime) -> None:
        """Jump the wall clock, as an operator or NTP might; the monotonic clock stays."""
        if wall.tzinfo is None:
            raise ValueError("a clock's wall time is timezone-aware")
        self.now = wall.astimezone(UTC)

    def _wall(self) -> datetime:
        return self.now

    def _monotonic(self) -> float:
        return self.elapsed
