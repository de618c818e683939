"""The connections a `sidecar.control.ControlClient` keeps open between requests.

Which idle connection may carry the next request, and when one is closed
instead: made with other credentials (a renewal, a new bundle), idle longer
than `POOL_IDLE` (well under the authority's 60 s), open longer than
`POOL_LIFETIME` (so that a new handshake checks everything again), its
server certificate expired, or closed by the authority meanwhile. At most
`POOL_SIZE` are kept; the newest is taken first. The why of keeping them is
in `sidecar.control`'s docstring.
"""

from __future__ import annotations

import select
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import h11
import trio

POOL_SIZE = 3  # idle connections the sidecar keeps per authority server
POOL_IDLE = 30.0  # seconds an idle connection is kept: the authority keeps one for 60 s
POOL_LIFETIME = 600.0  # seconds a connection is used at most, so a new handshake rechecks all


@dataclass(slots=True, eq=False)
class Kept:
    """One connection to the authority, open between requests."""

    stream: trio.SSLStream[Any]
    tcp: trio.SocketStream
    http: h11.Connection
    key: bytes | None  # the credentials it was made with (None: anonymous, never kept)
    server_not_after: datetime
    opened: float  # trio time
    idle_since: float = 0.0
    reusable: bool = False  # the last answer ended cleanly and the server keeps it open

    def closed_by_peer(self) -> bool:
        """True when the authority sent something while no request was outstanding: it
        can only be a close (its idle timeout, a restart)."""
        try:
            fd = self.tcp.socket.fileno()
            if fd < 0:
                return True
            # poll, not select: select's sets stop at descriptor 1,023, and a proxy holding
            # many connections has its kept ones past it (each would look closed).
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Closed at once, without a TLS goodbye: synchronous, so no cancellation skips it."""
        self.tcp.socket.close()


class KeptPool:
    """The idle connections to one authority server, oldest first."""

    def __init__(self) -> None:
        self._idle: list[Kept] = []
        self._latest: bytes | None = None  # the credentials of the newest request

    def __len__(self) -> int:
        return len(self._idle)

    def drop(self) -> None:
        """Close every idle connection now."""
        idle, self._idle = self._idle, []
        for kept in idle:
            kept.close()

    def tidy(self, key: bytes | None, now: datetime, *, idle_limit: float, skew: timedelta) -> None:
        """Close the idle connections no request may use: other credentials (a renewal,
        a new bundle), idle or open too long, a server certificate expired, closed by the
        authority."""
        clock = trio.current_time()
        if key is not None:
            self._latest = key
        keep: list[Kept] = []
        for kept in self._idle:
            usable = (
                kept.key == self._latest
                and clock - kept.idle_since < idle_limit
                and clock - kept.opened < POOL_LIFETIME
                and now <= kept.server_not_after + skew
                and not kept.closed_by_peer()
            )
            if usable:
                keep.append(kept)
            else:
                kept.close()
        self._idle = keep

    def take(self, key: bytes | None) -> Kept | None:
        """The newest idle connection made with these credentials, if any."""
        for i in range(len(self._idle) - 1, -1, -1):
            if self._idle[i].key == key:
                return self._idle.pop(i)
        return None

    def put_back(self, kept: Kept, size: int) -> bool:
        """Keep `kept` for the next request if it may serve one and there is room;
        False: the caller closes it."""
        if (
            kept.reusable
            and kept.key is not None
            and kept.key == self._latest
            and len(self._idle) < size
        ):
            kept.reusable = False
            kept.idle_since = trio.current_time()
            self._idle.append(kept)
            return True
        return False
