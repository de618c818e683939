"""The instances of a trust domain whose state is shared in PostgreSQL.

Each instance is one `meshid ca serve` host with a state directory of its
own: its root keys live there and nowhere else, and it signs with its own
active root (`roots.instance`); the bundle holds every instance's roots. An
embedded (SQLite) authority is the one unnamed instance and has no row here.

JWT-SVID keys follow the same rule: each instance signs with keys of its own
(`ca.jwtkeys`, in its state directory) and publishes their public halves in
`jwt_keys` before it signs with them, so that a token minted by one instance
validates against the bundle any instance serves. A removed instance's keys
stay there until the last token they may have signed has expired.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ca.roots import Roots
from ca.store import Store
from meshid.errors import PolicyError
from meshid.jwtsvid import MAX_TTL as JWT_MAX_TTL


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    name: str
    generation: int | None  # the root it signs with; None while its first root waits
    pending: int | None  # its root waiting to take over, if any
    last_heard: datetime | None  # its `ca serve` last said it was alive


class Instances(Roots):
    _jwt_published: frozenset[str] = frozenset()  # the kids last seen in the database

    def heard(self) -> None:
        """This instance is alive: `ca serve` says so every few seconds."""
        if not self.instance:
            return
        now = self._now().timestamp()
        with self.store.write() as conn:
            conn.execute("UPDATE instances SET last_heard = ? WHERE name = ?", (now, self.instance))

    def instances(self) -> list[InstanceInfo]:
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT i.name, i.last_heard, "
                "(SELECT MAX(generation) FROM roots r "
                " WHERE r.instance = i.name AND r.state = 'active'), "
                "(SELECT MAX(generation) FROM roots r "
                " WHERE r.instance = i.name AND r.state = 'next') "
                "FROM instances i ORDER BY i.name"
            ).fetchall()
        return [
            InstanceInfo(
                str(name),
                None if active is None else int(active),
                None if pending is None else int(pending),
                None if heard is None else datetime.fromtimestamp(float(heard), UTC),
            )
            for name, heard, active, pending in rows
        ]

    def remove_instance(self, name: str, *, at_once: bool = False) -> list[int]:
        """Take a lost instance out of the trust domain: the generations of its roots.

        Its roots stop signing at once (a surviving process of it would find
        none active). By default they stay in the bundle until the last SVID
        they signed has expired, so no workload loses its peers; `at_once`
        drops them from the bundle now, for a host whose key may be in other
        hands: what they signed then verifies nowhere.
        """
        if name == self.instance:
            raise PolicyError("an instance cannot remove itself: run this on another one")
        at = self._now().timestamp()
        with self.store.write() as conn:
            known = conn.execute("SELECT 1 FROM instances WHERE name = ?", (name,)).fetchone()
            if known is None:
                raise PolicyError(f"no instance {name!r} in this trust domain")
            generations = [
                int(g)
                for (g,) in conn.execute(
                    "SELECT generation FROM roots WHERE instance = ? "
                    "AND state IN ('next', 'active', 'retiring') ORDER BY generation",
                    (name,),
                ).fetchall()
            ]
            conn.execute(  # a root that never signed has nothing to wait for
                "UPDATE roots SET state = 'retired' WHERE instance = ? AND state = 'next'", (name,)
            )
            conn.execute(
                "UPDATE roots SET state = ? WHERE instance = ? AND state IN ('active', 'retiring')",
                ("retired" if at_once else "retiring", name),
            )
            conn.execute("DELETE FROM instances WHERE name = ?", (name,))
            conn.execute(  # the tokens its JWT keys signed expire within JWT_MAX_TTL
                "UPDATE jwt_keys SET leave_at = ? WHERE instance = ?",
                (at if at_once else at + JWT_MAX_TTL.total_seconds(), name),
            )
            sequence = Store.bump(conn, "bundle_sequence")
            self.store.audit(
                conn,
                at,
                "instance_removed",
                instance=name,
                roots=generations,
                at_once=at_once,
                bundle_sequence=sequence,
            )
        self._bundle_checked = -math.inf
        self.write_bundle_file()
        return generations

    def publish_jwt_keys(self, entries: Sequence[dict[str, Any]]) -> None:
        """This instance's public JWT keys (bundle entries), in the database for every
        instance to serve; called before a key signs. A key it no longer holds leaves.

        Writes only when the set of keys changed since it last looked.
        """
        if not self.instance:
            return
        kids = frozenset(str(e["kid"]) for e in entries)
        if kids == self._jwt_published:
            return
        at = self._now().timestamp()
        with self.store.write() as conn:
            held = {
                str(kid)
                for (kid,) in conn.execute(
                    "SELECT kid FROM jwt_keys WHERE instance = ?", (self.instance,)
                ).fetchall()
            }
            for entry in entries:
                if entry["kid"] not in held:
                    conn.execute(
                        "INSERT INTO jwt_keys (kid, instance, jwk, created_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (kid) DO NOTHING",
                        (entry["kid"], self.instance, json.dumps(entry, sort_keys=True), at),
                    )
            for kid in held - kids:
                conn.execute("DELETE FROM jwt_keys WHERE kid = ?", (kid,))
            conn.execute("DELETE FROM jwt_keys WHERE leave_at IS NOT NULL AND leave_at <= ?", (at,))
        self._jwt_published = kids

    def shared_jwt_keys(self) -> list[dict[str, Any]]:
        """The public JWT keys the other instances published, while tokens they signed may
        still be valid: bundle entries, oldest first. A removed instance that still runs
        adds no key that is served."""
        if not self.instance:
            return []
        at = self._now().timestamp()
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT jwk FROM jwt_keys WHERE instance <> ? AND (leave_at > ? OR "
                "(leave_at IS NULL AND instance IN (SELECT name FROM instances))) "
                "ORDER BY created_at, kid",
                (self.instance, at),
            ).fetchall()
        entries = [json.loads(str(jwk)) for (jwk,) in rows]
        return [e for e in entries if isinstance(e, dict)]
