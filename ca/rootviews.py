"""The roots' rollover seen from outside: pending roots, laggards, the active root's life.

Read-only views over the `roots` and `reports` tables, shared by `ca status`,
the root keeper (`ca.rootkeeper`) and the rollover gate in `ca.roots`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ca.authority_base import AuthorityBase
from ca.db import Connection
from ca.rootlife import ActiveRoot, PendingRoot
from ca.values import REPORT_FRESH, printable
from meshid.errors import MeshIdError, StateError
from meshid.reasons import Reason
from meshid.report import parse_report


class RootViews(AuthorityBase):
    def _no_active_root(self) -> StateError:
        """Why there is nothing to sign with: a joining instance's root still waits, or damage."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation, activate_at FROM roots WHERE state = 'next' AND instance = ?",
                (self.instance,),
            ).fetchone()
        if row is None:
            return StateError("the authority has no active root; its database is damaged")
        at = datetime.fromtimestamp(float(row[1] or 0), UTC)
        return StateError(
            f"this instance's root {row[0]} is not in every sidecar's bundle yet; it signs "
            f"from {at:%Y-%m-%dT%H:%M:%SZ} once live sidecars hold it ('meshid ca status')",
            reason=Reason.ROOT_PENDING,
        )

    # -- what sidecars report --

    @staticmethod
    def _lagging(conn: Connection, sequence: int, now: float) -> list[str]:
        """Live sidecars whose last report holds a bundle older than `sequence`.

        A stored report that no longer parses counts as lagging: a rollover
        waits rather than assume what it cannot read.
        """
        rows = conn.execute(
            "SELECT instance, spiffe_id, report FROM reports WHERE seen_at >= ? "
            "ORDER BY spiffe_id, instance",
            (now - REPORT_FRESH.total_seconds(),),
        ).fetchall()
        lagging = []
        for instance, sid, text in rows:
            try:
                held = parse_report(json.loads(text)).bundle_sequence
            except (MeshIdError, ValueError, TypeError, RecursionError):
                held = -1
            if held < sequence:
                lagging.append(f"{printable(str(sid))} ({printable(str(instance))})")
        return lagging

    def rotation_status(self) -> tuple[int, list[str]] | None:
        """(generation, sidecars not yet holding it) for a root waiting to activate."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation, published_sequence FROM roots "
                "WHERE state = 'next' AND instance = ?",
                (self.instance,),
            ).fetchone()
            if row is None:
                return None
            return int(row[0]), self._lagging(conn, int(row[1] or 0), self._now().timestamp())

    # -- the root's own lifetime (the schedule is ca/rootlife.py) --

    def root_lifecycle(self) -> tuple[ActiveRoot, PendingRoot | None]:
        """The active root's life, and the root waiting to take over, if any."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation, created_at, not_after FROM roots "
                "WHERE state = 'active' AND instance = ?",
                (self.instance,),
            ).fetchone()
            pending = self.pending_root()
        if row is None:
            raise self._no_active_root()
        active = ActiveRoot(
            int(row[0]), datetime.fromtimestamp(row[1], UTC), datetime.fromtimestamp(row[2], UTC)
        )
        return active, pending

    def pending_root(self) -> PendingRoot | None:
        """This instance's root waiting to take over, if any."""
        with self.store.read() as conn:
            nxt = conn.execute(
                "SELECT generation, activate_at, created_at, wait_for_acks FROM roots "
                "WHERE state = 'next' AND instance = ?",
                (self.instance,),
            ).fetchone()
        if nxt is None:
            return None
        at = nxt[1] if nxt[1] is not None else nxt[2]
        return PendingRoot(int(nxt[0]), datetime.fromtimestamp(at, UTC), bool(nxt[3]))
