"""Who may talk to whom: the allow-list, revocations, and the feed each sidecar enforces.

Every change to the allow-list is also remembered (`ca.policyhistory`), so
that the feed can send a sidecar the changes since the version it holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ca.db import Conflict, Connection
from ca.feedindex import CACHED_BASES, FeedIndex, Versions
from ca.policyhistory import FLOOR, Change, changes_between, net_delta, remember
from ca.roots import Roots
from ca.services import build_map, read_entries
from ca.store import Store
from ca.values import check_not_reserved
from meshid.bundle import TrustBundle
from meshid.errors import InvalidInput, PolicyError
from meshid.policy import Decision, Policy, is_prefix, rule_ends
from meshid.spiffeid import SpiffeId


def _by(operator: SpiffeId | None) -> dict[str, str]:
    """The audit row's `operator` field, for a change made through the control plane."""
    return {} if operator is None else {"operator": str(operator)}


class Access(Roots):
    # -- revocation --

    def revoke(self, spiffe_id: SpiffeId, *, operator: SpiffeId | None = None) -> int:
        spiffe_id.require_workload()
        now = self._now().timestamp()
        with self.store.write() as conn:
            try:
                conn.execute(
                    "INSERT INTO revocations (spiffe_id, revoked_at) VALUES (?, ?)",
                    (str(spiffe_id), now),
                )
            except Conflict:
                raise PolicyError(f"{spiffe_id} is already revoked") from None
            conn.execute(
                "UPDATE tokens SET used_at = ? WHERE spiffe_id = ? AND used_at IS NULL",
                (now, str(spiffe_id)),
            )
            version = Store.bump(conn, "revocation_version")
            self.store.audit(
                conn,
                now,
                "revoke",
                spiffe_id=str(spiffe_id),
                revocation_version=version,
                **_by(operator),
            )
        return version

    def revoke_serial(self, serial: str) -> tuple[SpiffeId, int]:
        """Revoke one SVID by its serial (hex): (its ID, the new revocation version).

        The identity keeps its other SVIDs; a sidecar presenting this one is
        refused and its live connections are cut, and it cannot renew with it.
        """
        text = serial.lower().removeprefix("0x").lstrip("0") or "0"
        try:
            int(text, 16)
        except ValueError:
            raise InvalidInput(f"{serial!r} is not a hexadecimal serial") from None
        now = self._now().timestamp()
        with self.store.write() as conn:
            row = conn.execute("SELECT spiffe_id FROM svids WHERE serial = ?", (text,)).fetchone()
            if row is None:
                raise PolicyError(  # records of SVIDs expired over a day ago are pruned
                    f"no SVID with serial {text} is on record here (nor one that expired "
                    "in the last 24 h); an SVID expired longer ago needs no revoking"
                )
            try:
                conn.execute(
                    "INSERT INTO revoked_serials (serial, spiffe_id, revoked_at) VALUES (?, ?, ?)",
                    (text, row[0], now),
                )
            except Conflict:
                raise PolicyError(f"SVID {text} is already revoked") from None
            version = Store.bump(conn, "revocation_version")
            self.store.audit(
                conn,
                now,
                "revoke_serial",
                serial=text,
                spiffe_id=row[0],
                revocation_version=version,
            )
        return SpiffeId.parse(row[0]), version

    def unrevoke(self, spiffe_id: SpiffeId) -> int | None:
        """Lift an identity's revocation: the new revocation version, or None if it was not revoked.

        Join tokens that `revoke` spent stay spent: the workload re-enrolls
        with a new token (or renews, if its SVID is still valid).
        """
        now = self._now().timestamp()
        with self.store.write() as conn:
            cursor = conn.execute("DELETE FROM revocations WHERE spiffe_id = ?", (str(spiffe_id),))
            if cursor.rowcount == 0:
                return None
            version = Store.bump(conn, "revocation_version")
            self.store.audit(
                conn, now, "unrevoke", spiffe_id=str(spiffe_id), revocation_version=version
            )
        return version

    # -- allow-list --

    def policy(self) -> Policy:
        with self.store.read() as conn:
            pairs = conn.execute("SELECT source, target FROM policy").fetchall()
            revoked = conn.execute("SELECT spiffe_id FROM revocations").fetchall()
            serials = conn.execute("SELECT serial FROM revoked_serials").fetchall()
            version = Store.counter(conn, "policy_version")
            rversion = Store.counter(conn, "revocation_version")
        exact = [(s, t) for s, t in pairs if not (is_prefix(s) or is_prefix(t))]
        return Policy.build(
            ((SpiffeId.parse(s), SpiffeId.parse(t)) for s, t in exact),
            version,
            (SpiffeId.parse(r) for (r,) in revoked),
            rversion,
            (int(n, 16) for (n,) in serials),
            (tuple(pair) for pair in pairs if is_prefix(pair[0]) or is_prefix(pair[1])),
        )

    def rules_page(
        self, after: tuple[str, str] | None, limit: int
    ) -> tuple[list[tuple[str, str]], int, bool]:
        """Up to `limit` rules after `after`, in (FROM, TO) order: (rules, version, more?).

        Read straight off the primary key, so a page costs the same at the
        start of 100,000 rules as at the end, and nothing holds the whole list.
        """
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT source, target FROM policy WHERE (source, target) > (?, ?) "
                "ORDER BY source, target LIMIT ?",
                (*(after or ("", "")), limit + 1),
            ).fetchall()
            version = Store.counter(conn, "policy_version")
        return [(s, t) for s, t in rows[:limit]], version, len(rows) > limit

    def allow(
        self,
        source: SpiffeId | str,
        target: SpiffeId | str,
        *,
        operator: SpiffeId | None = None,
    ) -> int:
        """Add one rule; each end an ID or a prefix rule end (`meshid.policy.rule_end`)."""
        _check_end(str(source))
        _check_end(str(target))
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
            remember(conn, version, [(str(source), str(target))], [])
            self.store.audit(
                conn,
                now,
                "policy_allow",
                source=str(source),
                target=str(target),
                version=version,
                **_by(operator),
            )
        return version

    def deny(
        self,
        source: SpiffeId | str,
        target: SpiffeId | str,
        *,
        operator: SpiffeId | None = None,
    ) -> int:
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
            remember(conn, version, [], [(str(source), str(target))])
            self.store.audit(
                conn,
                now,
                "policy_deny",
                source=str(source),
                target=str(target),
                version=version,
                **_by(operator),
            )
        return version

    def apply_policy(
        self, desired: Iterable[tuple[str, str]]
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
        """Make the allow-list equal to `desired`: (added, removed, policy version).

        One transaction, one version bump and one audit row for the whole
        change; when nothing changes, no bump and no row (each new version
        wakes every sidecar), so applying the same file twice is a no-op.
        """
        wanted = set(desired)
        for src, dst in wanted:
            _check_end(src)
            _check_end(dst)
        now = self._now().timestamp()
        with self.store.write() as conn:
            rows = conn.execute("SELECT source, target FROM policy").fetchall()
            current = {(str(s), str(t)) for s, t in rows}
            added, removed = sorted(wanted - current), sorted(current - wanted)
            if not added and not removed:
                return [], [], Store.counter(conn, "policy_version")
            conn.executemany(
                "DELETE FROM policy WHERE source = ? AND target = ?",
                removed,
            )
            conn.executemany(
                "INSERT INTO policy (source, target, created_at) VALUES (?, ?, ?)",
                [(s, t, now) for s, t in added],
            )
            version = Store.bump(conn, "policy_version")
            remember(conn, version, added, removed)
            self.store.audit(
                conn,
                now,
                "policy_apply",
                added=[list(pair) for pair in added],
                removed=[list(pair) for pair in removed],
                version=version,
            )
        return added, removed, version

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
        """The decision for source -> target, as the whole policy would make it.

        Reads only the rules that can match (each end's ID and the prefixes
        above it, at most (depth + 1)² keys off the primary key) and the two
        IDs' revocations, so it costs the same with 100,000 rules as with 10.
        """
        sources, targets = rule_ends(source), rule_ends(target)
        with self.store.read() as conn:
            rules = conn.execute(
                # only placeholders are formatted in: the values travel as parameters
                f"SELECT source, target FROM policy WHERE source IN ({_marks(sources)}) "  # noqa: S608
                f"AND target IN ({_marks(targets)})",
                (*sources, *targets),
            ).fetchall()
            revoked = conn.execute(
                "SELECT spiffe_id FROM revocations WHERE spiffe_id IN (?, ?)",
                (str(source), str(target)),
            ).fetchall()
            version = Store.counter(conn, "policy_version")
            rversion = Store.counter(conn, "revocation_version")
        exact = [(s, t) for s, t in rules if not (is_prefix(s) or is_prefix(t))]
        return Policy.build(
            ((SpiffeId.parse(s), SpiffeId.parse(t)) for s, t in exact),
            version,
            (SpiffeId.parse(r) for (r,) in revoked),
            rversion,
            (),
            (tuple(rule) for rule in rules if is_prefix(rule[0]) or is_prefix(rule[1])),
        ).decide(source, target)

    def revocation(self, spiffe_id: SpiffeId, serial: int | None = None) -> int | None:
        """The revocation version in force if `spiffe_id` is revoked, or its SVID `serial`
        is (`ca revoke --serial`), else None (one lookup)."""
        # Serials are kept as `revoke_serial` writes them: lowercase hex, no leading zeros.
        serial_text = "" if serial is None else f"{serial:x}"
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT 1 FROM revocations WHERE spiffe_id = ? "
                "UNION ALL SELECT 1 FROM revoked_serials WHERE serial = ?",
                (str(spiffe_id), serial_text),
            ).fetchone()
            return None if row is None else Store.counter(conn, "revocation_version")

    # -- the feed --

    def versions(self) -> tuple[int, int, int]:
        """(policy version, revocation version, bundle sequence): what a watcher compares."""
        with self.store.read() as conn:
            return (
                Store.counter(conn, "policy_version"),
                Store.counter(conn, "revocation_version"),
                Store.counter(conn, "bundle_sequence"),
            )

    def feed(self, spiffe_id: SpiffeId, *, since: int | None = None) -> dict[str, object]:
        """What one sidecar needs to enforce: its own pairs, the revocations, the bundle.

        With `since` (the policy version the sidecar holds, when it asks for
        deltas) and a history that covers it, the rules come as a ``delta``
        from that version, and ``pairs`` and ``prefix_rules`` are empty.
        Everything else, and whole lists, come from the index of the current
        versions (`ca.feedindex`), read once when one of them moved: a change
        wakes every sidecar at once, and each asking the database for its
        own rows made that work grow with the square of the mesh.
        """
        index, own = self.feed_parts(spiffe_id, since=since)
        return {**index.shared, **own}

    def feed_parts(
        self, spiffe_id: SpiffeId, *, since: int | None = None, versions: Versions | None = None
    ) -> tuple[FeedIndex, dict[str, object]]:
        """`feed` as the index it shares with every sidecar and the fields of its own.

        `versions`: the current ones, when the caller read them in this very
        transaction (a batch of feeds reads them once); an index of those
        versions is then taken without asking the database again.
        """
        with self.store.read() as conn:
            index = self._feed_index
            if versions is None or index is None or index.versions != versions:
                bundle = self.bundle()  # inside the snapshot: fresh, and consistent with the rest
                versions = (
                    Store.counter(conn, "policy_version"),
                    Store.counter(conn, "revocation_version"),
                    bundle.sequence,
                )
                if index is None or index.versions != versions:
                    index = self._feed_index = self._read_feed_index(conn, versions, bundle)
            delta = None
            if since is not None and since <= versions[0]:
                changes = _changes_since(conn, index, since)
                if changes is not None:
                    delta = net_delta(changes, set(rule_ends(spiffe_id)))
        if delta is None:
            return index, index.own(spiffe_id)
        return index, {
            "pairs": [],
            "prefix_rules": [],
            "delta": {"base_version": since, **delta},
        }

    def _read_feed_index(
        self, conn: Connection, versions: Versions, bundle: TrustBundle
    ) -> FeedIndex:
        rules = conn.execute("SELECT source, target FROM policy").fetchall()
        revoked = conn.execute("SELECT spiffe_id FROM revocations ORDER BY 1").fetchall()
        serials = conn.execute("SELECT serial FROM revoked_serials ORDER BY 1").fetchall()
        federated = conn.execute(
            "SELECT trust_domain, bundle FROM federated_domains ORDER BY 1"
        ).fetchall()
        addresses, _conflicts = build_map(read_entries(conn))
        shared: dict[str, object] = {
            "policy_version": versions[0],
            "revocation_version": versions[1],
            "bundle_sequence": versions[2],
            "revoked": [r for (r,) in revoked],
            "revoked_serials": [n for (n,) in serials],
            "bundle": self._feed_bundle_pem(bundle),
            # each with its spiffe_sequence: a change bumps policy_version (ca.federation)
            "federated_bundles": {td: json.loads(doc) for td, doc in federated},
            "addresses": [[h, p, str(sid)] for (h, p), sid in sorted(addresses.items())],
        }
        return FeedIndex.build(versions, rules, shared)

    def _feed_bundle_pem(self, bundle: TrustBundle) -> str:
        """The bundle's PEM, made again only when its sequence moved (a policy change
        reads a new index, with the same bundle)."""
        index = self._feed_index
        if index is not None and index.versions[2] == bundle.sequence:
            pem = index.shared["bundle"]
            assert isinstance(pem, str)
            return pem
        return bundle.to_pem().decode()


def _changes_since(conn: Connection, index: FeedIndex, since: int) -> list[Change] | None:
    """The rule changes after `since` up to `index`'s policy version, None where the
    history does not reach back to it; read once for every sidecar that holds `since`."""
    if since in index.changes:
        return index.changes[since]
    covered = Store.counter(conn, FLOOR) <= since  # the floor moves with the version only
    changes = changes_between(conn, since, index.versions[0]) if covered else None
    if len(index.changes) < CACHED_BASES:
        index.changes[since] = changes
    return changes


def _marks(values: list[str]) -> str:
    """One placeholder per value, for `IN (…)`: both engines take it (the ends are few)."""
    return ", ".join("?" * len(values))


def _check_end(end: str) -> None:
    """A rule end (an ID, or an ID followed by /*) may not name the authority's own IDs."""
    base = end.removesuffix("/*") if is_prefix(end) else end
    check_not_reserved(SpiffeId.parse(base).require_workload())
