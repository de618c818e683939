"""Who may talk to whom: the allow-list, revocations, and the feed each sidecar enforces."""

from __future__ import annotations

import sqlite3

from ca.roots import Roots
from ca.services import build_map, read_entries
from ca.store import Store
from ca.values import check_not_reserved
from meshid.errors import (
    PolicyError,
)
from meshid.policy import Decision, Policy
from meshid.spiffeid import SpiffeId


class Access(Roots):
    # -- revocation --

    def revoke(self, spiffe_id: SpiffeId) -> int:
        spiffe_id.require_workload()
        now = self._now().timestamp()
        with self.store.write() as conn:
            try:
                conn.execute(
                    "INSERT INTO revocations (spiffe_id, revoked_at) VALUES (?, ?)",
                    (str(spiffe_id), now),
                )
            except sqlite3.IntegrityError:
                raise PolicyError(f"{spiffe_id} is already revoked") from None
            conn.execute(
                "UPDATE tokens SET used_at = ? WHERE spiffe_id = ? AND used_at IS NULL",
                (now, str(spiffe_id)),
            )
            version = Store.bump(conn, "revocation_version")
            self.store.audit(
                conn, now, "revoke", spiffe_id=str(spiffe_id), revocation_version=version
            )
        return version

    # -- allow-list --

    def policy(self) -> Policy:
        with self.store.read() as conn:
            pairs = conn.execute("SELECT source, target FROM policy").fetchall()
            revoked = conn.execute("SELECT spiffe_id FROM revocations").fetchall()
            version = Store.counter(conn, "policy_version")
            rversion = Store.counter(conn, "revocation_version")
        return Policy.build(
            ((SpiffeId.parse(s), SpiffeId.parse(t)) for s, t in pairs),
            version,
            (SpiffeId.parse(r) for (r,) in revoked),
            rversion,
        )

    def allow(self, source: SpiffeId, target: SpiffeId) -> int:
        check_not_reserved(source.require_workload())
        check_not_reserved(target.require_workload())
        now = self._now().timestamp()
        with self.store.write() as conn:
            exists = conn.execute(
                "SELECT 1 FROM policy WHERE source = ? AND target = ?", (str(source), str(target))
            ).fetchone()
            if exists:
                raise PolicyError(
                    f"{source} -> {target} is already allowed", reason="already_allowed"
                )
            conn.execute(
                "INSERT INTO policy (source, target, created_at) VALUES (?, ?, ?)",
                (str(source), str(target), now),
            )
            version = Store.bump(conn, "policy_version")
            self.store.audit(
                conn, now, "policy_allow", source=str(source), target=str(target), version=version
            )
        return version

    def deny(self, source: SpiffeId, target: SpiffeId) -> int:
        now = self._now().timestamp()
        with self.store.write() as conn:
            cursor = conn.execute(
                "DELETE FROM policy WHERE source = ? AND target = ?", (str(source), str(target))
            )
            if cursor.rowcount == 0:
                raise PolicyError(
                    f"{source} -> {target} is not on the allow-list", reason="unknown_pair"
                )
            version = Store.bump(conn, "policy_version")
            self.store.audit(
                conn, now, "policy_deny", source=str(source), target=str(target), version=version
            )
        return version

    def ever_known(self, spiffe_id: SpiffeId) -> bool:
        """Whether `spiffe_id` was ever issued an SVID or a join token here.

        Policy may name workloads that do not exist yet, so an unknown name is
        no error; but a name the authority has never heard of is most often
        a typo, worth a warning.
        """
        sid = str(spiffe_id)
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM svids WHERE spiffe_id = ?) "
                "OR EXISTS (SELECT 1 FROM tokens WHERE spiffe_id = ?)",
                (sid, sid),
            ).fetchone()
        return bool(row[0])

    def check(self, source: SpiffeId, target: SpiffeId) -> Decision:
        return self.policy().decide(source, target)

    # -- the feed --

    def versions(self) -> tuple[int, int, int]:
        """(policy version, revocation version, bundle sequence): what a watcher compares."""
        with self.store.read() as conn:
            return (
                Store.counter(conn, "policy_version"),
                Store.counter(conn, "revocation_version"),
                Store.counter(conn, "bundle_sequence"),
            )

    def feed(self, spiffe_id: SpiffeId) -> dict[str, object]:
        """What one sidecar needs to enforce: its own pairs, the revocations, the bundle."""
        me = str(spiffe_id)
        with self.store.read() as conn:
            pairs = conn.execute(
                "SELECT source, target FROM policy WHERE source = ? OR target = ? "
                "ORDER BY source, target",
                (me, me),
            ).fetchall()
            revoked = conn.execute("SELECT spiffe_id FROM revocations ORDER BY 1").fetchall()
            policy_version = Store.counter(conn, "policy_version")
            revocation_version = Store.counter(conn, "revocation_version")
            bundle = self.bundle()  # inside the snapshot: fresh, and consistent with the rest
            addresses, _conflicts = build_map(read_entries(conn))
        return {
            "policy_version": policy_version,
            "revocation_version": revocation_version,
            "bundle_sequence": bundle.sequence,
            "pairs": [[src, dst] for src, dst in pairs],
            "revoked": [r for (r,) in revoked],
            "bundle": bundle.to_pem().decode(),
            "addresses": [[h, p, str(sid)] for (h, p), sid in sorted(addresses.items())],
        }
