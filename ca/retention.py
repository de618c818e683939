"""The serving authority prunes records of SVIDs that expired long ago, a batch at a time.

`SvidPruner.tick` runs in the server's periodic loop (in the database
thread), once a second. It deletes one batch (`Authority.prune_svids`: at
most PRUNE_BATCH records in one transaction, so the write lock is never held
long) every PRUNE_EVERY seconds; while batches come back full there is a
backlog (say, a database that was never pruned), and the next batch follows
a second later. Every worker and every instance prunes; the deletes are
conditional, so running them twice changes nothing.

A failure is logged with its reason and tried again at the next batch; it
never ends the server or holds up the rest of the loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ca.authority import Authority
from ca.db import is_driver_error
from ca.issuance import PRUNE_BATCH, SVID_RETENTION
from meshid.errors import MeshIdError
from meshid.reasons import Reason

PRUNE_EVERY = 60.0  # seconds between two batches, when the last one was not full
BACKLOG_EVERY = 1.0  # seconds between two batches while they come back full


@dataclass
class SvidPruner:
    authority: Authority
    log: Callable[..., None]
    monotonic: Callable[[], float]
    batch: int = PRUNE_BATCH
    _next: float = field(default=-math.inf, init=False)

    def tick(self) -> int:
        """Prune one batch if one is due; how many records went. Never raises an Exception."""
        now = self.monotonic()
        if now < self._next:
            return 0
        self._next = now + PRUNE_EVERY
        try:
            count = self.authority.prune_svids(self.batch)
        except Exception as exc:  # the failure boundary: the server keeps serving
            if isinstance(exc, MeshIdError):
                reason: str = exc.reason
            else:
                reason = (
                    Reason.STORAGE_UNAVAILABLE if is_driver_error(exc) else Reason.INTERNAL_ERROR
                )
            self.log("svids_prune_failed", reason=reason, error=type(exc).__name__)
            return 0
        if count >= self.batch:
            self._next = now + BACKLOG_EVERY
        if count:
            retention = SVID_RETENTION.total_seconds()
            self.log("svids_pruned", count=count, retention_seconds=retention)
        return count
