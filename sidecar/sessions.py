"""The outbound side's TLS sessions for resumption: a few per upstream, each offered once.

Theory of operation. A TLS 1.3 session ticket is meant for one connection
(RFC 8446, C.4: reusing it lets an observer link connections, and a server
may refuse a second use). So a connection to an upstream takes a session
from the cache (the newest, the least likely to have expired) and offers it;
when the connection ends well it puts back the session its own handshake
left (a fresh ticket from the upstream). Concurrent connections to one
upstream therefore each need a session of their own, which is why there are
several per upstream. Bounded: `per_upstream` each (the oldest goes first)
and `total` in all (the upstream put to longest ago loses its oldest). A
session older than `max_age` is dropped unused: the upstream would refuse
it, and a refused ticket costs a full handshake anyway.

The cache belongs to one credential generation (`sidecar.credentials`), so a
session never outlives the trust bundles its full handshake was judged
under. Pure: no I/O, time passed in; the sessions are opaque values.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

S = TypeVar("S")

SESSIONS_PER_UPSTREAM = 32  # about the connections one upstream opens at once
SESSIONS_TOTAL = 1024  # a few KiB each (the ticket, the upstream's certificate chain)


class SessionCache(Generic[S]):
    def __init__(
        self,
        *,
        max_age: float,
        per_upstream: int = SESSIONS_PER_UPSTREAM,
        total: int = SESSIONS_TOTAL,
    ) -> None:
        self.max_age = max_age
        self.per_upstream = per_upstream
        self.total = total
        # Upstream -> (time kept, session), oldest first; dict order is put order.
        self._by_upstream: dict[str, deque[tuple[float, S]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def take(self, upstream: str, now: float) -> S | None:
        """The newest live session for `upstream`, removed: it is offered once."""
        kept = self._by_upstream.get(upstream)
        while kept:
            at, session = kept.pop()
            self._count -= 1
            if now - at < self.max_age:
                if not kept:
                    del self._by_upstream[upstream]
                return session
            # The newest is too old, so the rest are too.
            self._count -= len(kept)
            kept.clear()
        self._by_upstream.pop(upstream, None)
        return None

    def put(self, upstream: str, session: S, now: float) -> None:
        if self.per_upstream <= 0 or self.total <= 0:
            return
        kept = self._by_upstream.pop(upstream, None)
        if kept is None:
            kept = deque()
        self._by_upstream[upstream] = kept  # now the most recently put
        if len(kept) >= self.per_upstream:
            kept.popleft()
            self._count -= 1
        while self._count >= self.total:
            oldest = next(iter(self._by_upstream))
            victims = self._by_upstream[oldest]
            victims.popleft()
            self._count -= 1
            if not victims and oldest != upstream:
                del self._by_upstream[oldest]
        kept.append((now, session))
        self._count += 1
