"""Failure-based rate limiting: a source that keeps failing is refused for a while.

Pure: time is passed in. The control plane uses `FailureLimiter` to slow
down token guessing (join tokens carry 256 bits, so this protects the
database and the logs more than the tokens); the sidecar uses it to
quarantine a peer that keeps failing authentication or authorisation.
`OncePerWindow` lets one event per key through per window and counts the
rest: the control plane audits a refused management call with it, and lets
a workload's reports change the addresses it advertises at that pace.
`TokenBucket` lets a burst through per key, then a steady rate: the control
plane bounds how often one identity renews with it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class FailureLimiter:
    max_failures: int = 5
    window: float = 60.0
    block: float = 60.0
    max_sources: int = 10000
    _failures: dict[str, deque[float]] = field(default_factory=dict)
    _blocked_until: dict[str, float] = field(default_factory=dict)

    def blocked(self, source: str, now: float) -> float:
        """Seconds `source` must still wait (0 when it may try)."""
        until = self._blocked_until.get(source)
        if until is None:
            return 0.0
        if now >= until:
            del self._blocked_until[source]
            return 0.0
        return until - now

    def failed(self, source: str, now: float) -> bool:
        """Record a failure; True when it tips `source` into being blocked."""
        if len(self._failures) >= self.max_sources and source not in self._failures:
            self._prune(now)
        times = self._failures.setdefault(source, deque())
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.max_failures:
            self._blocked_until[source] = now + self.block
            times.clear()
            return True
        return False

    def active(self, now: float) -> dict[str, float]:
        """Every source blocked at `now`, with the seconds it has left."""
        return {s: until - now for s, until in self._blocked_until.items() if until > now}

    def _prune(self, now: float) -> None:
        for source in list(self._failures):
            times = self._failures[source]
            if not times or times[-1] <= now - self.window:
                del self._failures[source]


@dataclass(slots=True)
class OncePerWindow:
    """One event per key per `window` let through; those left out meanwhile counted.

    `admit` says, for each event, whether to record it and how many of the
    key's events were left out since the last one recorded, so the record
    still tells how many there were. At most `max_keys` keys are held: past
    that the oldest is forgotten (its count is lost, its next event recorded).
    """

    window: float = 60.0
    max_keys: int = 10000
    # key: (when its last event was recorded, how many were left out since)
    _seen: dict[str, tuple[float, int]] = field(default_factory=dict)

    def recent(self, key: str, now: float) -> bool:
        """Whether an event of `key` was recorded less than a window ago."""
        seen = self._seen.get(key)
        return seen is not None and now - seen[0] < self.window

    def admit(self, key: str, now: float) -> int | None:
        """None to leave this event out; else the number left out before it."""
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.window:
            self._seen[key] = (seen[0], seen[1] + 1)
            return None
        if seen is None and len(self._seen) >= self.max_keys:
            for old in [k for k, (at, _) in self._seen.items() if now - at >= self.window]:
                del self._seen[old]
            if len(self._seen) >= self.max_keys:
                del self._seen[next(iter(self._seen))]
        self._seen.pop(key, None)  # re-inserted last: the oldest stays first
        self._seen[key] = (now, 0)
        return 0 if seen is None else seen[1]


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """A token bucket's rules: `capacity` tokens, refilled at `capacity` per `period` seconds.

    Pure: the caller keeps each key's (tokens, when) wherever it must be
    shared (the control plane keeps them in its database, so every worker
    and instance spends from one bucket) and passes the time in. A key with
    no record holds a full bucket.
    """

    capacity: int
    period: float

    def level(self, held: tuple[float, float] | None, now: float) -> float:
        """Tokens in a bucket that held `held` = (tokens, at), as of `now`."""
        if held is None:
            return float(self.capacity)
        tokens, at = held
        return min(float(self.capacity), tokens + max(0.0, now - at) * self.capacity / self.period)

    def wait(self, tokens: float) -> float:
        """Seconds until a bucket holding `tokens` has one to spend (0: it has one now)."""
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) * self.period / self.capacity
