"""The address map: which identity serves which IP:PORT, for transparent interception.

A captured outbound connection knows only the address the app dialled; the
sidecar requires of the server the identity this map names for it. Entries
come from the operator (`meshid service add`) and from the addresses inbound
sidecars advertise. An address claimed by two identities is a conflict: it is
left out of the map (connections to it are refused as `unknown_destination`)
and shown by `ca status`, never settled by whichever claim came last. A
change bumps the policy version, so the feed carries it to every sidecar at
once, versioned like the allow-list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from ca.db import Connection
from ca.roots import Roots
from ca.store import Store
from meshid.errors import InvalidInput, PolicyError
from meshid.netaddr import parse_ip_port
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId

OPERATOR = "operator"
ADVERTISED = "advertised"
MAX_ADVERTISED = 64  # per identity, as the sidecar's config allows


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    host: str
    port: int
    spiffe_id: SpiffeId
    origin: str

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def build_map(
    entries: Iterable[ServiceEntry],
) -> tuple[dict[tuple[str, int], SpiffeId], dict[tuple[str, int], tuple[SpiffeId, ...]]]:
    """(the map, the conflicts): an address with more than one identity is only a conflict."""
    claims: dict[tuple[str, int], set[SpiffeId]] = {}
    for e in entries:
        claims.setdefault((e.host, e.port), set()).add(e.spiffe_id)
    mapped = {k: next(iter(v)) for k, v in claims.items() if len(v) == 1}
    conflicts = {k: tuple(sorted(v, key=str)) for k, v in claims.items() if len(v) > 1}
    return mapped, conflicts


def read_entries(conn: Connection) -> list[ServiceEntry]:
    rows = conn.execute(
        "SELECT host, port, spiffe_id, origin FROM services ORDER BY host, port, spiffe_id"
    ).fetchall()
    return [ServiceEntry(h, p, SpiffeId.parse(s), o) for h, p, s, o in rows]


class Services(Roots):
    def services(self) -> list[ServiceEntry]:
        with self.store.read() as conn:
            return read_entries(conn)

    def add_service(self, spiffe_id: SpiffeId, host: str, port: int) -> int:
        """Map IP:PORT to `spiffe_id`; returns the policy version that carries it."""
        spiffe_id.require_workload()
        now = self._now().timestamp()
        with self.store.write() as conn:
            exists = conn.execute(
                "SELECT 1 FROM services WHERE host = ? AND port = ? AND spiffe_id = ? "
                "AND origin = ?",
                (host, port, str(spiffe_id), OPERATOR),
            ).fetchone()
            if exists:
                raise PolicyError(
                    f"{spiffe_id} is already mapped at {host}:{port}", reason=Reason.ALREADY_MAPPED
                )
            conn.execute(
                "INSERT INTO services (host, port, spiffe_id, origin, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (host, port, str(spiffe_id), OPERATOR, now),
            )
            version = Store.bump(conn, "policy_version")
            self.store.audit(
                conn, now, "service_add", spiffe_id=str(spiffe_id), host=host, port=port
            )
        return version

    def remove_service(self, spiffe_id: SpiffeId, host: str, port: int) -> int:
        now = self._now().timestamp()
        with self.store.write() as conn:
            cursor = conn.execute(
                "DELETE FROM services WHERE host = ? AND port = ? AND spiffe_id = ? AND origin = ?",
                (host, port, str(spiffe_id), OPERATOR),
            )
            if cursor.rowcount == 0:
                raise PolicyError(
                    f"{spiffe_id} is not mapped at {host}:{port}", reason=Reason.UNKNOWN_SERVICE
                )
            version = Store.bump(conn, "policy_version")
            self.store.audit(
                conn, now, "service_remove", spiffe_id=str(spiffe_id), host=host, port=port
            )
        return version

    def record_advertised(self, spiffe_id: SpiffeId) -> bool:
        """Take what `spiffe_id`'s live sidecars advertise (the union of their latest
        reports) into the map; an address that is not IP:PORT is ignored."""
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT report FROM reports WHERE spiffe_id = ?", (str(spiffe_id),)
            ).fetchall()
            held = {
                (h, p)
                for h, p in conn.execute(
                    "SELECT host, port FROM services WHERE spiffe_id = ? AND origin = ?",
                    (str(spiffe_id), ADVERTISED),
                ).fetchall()
            }
        wanted: set[tuple[str, int]] = set()
        for (text,) in rows:
            try:
                doc = json.loads(text)
            except ValueError:
                continue
            advertised = doc.get("advertise") if isinstance(doc, dict) else None
            for item in advertised if isinstance(advertised, list) else []:
                try:
                    wanted.add(parse_ip_port(str(item)))
                except InvalidInput:
                    continue
        wanted = set(sorted(wanted)[:MAX_ADVERTISED])
        if wanted == held:
            return False  # the common case, every few seconds: no write lock taken
        return self.set_advertised(spiffe_id, sorted(wanted))

    def set_advertised(self, spiffe_id: SpiffeId, addresses: Iterable[tuple[str, int]]) -> bool:
        """Replace what `spiffe_id`'s sidecars advertise; True if the map changed."""
        wanted = set(sorted(addresses)[:MAX_ADVERTISED])
        now = self._now().timestamp()
        with self.store.write() as conn:
            held = {
                (h, p)
                for h, p in conn.execute(
                    "SELECT host, port FROM services WHERE spiffe_id = ? AND origin = ?",
                    (str(spiffe_id), ADVERTISED),
                ).fetchall()
            }
            if held == wanted:
                return False
            conn.execute(
                "DELETE FROM services WHERE spiffe_id = ? AND origin = ?",
                (str(spiffe_id), ADVERTISED),
            )
            conn.executemany(
                "INSERT INTO services (host, port, spiffe_id, origin, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(h, p, str(spiffe_id), ADVERTISED, now) for h, p in sorted(wanted)],
            )
            version = Store.bump(conn, "policy_version")
            self.store.audit(  # a claim on an address is a change to what is enforced
                conn,
                now,
                "service_advertised",
                spiffe_id=str(spiffe_id),
                addresses=[f"{h}:{p}" for h, p in sorted(wanted)],
                version=version,
            )
        return True
