"""Issuing SVIDs: offline issue, join tokens, enrollment and renewal.

Theory of operation: an enrollment or renewal is prepared (checked and signed)
outside any transaction, then committed: the commit checks again what may have
changed meanwhile (token used, identity revoked, caller unknown) and records the
SVID with its audit row in one transaction, so concurrent workers never hold the
database's write lock while they compute a signature.

How often an identity may renew is a token bucket per SPIFFE ID
(`meshid.ratelimit.TokenBucket`) kept in the database, so that every worker
and every instance spends from the same one: looked at before signing (a
caller past its budget costs a lookup, no signature) and spent in the
transaction that records the SVID (two workers cannot both spend the last
token).

Records of SVIDs that expired more than SVID_RETENTION ago are pruned by the
serving authority (`prune_svids`, a bounded batch per transaction): nothing
can use such a certificate, and revoking its serial would change nothing.
Each identity's newest record is kept whatever its age, so the identities
ever issued and their latest expiry stay listed. The audit log, an HMAC
chain, keeps every issuance for good.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from math import ceil

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca.db import Connection
from ca.issuer import check_csr_identity, csr_public_key, parse_csr
from ca.roots import Roots
from ca.store import Store
from ca.values import (
    _SPKI,
    DEFAULT_TOKEN_TTL,
    TOKEN_PREFIX,
    IssuedSvid,
    Prepared,
    TokenGrant,
    check_dns_name,
    check_not_reserved,
    check_svid_ttl,
    token_hash,
)
from meshid.errors import (
    CsrRejected,
    IdentityRevoked,
    RateLimited,
    TokenRejected,
)
from meshid.ratelimit import TokenBucket
from meshid.spiffeid import SpiffeId
from meshid.svid import (
    IpAddress,
    PublicKey,
    build_svid,
    check_validity,
    leaf_spiffe_id,
    verify_svid,
)

# Certificates remembered as verified: one per live sidecar and some (a mesh of tens of
# thousands fits; past it the memory is forgotten at once, about 200 bytes an entry).
VERIFIED_CALLERS = 65536


SVID_RETENTION = timedelta(hours=24)  # how long the record of an expired SVID is kept
PRUNE_BATCH = 500  # records deleted in one transaction at most


class Issuance(Roots):
    # -- issuing --

    def _check_not_revoked(self, conn: Connection, spiffe_id: SpiffeId) -> None:
        row = conn.execute(
            "SELECT revoked_at FROM revocations WHERE spiffe_id = ?", (str(spiffe_id),)
        ).fetchone()
        if row is not None:
            raise IdentityRevoked(f"{spiffe_id} is revoked")

    def _sign(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: timedelta | None,
        dns_names: Sequence[str],
        ip_addresses: Sequence[IpAddress],
    ) -> tuple[int, x509.Certificate]:
        generation, root, key = self.signer()
        lifetime = check_svid_ttl(ttl) if ttl is not None else self.svid_ttl
        now = self._now()
        leaf = build_svid(
            subject_key=public_key,
            spiffe_id=spiffe_id,
            issuer=root,
            issuer_key=key,
            now=now,
            ttl=lifetime,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
        )
        if leaf.not_valid_after_utc < now + lifetime - timedelta(seconds=1):  # NotAfter: whole s
            self.capped_svids += 1
            self.last_capped = (spiffe_id, leaf.not_valid_after_utc)
        return generation, leaf

    def _record(self, conn: Connection, generation: int, leaf: x509.Certificate, how: str) -> None:
        at = self._now().timestamp()
        sid = str(leaf_spiffe_id(leaf))
        conn.execute(
            "INSERT INTO svids (serial, spiffe_id, generation, not_after, issued_at, how) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                f"{leaf.serial_number:x}",
                sid,
                generation,
                leaf.not_valid_after_utc.timestamp(),
                at,
                how,
            ),
        )
        self.store.audit(
            conn,
            at,
            how,
            spiffe_id=sid,
            serial=f"{leaf.serial_number:x}",
            not_after=leaf.not_valid_after_utc.isoformat(),
            root_generation=generation,
        )

    def issue(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        *,
        ttl: timedelta | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[IpAddress] = (),
        how: str = "issue",
        internal: bool = False,
    ) -> IssuedSvid:
        """Sign for an identity the caller has already authorised (offline issue, renewal)."""
        spiffe_id.require_workload()
        if not internal:
            check_not_reserved(spiffe_id, operators=True)
        dns = [check_dns_name(n) for n in dns_names]
        generation, leaf = self._sign(spiffe_id, public_key, ttl, dns, list(ip_addresses))
        with self.store.write() as conn:
            self._check_not_revoked(conn, spiffe_id)
            self._record(conn, generation, leaf, how)
        return IssuedSvid(spiffe_id, (leaf,), self.bundle())

    # -- join tokens --

    def tokens(self) -> list[tuple[SpiffeId, float, float, float | None]]:
        """(ID, created_at, expires_at, used_at) of every join token, oldest first; no hashes."""
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT spiffe_id, created_at, expires_at, used_at FROM tokens "
                "ORDER BY created_at, spiffe_id"
            ).fetchall()
        return [(SpiffeId.parse(s), float(c), float(e), u) for s, c, e, u in rows]

    def delete_tokens(self, spiffe_id: SpiffeId) -> int:
        """Delete the unused tokens of `spiffe_id`; how many. Used ones stay as history."""
        now = self._now().timestamp()
        with self.store.write() as conn:
            cursor = conn.execute(
                "DELETE FROM tokens WHERE spiffe_id = ? AND used_at IS NULL", (str(spiffe_id),)
            )
            count = cursor.rowcount
            if count:
                self.store.audit(conn, now, "token_delete", spiffe_id=str(spiffe_id), count=count)
        return count

    def create_token(
        self,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta = DEFAULT_TOKEN_TTL,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[IpAddress] = (),
    ) -> str:
        check_not_reserved(spiffe_id.require_workload(), operators=True)
        dns = [check_dns_name(n) for n in dns_names]
        ips = [str(ip) for ip in ip_addresses]
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._now()
        expires = now + ttl
        with self.store.write() as conn:
            self._check_not_revoked(conn, spiffe_id)
            conn.execute(
                "INSERT INTO tokens (hash, spiffe_id, dns, ips, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    token_hash(token),
                    str(spiffe_id),
                    json.dumps(dns),
                    json.dumps(ips),
                    now.timestamp(),
                    expires.timestamp(),
                ),
            )
            self.store.audit(
                conn,
                now.timestamp(),
                "token",
                spiffe_id=str(spiffe_id),
                token_sha256=token_hash(token)[:16],
                expires_at=expires.isoformat(),
                dns=dns,
                ips=ips,
            )
        return token

    def enroll(self, token: str, csr_data: bytes) -> IssuedSvid:
        """Trade a one-time join token and a CSR for an SVID.

        The CSR is checked before the token is touched, so a bad CSR does not
        burn the token; the token is consumed in the same transaction that
        records the SVID, so of two concurrent uses exactly one succeeds.
        """
        return self.commit(self.prepare_enroll(token, csr_data))

    def prepare_enroll(self, token: str, csr_data: bytes) -> Prepared:
        """Everything an enrollment needs but the write: checks, and the signature."""
        csr = parse_csr(csr_data)
        public_key = csr_public_key(csr)
        digest = token_hash(token)
        with self.store.read() as conn:
            row = self._usable_token(conn, digest)
            self._check_not_revoked(conn, SpiffeId.parse(row[0]))
        spiffe_id = SpiffeId.parse(row[0])
        check_csr_identity(csr, spiffe_id)
        dns = json.loads(row[1])
        ips = [ipaddress.ip_address(ip) for ip in json.loads(row[2])]
        generation, leaf = self._sign(spiffe_id, public_key, None, dns, ips)
        return Prepared(spiffe_id, generation, leaf, "enroll", token_digest=digest)

    def _usable_token(self, conn: Connection, digest: str) -> tuple[str, str, str]:
        row = conn.execute(
            "SELECT spiffe_id, dns, ips, expires_at, used_at FROM tokens WHERE hash = ?",
            (digest,),
        ).fetchone()
        if row is None:
            raise TokenRejected("join token not recognised", reason="token_unknown")
        spiffe_id = SpiffeId.parse(row[0])
        if row[4] is not None:
            raise TokenRejected(f"join token for {spiffe_id} was already used", reason="token_used")
        if row[3] <= self._now().timestamp():
            expired = datetime.fromtimestamp(row[3], UTC)
            raise TokenRejected(
                f"join token for {spiffe_id} expired at {expired:%Y-%m-%dT%H:%M:%SZ}",
                reason="token_expired",
            )
        return str(row[0]), str(row[1]), str(row[2])

    def commit(self, prepared: Prepared, budget: TokenBucket | None = None) -> IssuedSvid:
        """Record a prepared issuance, checking again what may have changed meanwhile.

        Signing happens before, outside the transaction, so that concurrent
        workers do not hold the database's one write lock while they compute.
        A renewal spends one of its identity's `budget` here, if one is given.
        """
        with self.store.write() as conn:
            self._consume(conn, prepared)
            if prepared.caller_serial is not None:
                known = conn.execute(
                    "SELECT 1 FROM svids WHERE serial = ?", (prepared.caller_serial,)
                ).fetchone()
                if known is None:
                    raise TokenRejected(
                        f"{prepared.spiffe_id}: the presented certificate was not issued by "
                        "this authority",
                        reason="unknown_certificate",
                    )
                if conn.execute(
                    "SELECT 1 FROM revoked_serials WHERE serial = ?", (prepared.caller_serial,)
                ).fetchone():
                    raise IdentityRevoked(
                        f"{prepared.spiffe_id}: SVID {prepared.caller_serial} is revoked"
                    )
            self._check_not_revoked(conn, prepared.spiffe_id)
            if prepared.caller_serial is not None and budget is not None:
                self._spend_renewal(conn, prepared.spiffe_id, budget)  # a refusal spends none
            self._record(conn, prepared.generation, prepared.leaf, prepared.how)
        return IssuedSvid(prepared.spiffe_id, (prepared.leaf,), self.bundle())

    def prune_svids(self, limit: int = PRUNE_BATCH) -> int:
        """Delete up to `limit` records of SVIDs expired more than SVID_RETENTION ago,
        oldest first, never an identity's newest; how many went. One transaction.

        A record whose serial is still revoked waits for a later batch: the revocation
        is pruned by joining it, and would otherwise stay for good.

        Up to `limit` renewal budgets untouched for an SVID lifetime go too: they are
        full again, as a missing one is. So do up to `limit` revocations of serials
        whose SVID expired as long ago: every peer refuses that certificate for its
        expiry alone, and each one kept would ride in every sidecar's feed for good.
        """
        now = self._now()
        cutoff = (now - SVID_RETENTION).timestamp()
        with self.store.write() as conn:
            conn.execute(
                "DELETE FROM renewal_budgets WHERE spiffe_id IN (SELECT spiffe_id "
                "FROM renewal_budgets WHERE at <= ? LIMIT ?)",
                ((now - self.svid_ttl).timestamp(), limit),
            )
            moot = conn.execute(
                "DELETE FROM revoked_serials WHERE serial IN (SELECT r.serial "
                "FROM revoked_serials r JOIN svids s ON s.serial = r.serial "
                "WHERE s.not_after < ? LIMIT ?)",
                (cutoff, limit),
            ).rowcount
            if moot:  # a new feed version, so that sidecars get the shorter list
                Store.bump(conn, "revocation_version")
            return conn.execute(
                "DELETE FROM svids WHERE serial IN (SELECT s.serial FROM svids s "
                "WHERE s.not_after < ? AND EXISTS (SELECT 1 FROM svids t "
                "WHERE t.spiffe_id = s.spiffe_id AND t.not_after > s.not_after) "
                "AND NOT EXISTS (SELECT 1 FROM revoked_serials r WHERE r.serial = s.serial) "
                "ORDER BY s.not_after LIMIT ?)",
                (cutoff, limit),
            ).rowcount

    def renewal_wait(self, spiffe_id: SpiffeId, budget: TokenBucket) -> float:
        """Seconds until `spiffe_id` may renew under `budget` (0: now). Reads only."""
        with self.store.read() as conn:
            return budget.wait(self._renewals_left(conn, spiffe_id, budget))

    def _renewals_left(self, conn: Connection, spiffe_id: SpiffeId, budget: TokenBucket) -> float:
        row = conn.execute(
            "SELECT tokens, at FROM renewal_budgets WHERE spiffe_id = ?", (str(spiffe_id),)
        ).fetchone()
        held = None if row is None else (float(row[0]), float(row[1]))
        return budget.level(held, self._now().timestamp())

    def _spend_renewal(self, conn: Connection, spiffe_id: SpiffeId, budget: TokenBucket) -> None:
        tokens = self._renewals_left(conn, spiffe_id, budget)
        wait = budget.wait(tokens)
        if wait:
            raise RateLimited(
                f"{spiffe_id} renewed too often; retry in {ceil(wait)}s", retry_after=wait
            )
        conn.execute(
            "INSERT INTO renewal_budgets (spiffe_id, tokens, at) VALUES (?, ?, ?) "
            "ON CONFLICT (spiffe_id) DO UPDATE SET tokens = excluded.tokens, at = excluded.at",
            (str(spiffe_id), tokens - 1.0, self._now().timestamp()),
        )

    def _consume(self, conn: Connection, prepared: Prepared) -> None:
        """Use up what the enrollment traded (a join token here; ca.attestors adds JWTs)."""
        if prepared.token_digest is not None:
            row = self._usable_token(conn, prepared.token_digest)
            if row[0] != str(prepared.spiffe_id):  # pragma: no cover - hashes do not move
                raise TokenRejected("join token changed", reason="token_unknown")
            now = self._now().timestamp()
            used = conn.execute(  # conditional: a second use, from any instance, changes nothing
                "UPDATE tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL "
                "AND expires_at > ?",
                (now, prepared.token_digest, now),
            ).rowcount
            if used != 1:
                raise TokenRejected(
                    f"join token for {prepared.spiffe_id} was already used", reason="token_used"
                )

    def token_grant(self, token: str) -> TokenGrant | None:
        """What an unused, unexpired token would grant (None otherwise). Reads only."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT spiffe_id, dns, ips, expires_at, used_at FROM tokens WHERE hash = ?",
                (token_hash(token),),
            ).fetchone()
        if row is None or row[4] is not None or row[3] <= self._now().timestamp():
            return None
        return TokenGrant(
            SpiffeId.parse(row[0]),
            tuple(json.loads(row[1])),
            tuple(ipaddress.ip_address(ip) for ip in json.loads(row[2])),
        )

    # -- renewal --

    def renew(self, caller: x509.Certificate, csr_data: bytes) -> IssuedSvid:
        """A fresh SVID for the holder of a current one; same identity, same granted SANs.

        The caller's certificate was verified by TLS; it is checked again here
        (profile, time, chain to our bundle) and must be one this authority
        recorded issuing, so a certificate minted with a stolen root key
        elsewhere does not renew.
        """
        return self.commit(self.prepare_renew(caller, csr_data))

    def prepare_renew(self, caller: x509.Certificate, csr_data: bytes) -> Prepared:
        sid = self.verified_caller(caller)
        csr = parse_csr(csr_data)
        check_csr_identity(csr, sid)
        public_key = csr_public_key(csr)
        if public_key.public_bytes(*_SPKI) == caller.public_key().public_bytes(*_SPKI):
            raise CsrRejected(
                "renewal must come with a new key; this CSR reuses the current one",
                reason="key_reused",
            )
        try:
            san = caller.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = list(san.get_values_for_type(x509.DNSName))
            ips = [
                ip
                for ip in san.get_values_for_type(x509.IPAddress)
                if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
            ]
        except x509.ExtensionNotFound:
            dns, ips = [], []
        check_not_reserved(sid, operators=True)
        generation, leaf = self._sign(sid, public_key, None, dns, ips)
        return Prepared(sid, generation, leaf, "renew", caller_serial=f"{caller.serial_number:x}")

    def verified_caller(
        self,
        caller: x509.Certificate,
        sequence: int | None = None,
        *,
        fingerprint: bytes | None = None,
    ) -> SpiffeId:
        """verify_svid, remembered per certificate and bundle: a sidecar presents the same
        certificate to every watch and every report until it renews. Its times are checked
        on every call. `sequence`: the bundle's, when the caller read it in this very
        transaction (then the bundle is read only if the certificate is not remembered).
        `fingerprint`: `caller`'s SHA-256, when the connection computed it once already."""
        now = self._now()
        if fingerprint is None:
            fingerprint = caller.fingerprint(hashes.SHA256())
        known = self._verified.get(fingerprint)
        bundle = None
        if known is None or sequence is None or known[1] != sequence:
            bundle = self.bundle()
            sequence = bundle.sequence
        if known is not None and known[1] == sequence:
            check_validity(caller, now, f"{known[0]} certificate")
            return known[0]
        assert bundle is not None  # read above: nothing remembered at `sequence`
        sid = verify_svid([caller], bundle.roots, now).spiffe_id
        if len(self._verified) >= VERIFIED_CALLERS:
            self._verified.clear()
        self._verified[fingerprint] = (sid, bundle.sequence)
        return sid
