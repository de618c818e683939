"""Which authority server to ask, and how long to wait before moving to the next one.

Pure: the time and the random numbers come in as arguments, so the schedule
is tested without a clock or a socket. The trio shell (`sidecar.link`) asks
it before and after every request to the control plane.

Theory of operation. `authority.server` may name several `meshid ca serve`
instances of one trust domain. The sidecar sticks to the one that works: a
success never moves it, not even back to the first in the list, so an
instance that comes back is not rushed by every sidecar that left it. A
failure that another instance may not share (it did not answer, TLS failed,
it answered 5xx, it is not the authority) moves to the next server in the
list, round robin, but not at once: the next attempt waits a delay drawn
uniformly from zero to ``min(cap, base * 2 ** (failures - 1))`` ("full
jitter"), where `failures` counts the failures since the last success. So
the sidecars that lose the same instance arrive at the next one spread over
that window (two seconds for the first move: not all in the same second,
yet a deny still arrives within a few), and while every instance is down
they back off to `cap` and come back spread over it, rather than all in the
same second when one returns. A success resets the count.

Several duties (renewal, the feed, the report) share one `ServerChoice`: a
failure of a server that is no longer the current one (a request that was
already in flight when another duty moved on) moves nothing, and every
request waits for the same gate (`wait`), so a sidecar arrives at the next
server once, not once per duty.

With a single server there is nowhere to move: `failed` returns None and
sets no gate, and the duties retry with their own backoff as they always did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_SERVERS = 16  # authority.server names at most this many
FAILOVER_BASE = 2.0  # seconds: the first move waits up to this long
FAILOVER_CAP = 30.0  # seconds: no move waits longer than this


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter."""

    base: float = FAILOVER_BASE
    cap: float = FAILOVER_CAP

    def ceiling(self, failures: int) -> float:
        """The longest wait after `failures` consecutive failures (none after none)."""
        if failures <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - 1, 64))

    def delay(self, failures: int, rand: float) -> float:
        """A wait drawn uniformly from [0, ceiling): `rand` is uniform in [0, 1)."""
        return rand * self.ceiling(failures)


@dataclass(frozen=True, slots=True)
class Move:
    """The choice moved from server `left` to server `to` (indexes), after `delay` seconds."""

    left: int
    to: int
    delay: float
    failures: int


class ServerChoice:
    """The server in use among `count`, the failures since the last success, the gate."""

    def __init__(self, count: int, backoff: Backoff | None = None) -> None:
        if not 1 <= count <= MAX_SERVERS:
            raise ValueError(f"between 1 and {MAX_SERVERS} servers, not {count}")
        self.count = count
        self.backoff = backoff or Backoff()
        self.index = 0  # the server in use
        self.failures = 0  # consecutive failures since the last success
        self.not_before = -math.inf  # no attempt starts before this time

    def wait(self, now: float) -> float:
        """Seconds to wait before the next attempt may start (0 when it may start now)."""
        return max(0.0, self.not_before - now)

    def failed(self, index: int, now: float, rand: float) -> Move | None:
        """Server `index` failed in a way the next one may not: move on, after a jittered wait.

        None when nothing moves: a single server, or a server that is no
        longer the current one (another request already moved on from it).
        """
        if self.count == 1 or index != self.index:
            return None
        self.failures += 1
        self.index = (self.index + 1) % self.count
        delay = self.backoff.delay(self.failures, rand)
        self.not_before = now + delay
        return Move(index, self.index, delay, self.failures)

    def succeeded(self, index: int) -> None:
        """Server `index` answered: stay with it, and the next failure starts the backoff over."""
        if index == self.index:
            self.failures = 0
            self.not_before = -math.inf
