"""Refusals and cuts of the last hour, per (direction, peer, kind, reason), for the status report.

Pure: the caller gives the time (trio's clock). Counts are kept in one-minute
buckets, so a count falls out of the hour a minute at a time and memory is
bounded by MAX_KEYS keys times 60 buckets whatever the rate; past MAX_KEYS,
the key refused longest ago is forgotten (a scan of random IDs cannot grow it).
"""

from __future__ import annotations

from typing import Literal

from meshid.report import Direction, PairRefusal
from meshid.spiffeid import SpiffeId

WINDOW = 3600.0
BUCKET = 60.0
MAX_KEYS = 1024

Kind = Literal["deny", "cut"]
Key = tuple[Direction, SpiffeId, Kind, str]


class RecentRefusals:
    def __init__(self) -> None:
        self._counts: dict[Key, dict[int, int]] = {}  # oldest-touched key first

    def add(
        self, direction: Direction, peer: SpiffeId, kind: Kind, reason: str, now: float
    ) -> None:
        key = (direction, peer, kind, reason)
        buckets = self._counts.pop(key, {})
        minute = int(now // BUCKET)
        buckets[minute] = buckets.get(minute, 0) + 1
        self._counts[key] = buckets
        while len(self._counts) > MAX_KEYS:
            del self._counts[next(iter(self._counts))]

    def recent(self, now: float) -> list[PairRefusal]:
        """Counts of the last hour, the largest first; keys with none left are dropped."""
        oldest = int((now - WINDOW) // BUCKET) + 1
        out: list[PairRefusal] = []
        for key in list(self._counts):
            buckets = self._counts[key]
            for minute in [m for m in buckets if m < oldest]:
                del buckets[minute]
            if not buckets:
                del self._counts[key]
                continue
            direction, peer, kind, reason = key
            out.append(PairRefusal(direction, peer, kind, reason, sum(buckets.values())))
        out.sort(key=lambda r: (-r.count, str(r.peer_id), r.kind, r.reason))
        return out
