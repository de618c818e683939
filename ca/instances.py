"""The instances of a trust domain whose state is shared in PostgreSQL.

Each instance is one `meshid ca serve` host with a state directory of its
own: its root keys live there and nowhere else, and it signs with its own
active root (`roots.instance`); the bundle holds every instance's roots. An
embedded (SQLite) authority is the one unnamed instance and has no row here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from ca.roots import Roots
from ca.store import Store
from meshid.errors import PolicyError


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    name: str
    generation: int | None  # the root it signs with; None while its first root waits
    pending: int | None  # its root waiting to take over, if any
    last_heard: datetime | None  # its `ca serve` last said it was alive


class Instances(Roots):
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
