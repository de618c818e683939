"""The registry of live connections: who is talking to whom, since when, how much.

Every proxied connection registers here for its whole life. The registry is
what re-checks live connections when the policy or the peer's certificate
changes (closing exactly those that became denied, with a reason), what
enforces the idle timeout, and what drains on shutdown. Byte counts are
plain integers on the entry, summed at scrape time, so the copy loop pays
nothing for metrics. Established connections are also indexed by
(direction, peer ID), so that a policy change looks only at the peers it
concerns (sidecar/rejudge.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import trio

from meshid.spiffeid import SpiffeId


@dataclass(eq=False, slots=True)
class LiveConnection:
    id: int
    direction: str
    local_id: SpiffeId
    peer_addr: str
    started: float  # trio clock
    started_wall: datetime
    scope: trio.CancelScope
    peer_id: SpiffeId | None = None
    peer_serial: int | None = None
    peer_not_after: datetime | None = None
    bytes_in: int = 0  # from the peer to the local app
    bytes_out: int = 0  # from the local app to the peer
    last_activity: float = 0.0
    close_reason: str | None = None
    established: bool = False
    original_dst: str | None = None  # a captured connection's destination (SO_ORIGINAL_DST)

    def close(self, reason: str) -> None:
        """Ask the connection to end; the first reason given is the one logged."""
        if self.close_reason is None:
            self.close_reason = reason
        self.scope.cancel()


@dataclass(slots=True)
class Registry:
    clock: Callable[[], float] = trio.current_time
    _live: dict[int, LiveConnection] = field(default_factory=dict)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    closed_bytes_in: dict[str, int] = field(default_factory=dict)
    closed_bytes_out: dict[str, int] = field(default_factory=dict)
    _empty: trio.Event | None = None
    _by_peer: dict[tuple[str, SpiffeId], dict[int, LiveConnection]] = field(default_factory=dict)

    def open(
        self,
        direction: str,
        local_id: SpiffeId,
        peer_addr: str,
        scope: trio.CancelScope,
        wall: datetime,
    ) -> LiveConnection:
        now = self.clock()
        entry = LiveConnection(
            next(self._ids), direction, local_id, peer_addr, now, wall, scope, last_activity=now
        )
        self._live[entry.id] = entry
        return entry

    def establish(self, entry: LiveConnection) -> None:
        """Index an entry the gate let in (its peer_id set) under (direction, peer)."""
        if entry.peer_id is not None and entry.id in self._live:
            self._by_peer.setdefault((entry.direction, entry.peer_id), {})[entry.id] = entry

    def peers(self) -> Mapping[tuple[str, SpiffeId], Mapping[int, LiveConnection]]:
        """Established connections by (direction, peer ID): the index itself, read-only."""
        return self._by_peer

    def remove(self, entry: LiveConnection) -> None:
        if self._live.pop(entry.id, None) is None:
            return
        if entry.peer_id is not None:
            key = (entry.direction, entry.peer_id)
            group = self._by_peer.get(key)
            if group is not None:
                group.pop(entry.id, None)
                if not group:
                    del self._by_peer[key]
        d = entry.direction
        self.closed_bytes_in[d] = self.closed_bytes_in.get(d, 0) + entry.bytes_in
        self.closed_bytes_out[d] = self.closed_bytes_out.get(d, 0) + entry.bytes_out
        if not self._live and self._empty is not None:
            self._empty.set()
            self._empty = None

    def __len__(self) -> int:
        return len(self._live)

    def live(self) -> list[LiveConnection]:
        return list(self._live.values())

    def count(self, direction: str) -> int:
        return sum(1 for c in self._live.values() if c.direction == direction)

    def bytes_total(self, direction: str) -> tuple[int, int]:
        live = [c for c in self._live.values() if c.direction == direction]
        return (
            self.closed_bytes_in.get(direction, 0) + sum(c.bytes_in for c in live),
            self.closed_bytes_out.get(direction, 0) + sum(c.bytes_out for c in live),
        )

    async def wait_empty(self) -> None:
        if not self._live:
            return
        if self._empty is None:
            self._empty = trio.Event()
        await self._empty.wait()

    def close_where(
        self,
        predicate: Callable[[LiveConnection], str | None],
        *,
        among: Iterable[int] | None = None,
    ) -> int:
        """Close every established connection for which `predicate` names a reason.

        `among`: look only at the connections of these ids (the others are kept).
        """
        if among is None:
            entries = list(self._live.values())
        else:
            entries = [e for e in map(self._live.get, among) if e is not None]
        closed = 0
        for entry in entries:
            if not entry.established:
                continue
            reason = predicate(entry)
            if reason is not None:
                entry.close(reason)
                closed += 1
        return closed

    def close_all(self, reason: str) -> None:
        for entry in list(self._live.values()):
            entry.close(reason)
