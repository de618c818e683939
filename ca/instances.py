"""The instances of a trust domain whose state is shared in PostgreSQL.

Each instance is one `meshid ca serve` host with a state directory of its
own: its root keys live there and nowhere else, and it signs with its own
active root (`roots.instance`); the bundle holds every instance's roots. An
embedded (SQLite) authority is the one unnamed instance and has no row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ca.authority_base import AuthorityBase


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    name: str
    generation: int | None  # the root it signs with; None while its first root waits
    pending: int | None  # its root waiting to take over, if any
    last_heard: datetime | None  # its `ca serve` last said it was alive


class Instances(AuthorityBase):
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
