"""What sidecars report: each one's latest status, and the workloads ever issued."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ca.authority_base import AuthorityBase
from ca.values import MAX_INSTANCES, REPORT_FORGET, RESERVED_PATH, SidecarReport, printable
from meshid.errors import (
    InvalidInput,
    MeshIdError,
)
from meshid.report import StatusReport, parse_report
from meshid.spiffeid import SpiffeId


class Reports(AuthorityBase):
    def record_report(self, spiffe_id: SpiffeId, report: StatusReport) -> None:
        """Keep a sidecar's latest report (not audited: it arrives every few seconds).

        Reports are keyed by the caller's authenticated identity and the
        instance it names, so no workload can replace another's. Each identity
        keeps at most MAX_INSTANCES: a new instance past that replaces the one
        heard from least recently (a restarting pod is never locked out; only
        its own stale entries go). Reports older than REPORT_FORGET are deleted.
        """
        now = self._now().timestamp()
        sid = str(spiffe_id)
        with self.store.write() as conn:
            conn.execute(
                "INSERT INTO reports (spiffe_id, instance, seen_at, report) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (spiffe_id, instance) DO UPDATE SET "
                "seen_at = excluded.seen_at, report = excluded.report",
                (sid, report.instance, now, report.encode()),
            )
            conn.execute(
                "DELETE FROM reports WHERE spiffe_id = ? AND instance NOT IN ("
                "SELECT instance FROM reports WHERE spiffe_id = ? "
                "ORDER BY instance = ? DESC, seen_at DESC, instance LIMIT ?)",
                (sid, sid, report.instance, MAX_INSTANCES),
            )
            conn.execute(
                "DELETE FROM reports WHERE seen_at < ?", (now - REPORT_FORGET.total_seconds(),)
            )

    def reports(self) -> tuple[list[SidecarReport], list[str]]:
        """Every sidecar heard from lately, and a note for each stored row that does not parse.

        A damaged row is skipped, never trusted and never fatal: what is
        shown from it is escaped (see `printable`).
        """
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT instance, spiffe_id, seen_at, report FROM reports "
                "ORDER BY spiffe_id, instance"
            ).fetchall()
        good: list[SidecarReport] = []
        skipped: list[str] = []
        for instance, sid, seen, text in rows:
            try:
                report = parse_report(json.loads(text))
                if report.instance != instance:
                    raise InvalidInput("instance does not match its row", reason="invalid_report")
                good.append(
                    SidecarReport(
                        report.instance,
                        SpiffeId.parse(sid),
                        datetime.fromtimestamp(float(seen), UTC),
                        report,
                    )
                )
            except (MeshIdError, ValueError, TypeError, OverflowError, RecursionError) as exc:
                detail = exc.message if isinstance(exc, MeshIdError) else type(exc).__name__
                skipped.append(
                    f"report of {printable(str(sid))} [{printable(str(instance))}] is "
                    f"malformed and was skipped: {printable(detail)}"
                )
        return good, skipped

    def issued_svids(
        self, spiffe_id: SpiffeId | None = None, valid_at: float | None = None
    ) -> list[tuple[SpiffeId, str, float, float, str]]:
        """(ID, serial, not_after, issued_at, how) of issued SVIDs, latest expiry first.

        Only those of `spiffe_id` if given, only those still valid at
        `valid_at` if given; the authority's own identities are left out.
        """
        sql = (
            "SELECT spiffe_id, serial, not_after, issued_at, how FROM svids "
            "WHERE spiffe_id NOT LIKE ?"
        )
        args: list[object] = [f"spiffe://{self.trust_domain.name}{RESERVED_PATH}/%"]
        if spiffe_id is not None:
            sql += " AND spiffe_id = ?"
            args.append(str(spiffe_id))
        if valid_at is not None:
            sql += " AND not_after > ?"
            args.append(valid_at)
        with self.store.read() as conn:
            rows = conn.execute(sql + " ORDER BY not_after DESC, serial", args).fetchall()
        return [(SpiffeId.parse(s), str(n), float(a), float(i), str(h)) for s, n, a, i, h in rows]

    def workloads(self) -> list[tuple[SpiffeId, datetime, int, bool]]:
        """(ID, latest SVID expiry, SVIDs issued, revoked) for every identity ever issued."""
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT s.spiffe_id, MAX(s.not_after), COUNT(*), "
                "EXISTS (SELECT 1 FROM revocations r WHERE r.spiffe_id = s.spiffe_id) "
                "FROM svids s WHERE s.spiffe_id NOT LIKE ? GROUP BY s.spiffe_id ORDER BY 1",
                (f"spiffe://{self.trust_domain.name}{RESERVED_PATH}/%",),
            ).fetchall()
        return [
            (SpiffeId.parse(s), datetime.fromtimestamp(t, UTC), int(n), bool(r))
            for s, t, n, r in rows
        ]
