"""Federated trust domains on the authority: the stored list and each one's last good bundle.

Theory of operation: a row of `federated_domains` per foreign trust domain,
added with its bootstrap bundle (`meshid federation add`), which must
authenticate its bundle endpoint at once: an add that cannot fetch changes
nothing. From then on a refresh fetches the bundle with the one held
(ca.federation_fetch) and keeps it only if its sequence does not go
backwards (meshid.federation.take_fetched). A failed fetch keeps the last
good bundle, counts the failure and backs off: the next try comes after the
refresh hint doubled per failure, at most MAX_BACKOFF. A bundle not
refreshed for two of its hints is stale and `ca status` says so.

The own trust domain is never a federated one: its bundle is ours. Any
change of the federated bundles (add, remove, a new sequence) is a new
policy version: it changes whom sidecars trust, and wakes their feeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ca.db import Connection
from ca.reports import Reports
from ca.store import Store
from meshid.bundle import TrustBundle
from meshid.errors import InvalidInput, MeshIdError, StateError
from meshid.federation import resolve_id, take_fetched
from meshid.spiffeid import SpiffeId, TrustDomain

MAX_BACKOFF = 3600.0  # seconds between two attempts after repeated failures


@dataclass(frozen=True, slots=True)
class FederatedDomain:
    trust_domain: TrustDomain
    url: str
    endpoint_id: SpiffeId
    bundle: TrustBundle
    fetched_at: datetime | None
    next_refresh: datetime
    failures: int
    last_error: str | None

    def stale(self, now: datetime) -> bool:
        """Not refreshed for two refresh hints (or never fetched past the bootstrap)."""
        since = self.fetched_at
        if since is None:
            return True
        return (now - since).total_seconds() > 2 * self.bundle.refresh_hint

    def to_json(self, now: datetime) -> dict[str, object]:
        return {
            "trust_domain": self.trust_domain.name,
            "url": self.url,
            "endpoint_id": str(self.endpoint_id),
            "sequence": self.bundle.sequence,
            "roots": len(self.bundle.roots),
            "refresh_hint": self.bundle.refresh_hint,
            "fetched_at": self.fetched_at.isoformat() if self.fetched_at else None,
            "next_refresh": self.next_refresh.isoformat(),
            "failures": self.failures,
            "last_error": self.last_error,
            "stale": self.stale(now),
        }


def backoff(hint: int, failures: int) -> float:
    """Seconds to the next attempt: the hint after a good fetch, doubling per failure."""
    return float(min(MAX_BACKOFF, max(1, hint) * (2 ** min(failures, 20))))


class Federations(Reports):
    def check_federable(self, trust_domain: TrustDomain, endpoint_id: SpiffeId) -> None:
        if trust_domain == self.trust_domain:
            raise InvalidInput(f"{trust_domain} is this authority's own trust domain")
        if endpoint_id.trust_domain != trust_domain:
            raise InvalidInput(f"--endpoint-id {endpoint_id}: not in trust domain {trust_domain}")

    def add_federation(
        self, url: str, endpoint_id: SpiffeId, bootstrap: TrustBundle, fetched: TrustBundle
    ) -> FederatedDomain:
        """Record a trust domain whose endpoint just answered (`fetched`) under `bootstrap`."""
        td = bootstrap.trust_domain
        self.check_federable(td, endpoint_id)
        bundle = take_fetched(bootstrap, fetched)
        now = self._now()
        at = now.timestamp()
        with self.store.write() as conn:
            if conn.execute(
                "SELECT 1 FROM federated_domains WHERE trust_domain = ?", (td.name,)
            ).fetchone():
                raise StateError(f"{td} is federated already; remove it first")
            conn.execute(
                "INSERT INTO federated_domains (trust_domain, url, endpoint_id, bundle, sequence, "
                "fetched_at, next_refresh, failures, last_error, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 0, NULL, ?)",
                (
                    td.name,
                    url,
                    str(endpoint_id),
                    bundle.to_spiffe_json(),
                    bundle.sequence,
                    at,
                    at + backoff(bundle.refresh_hint, 0),
                    at,
                ),
            )
            Store.bump(conn, "policy_version")  # wakes every sidecar's feed
            self.store.audit(
                conn, at, "federation_add", trust_domain=td.name, url=url, sequence=bundle.sequence
            )
        return self.federation(td)

    def remove_federation(self, trust_domain: TrustDomain) -> None:
        at = self._now().timestamp()
        with self.store.write() as conn:
            gone = conn.execute(
                "DELETE FROM federated_domains WHERE trust_domain = ?", (trust_domain.name,)
            ).rowcount
            if not gone:
                raise InvalidInput(f"{trust_domain} is not federated")
            Store.bump(conn, "policy_version")
            self.store.audit(conn, at, "federation_remove", trust_domain=trust_domain.name)

    def federations(self) -> list[FederatedDomain]:
        with self.store.read() as conn:
            rows = conn.execute(_SELECT + " ORDER BY trust_domain")
            return [_row(r) for r in rows.fetchall()]

    def federation(self, trust_domain: TrustDomain) -> FederatedDomain:
        with self.store.read() as conn:
            return self._federation(conn, trust_domain)

    @staticmethod
    def _federation(conn: Connection, trust_domain: TrustDomain) -> FederatedDomain:
        row = conn.execute(
            _SELECT + " WHERE trust_domain = ?",
            (trust_domain.name,),
        ).fetchone()
        if row is None:
            raise InvalidInput(f"{trust_domain} is not federated")
        return _row(row)

    def record_fetch(
        self,
        trust_domain: TrustDomain,
        fetched: TrustBundle | MeshIdError,
        *,
        seen: TrustBundle | None = None,
    ) -> FederatedDomain:
        """Keep a fetched bundle (if its sequence does not go backwards), or count a failure.

        A failure, a backwards sequence included, keeps the last good bundle.
        `seen` is the bundle held when the fetch began: if another instance (or
        worker) recorded a newer one meanwhile, a fetch between the two is late,
        not backwards, and changes nothing.
        """
        now = self._now()
        at = now.timestamp()
        with self.store.write() as conn:
            held = self._federation(conn, trust_domain)
            if (
                isinstance(fetched, TrustBundle)
                and seen is not None
                and seen.sequence <= fetched.sequence < held.bundle.sequence
            ):
                return held  # overtaken by a newer fetch recorded meanwhile
            error = fetched if isinstance(fetched, MeshIdError) else None
            if isinstance(fetched, TrustBundle):
                try:
                    bundle = take_fetched(held.bundle, fetched)
                except MeshIdError as exc:
                    error = exc
                else:
                    conn.execute(
                        "UPDATE federated_domains SET bundle = ?, sequence = ?, fetched_at = ?, "
                        "next_refresh = ?, failures = 0, last_error = NULL "
                        "WHERE trust_domain = ?",
                        (
                            bundle.to_spiffe_json(),
                            bundle.sequence,
                            at,
                            at + backoff(bundle.refresh_hint, 0),
                            trust_domain.name,
                        ),
                    )
                    if bundle.sequence != held.bundle.sequence:
                        Store.bump(conn, "policy_version")
                        self.store.audit(
                            conn,
                            at,
                            "federation_bundle",
                            trust_domain=trust_domain.name,
                            sequence=bundle.sequence,
                        )
            if error is not None:
                failures = held.failures + 1
                conn.execute(
                    "UPDATE federated_domains SET failures = ?, last_error = ?, next_refresh = ? "
                    "WHERE trust_domain = ?",
                    (
                        failures,
                        error.reason,
                        at + backoff(held.bundle.refresh_hint, failures),
                        trust_domain.name,
                    ),
                )
            return self._federation(conn, trust_domain)

    def federated_bundles(self) -> tuple[TrustBundle, ...]:
        """The last good bundle of each federated trust domain, for the feed."""
        return tuple(f.bundle for f in self.federations())

    def resolve_pair_id(self, text: str) -> SpiffeId:
        """An allow-list ID: ours (a bare path or a full ID), or a full ID of a federated
        trust domain; any other trust domain is refused by name."""
        return resolve_id(text, self.trust_domain, self.federated_domains())

    def federated_domains(self) -> frozenset[TrustDomain]:
        return frozenset(f.trust_domain for f in self.federations())


_SELECT = (
    "SELECT trust_domain, url, endpoint_id, bundle, fetched_at, next_refresh, failures, "
    "last_error FROM federated_domains"
)


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def _row(row: tuple[object, ...]) -> FederatedDomain:
    td_name, url, endpoint_id, bundle, fetched_at, next_refresh, failures, last_error = row
    td = TrustDomain(str(td_name))
    next_at = _time(float(next_refresh))  # type: ignore[arg-type]
    assert next_at is not None
    return FederatedDomain(
        trust_domain=td,
        url=str(url),
        endpoint_id=SpiffeId.parse(str(endpoint_id)),
        bundle=TrustBundle.from_spiffe_json(td, str(bundle)),
        fetched_at=_time(float(fetched_at)) if fetched_at is not None else None,  # type: ignore[arg-type]
        next_refresh=next_at,
        failures=int(failures),  # type: ignore[call-overload]
        last_error=str(last_error) if last_error is not None else None,
    )
