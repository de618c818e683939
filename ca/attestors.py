"""JWT attestors on the authority: the stored list, the issuers' keys, enrollment by JWT.

Theory of operation: an attestor (`meshid.jwtattest.Attestor`) is a row of
the `attestors` table. An enrollment JWT names its issuer; the attestor that
trusts that issuer supplies the keys (its JWKS file or HTTPS URL, read once
and kept) and the rules, and `meshid.jwtattest.verify` decides. A token
naming a `kid` the kept keys lack makes the keys be read again, at most once
per `REFRESH_INTERVAL` per attestor for a URL (so a stream of forged `kid`s
cannot make the authority hammer the issuer), and whenever the file changed
for a file: an issuer's key rotation is picked up without a restart.

Each token is accepted once: its SHA-256 goes into `used_jwts` in the same
transaction that records the SVID (a replay, even a concurrent one, is
refused as `jwt_replayed`), with the pod UID the token carried. Rows outlive
the token's `exp` plus the leeway, then are pruned: an expired token is
refused anyway.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ca.db import Connection
from ca.issuance import Issuance
from ca.issuer import check_csr_identity, csr_public_key, parse_csr
from ca.store import Store
from ca.values import Prepared, check_not_reserved
from meshid.clock import Clock
from meshid.errors import InvalidInput, MeshIdError, StateError
from meshid.jwtattest import (
    AttestationRejected,
    Attestor,
    check_template,
    unverified_issuer,
    verify,
)
from meshid.jwtsvid import LEEWAY, PublicKey, keys_from_jwks
from meshid.reasons import Reason

REFRESH_INTERVAL = 30.0  # seconds between two reads of an issuer's URL forced by unknown kids
MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT = 5.0


@dataclass(slots=True)
class _KeySet:
    keys: dict[str, PublicKey]
    read_at: float  # monotonic
    stamp: tuple[int, int, int] | None  # the file's (inode, size, mtime_ns) when read


class Attestors(Issuance):
    def __init__(
        self,
        state_dir: Path,
        store: Store,
        *,
        passphrase: bytes | None = None,
        clock: Clock,
        instance: str = "",
    ) -> None:
        super().__init__(state_dir, store, passphrase=passphrase, clock=clock, instance=instance)
        # Where HTTPS JWKS URLs are verified against: the system's CAs unless set.
        self.jwks_tls: ssl.SSLContext | None = None
        self._key_sets: dict[str, _KeySet] = {}
        self._attest_lock = threading.Lock()  # API requests run in worker threads

    # -- the list --

    def add_attestor(self, attestor: Attestor) -> Attestor:
        check_not_reserved(check_template(attestor.template, self.trust_domain))
        self._read_keys(attestor)  # refuse an attestor whose keys cannot be read now
        at = self._now().timestamp()
        with self.store.write() as conn:
            if conn.execute("SELECT 1 FROM attestors WHERE name = ?", (attestor.name,)).fetchone():
                raise StateError(f"attestor {attestor.name} exists; remove it first")
            taken = [a for a in self._attestors(conn) if a.issuer == attestor.issuer]
            if taken:
                raise StateError(
                    f"issuer {attestor.issuer} is trusted by attestor {taken[0].name} already"
                )
            conn.execute(
                "INSERT INTO attestors (name, spec, created_at) VALUES (?, ?, ?)",
                (attestor.name, json.dumps(asdict(attestor)), at),
            )
            self.store.audit(conn, at, "attestor_add", **_details(attestor))
        return attestor

    def remove_attestor(self, name: str) -> None:
        at = self._now().timestamp()
        with self.store.write() as conn:
            gone = conn.execute("DELETE FROM attestors WHERE name = ?", (name,)).rowcount
            if not gone:
                raise InvalidInput(f"no attestor named {name[:64]!r}")
            self.store.audit(conn, at, "attestor_remove", name=name)

    def attestors(self) -> list[Attestor]:
        with self.store.read() as conn:
            return self._attestors(conn)

    @staticmethod
    def _attestors(conn: Connection) -> list[Attestor]:
        rows = conn.execute("SELECT spec FROM attestors ORDER BY name").fetchall()
        return [_attestor(json.loads(row[0])) for row in rows]

    # -- enrollment --

    def prepare_enroll_jwt(self, token: str, csr_data: bytes) -> Prepared:
        """Checks and the signature of an enrollment by JWT; `commit` consumes the token."""
        csr = parse_csr(csr_data)
        public_key = csr_public_key(csr)
        _, kid, iss = unverified_issuer(token)
        attestor = next((a for a in self.attestors() if a.issuer == iss), None)
        if attestor is None:
            raise AttestationRejected(
                f"no attestor trusts issuer {iss[:128]!r}", reason=Reason.JWT_ISSUER
            )
        keys = self._keys(attestor, kid)
        attested = verify(token, attestor, keys, self.trust_domain, self._now(), LEEWAY)
        spiffe_id = check_not_reserved(attested.spiffe_id)
        with self.store.read() as conn:
            self._check_not_replayed(conn, attested.digest)
            self._check_not_revoked(conn, spiffe_id)
        check_csr_identity(csr, spiffe_id)
        generation, leaf = self._sign(spiffe_id, public_key, None, [], [])
        return Prepared(spiffe_id, generation, leaf, "enroll_jwt", attested=attested)

    def _consume(self, conn: Connection, prepared: Prepared) -> None:
        super()._consume(conn, prepared)
        attested = prepared.attested
        if attested is None:
            return
        now = self._now().timestamp()
        conn.execute("DELETE FROM used_jwts WHERE expires_at < ?", (now - LEEWAY.total_seconds(),))
        self._check_not_replayed(conn, attested.digest)
        conn.execute(
            "INSERT INTO used_jwts (hash, attestor, spiffe_id, serial, pod_uid, subject, "
            "used_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                attested.digest,
                attested.attestor,
                str(prepared.spiffe_id),
                f"{prepared.leaf.serial_number:x}",
                attested.pod_uid,
                attested.subject,
                now,
                attested.expires_at,
            ),
        )
        self.store.audit(
            conn,
            now,
            "attest",
            attestor=attested.attestor,
            spiffe_id=str(prepared.spiffe_id),
            subject=attested.subject,
            pod_uid=attested.pod_uid,
            jwt_sha256=attested.digest[:16],
        )

    @staticmethod
    def _check_not_replayed(conn: Connection, digest: str) -> None:
        if conn.execute("SELECT 1 FROM used_jwts WHERE hash = ?", (digest,)).fetchone():
            raise AttestationRejected(
                "this enrollment JWT was used already", reason=Reason.JWT_REPLAYED
            )

    def pod_uids(self, per_identity: int = 3) -> dict[str, list[str]]:
        """The pods (by UID) that enrolled each identity by JWT, the latest first."""
        with self.store.read() as conn:
            rows = conn.execute(
                "SELECT spiffe_id, pod_uid FROM used_jwts WHERE pod_uid IS NOT NULL "
                "ORDER BY used_at DESC"
            ).fetchall()
        found: dict[str, list[str]] = {}
        for sid, uid in rows:
            pods = found.setdefault(str(sid), [])
            if len(pods) < per_identity:
                pods.append(str(uid))
        return found

    # -- the issuers' keys --

    def _keys(self, attestor: Attestor, kid: str) -> Mapping[str, PublicKey]:
        """The attestor's keys, read again if `kid` is unknown and a read is due.

        Kept by source (file or URL), so an attestor removed and added again
        elsewhere with another source is not answered from the old keys. A
        failed read counts as a read for the rate limit: an issuer that is
        down is not asked again for every token that names an unknown kid.
        """
        source = attestor.jwks_file or attestor.jwks_url or ""
        with self._attest_lock:
            held = self._key_sets.get(source)
        if held is not None and (kid in held.keys or not self._read_due(attestor, held)):
            if not held.keys:
                raise AttestationRejected(
                    f"{source}: the issuer's keys could not be read; retry later",
                    reason=Reason.JWKS_UNAVAILABLE,
                )
            return held.keys
        try:
            fresh = self._read_keys(attestor)
        except StateError as exc:
            now = self._clock.monotonic()
            with self._attest_lock:
                if held is not None and held.keys:  # an unreadable refresh keeps what we had
                    self._key_sets[source] = _KeySet(held.keys, now, held.stamp)
                    return held.keys
                self._key_sets[source] = _KeySet({}, now, _stamp_of(attestor))
            raise AttestationRejected(exc.message, reason=Reason.JWKS_UNAVAILABLE) from None
        with self._attest_lock:
            self._key_sets[source] = fresh
        return fresh.keys

    def _read_due(self, attestor: Attestor, held: _KeySet) -> bool:
        if attestor.jwks_file is not None:
            return _stamp(Path(attestor.jwks_file)) != held.stamp
        return self._clock.monotonic() - held.read_at >= REFRESH_INTERVAL

    def _read_keys(self, attestor: Attestor) -> _KeySet:
        """Read the JWKS; StateError (one line, naming the source) if it cannot be used."""
        source = attestor.jwks_file or attestor.jwks_url or ""
        stamp = None
        try:
            if attestor.jwks_file is not None:
                path = Path(attestor.jwks_file)
                stamp = _stamp(path)
                with path.open("rb") as f:
                    raw = f.read(MAX_JWKS_BYTES + 1)
            else:
                context = self.jwks_tls or ssl.create_default_context()
                opener = urllib.request.build_opener(
                    urllib.request.HTTPSHandler(context=context), _NoRedirect()
                )
                with opener.open(source, timeout=FETCH_TIMEOUT) as reply:
                    raw = reply.read(MAX_JWKS_BYTES + 1)
        except (OSError, ValueError) as exc:
            raise StateError(f"{source}: cannot read the JWKS: {_why(exc)}") from None
        if len(raw) > MAX_JWKS_BYTES:
            raise StateError(f"{source}: the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        try:
            keys = keys_from_jwks(json.loads(raw), use=None)
        except (ValueError, RecursionError):
            raise StateError(f"{source}: the JWKS is not JSON") from None
        except MeshIdError as exc:
            raise StateError(f"{source}: {exc.message}") from None
        if not keys:
            raise StateError(f"{source}: the JWKS holds no signing key with a kid")
        return _KeySet(keys, self._clock.monotonic(), stamp)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead to plain HTTP, where anyone on the path picks the keys."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> None:
        fp.close()
        raise OSError("the JWKS URL redirects; give the final https:// URL")


def _stamp_of(attestor: Attestor) -> tuple[int, int, int] | None:
    return _stamp(Path(attestor.jwks_file)) if attestor.jwks_file is not None else None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _why(exc: BaseException) -> str:
    said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or said
    return str(reason or type(exc).__name__).replace("\n", " ")[:200]


def _attestor(doc: Mapping[str, Any]) -> Attestor:
    return Attestor(
        name=doc["name"],
        issuer=doc["issuer"],
        audience=doc["audience"],
        template=doc["template"],
        claims=tuple((str(k), str(v)) for k, v in doc.get("claims", ())),
        jwks_file=doc.get("jwks_file"),
        jwks_url=doc.get("jwks_url"),
    )


def _details(attestor: Attestor) -> dict[str, Any]:
    doc = asdict(attestor)
    doc["claims"] = [f"{k}={v}" for k, v in attestor.claims]
    return doc
