"""What the sidecar answers with now: its credentials, its allow-list and its clock.

One small holder, swapped by reference: a rotation or a policy update
replaces `generation` or `policy` whole, and whoever reads them (the verify
callback, a new connection, the status report) takes the current value once
and keeps it. The clock is the process's one clock (`meshid.clock`), built by
the composition root; `clock_offset` is how far ours runs ahead of the
authority's, as dynamic mode last measured it (zero in static mode).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol

from meshid.clock import Clock
from meshid.policy import Policy
from meshid.spiffeid import SpiffeId
from sidecar.credentials import Generation, Svid


class Current:
    def __init__(self, identity: SpiffeId, clock: Clock, skew: timedelta) -> None:
        self.identity = identity
        self.clock = clock
        self.skew = skew  # the clock skew between peers that we tolerate
        self.generation: Generation | None = None
        self.policy = Policy.build([], 0)
        self.clock_offset = timedelta(0)  # ours minus the authority's
        self._generations = 0

    def wall(self) -> datetime:
        return self.clock.wall()

    def svid(self) -> Svid | None:
        return self.generation.svid if self.generation is not None else None

    def next_generation(self) -> int:
        """The number the next credentials get (their log lines and metrics say it)."""
        self._generations += 1
        return self._generations

    def svid_seconds_left(self) -> float | None:
        """Our SVID's time left, its NotAfter moved onto our clock by the measured offset."""
        if self.generation is None:
            return None
        expiry = self.generation.svid.not_after + self.clock_offset
        return (expiry - self.wall()).total_seconds()


class IdentitySource(Protocol):
    """Where credentials and policy come from: files (`sidecar.static`) or the authority
    (`sidecar.dynamic`). The composition root treats both alike."""

    task: str  # the duty's name, as an internal_error line names it

    async def start(self) -> None:
        """Put the first credentials (and policy) in force, or raise MeshIdError."""

    async def run(self) -> None:
        """Keep them current until cancelled."""
