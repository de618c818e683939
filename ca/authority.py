"""The certificate authority: its state directory and every action it takes.

State directory layout (created by `init`, never half-written):

    authority.db      SQLite: settings, roots, tokens, allow-list, revocations,
                      issued SVIDs, the audit chain
    keys/root-N.key   root private keys, mode 0600 in a 0700 directory,
                      optionally encrypted with a passphrase
    bundle.pem        the trust bundle, rewritten whenever it changes
    audit.key         the audit chain's MAC key, mode 0600 (see ca.store)
    audit.head        the audit chain's newest (seq, MAC), rewritten after each commit

`init` builds everything in a hidden sibling directory and moves it in with the
database last, so a directory either holds a whole authority or none.
Actions that change state run in one database transaction together with
their audit row. The root key is read only by the actions that sign. Every
root generation is protected like the first: on an encrypted authority a new
root key is written only under the passphrase the active key opens with, and
a plaintext key is neither written nor activated.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ca.issuer import check_csr_identity, csr_public_key, parse_csr
from ca.jwtkeys import JwtKeyring
from ca.rootlife import ActiveRoot, PendingRoot
from ca.store import AUDIT_HEAD, AUDIT_KEY, DB_NAME, SCHEMA_VERSION, Store
from meshid.bundle import TrustBundle
from meshid.duration import format_duration
from meshid.errors import (
    CsrRejected,
    IdentityRevoked,
    InvalidInput,
    InvalidSvid,
    MeshIdError,
    PolicyError,
    StateError,
    StorageUnavailable,
    TokenRejected,
)
from meshid.files import write_atomic
from meshid.policy import Decision, Policy
from meshid.report import StatusReport, parse_report
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import (
    IpAddress,
    PrivateKey,
    PublicKey,
    build_root,
    build_svid,
    certs_from_pem,
    certs_to_pem,
    check_validity,
    generate_key,
    key_from_pem,
    key_to_pem,
    leaf_spiffe_id,
    verify_svid,
)

Clock = Callable[[], datetime]

MIN_SVID_TTL = timedelta(seconds=30)
DEFAULT_SVID_TTL = timedelta(hours=1)
DEFAULT_ROOT_TTL = timedelta(days=365)
DEFAULT_TOKEN_TTL = timedelta(minutes=15)
TOKEN_PREFIX = "mjt_"  # noqa: S105 - a marker, not a secret
BUNDLE_FILE = "bundle.pem"
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
SIGNER_RECHECK = timedelta(seconds=1)
BUNDLE_RECHECK = 0.2  # seconds of monotonic time
REPORT_FRESH = timedelta(seconds=30)  # a sidecar silent for longer is not waited for
REPORT_FORGET = timedelta(minutes=10)  # reports older than this are deleted
MAX_INSTANCES = 8  # reports kept per identity; a new instance replaces the least recent
RESERVED_PATH = "/meshid"  # the authority's own identities live under here
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_dns_name(name: str) -> str:
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise InvalidInput(f"{name[:80]!r}: not a DNS name", reason="invalid_dns_name")
    return name.rstrip(".").lower()


def check_ip(text: str) -> IpAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidInput(f"{text[:80]!r}: not an IP address", reason="invalid_ip") from None


def check_not_reserved(spiffe_id: SpiffeId) -> SpiffeId:
    """Workloads may not hold the control plane's identities."""
    if spiffe_id.path == RESERVED_PATH or spiffe_id.path.startswith(RESERVED_PATH + "/"):
        raise InvalidInput(
            f"{spiffe_id}: paths under {RESERVED_PATH}/ are reserved for the authority",
            reason="reserved_id",
        )
    return spiffe_id


def check_svid_ttl(ttl: timedelta) -> timedelta:
    if ttl < MIN_SVID_TTL:
        raise InvalidInput(
            f"SVID lifetime {format_duration(ttl)} is shorter than the minimum 30s",
            reason="invalid_duration",
        )
    return ttl


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first; the root is in the bundle
    bundle: TrustBundle

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A signed certificate not yet recorded: `Authority.commit` makes it count."""

    spiffe_id: SpiffeId
    generation: int
    leaf: x509.Certificate
    how: str
    token_digest: str | None = None  # an enrollment consumes this token
    caller_serial: str | None = None  # a renewal needs this SVID to be one of ours


@dataclass(frozen=True, slots=True)
class SidecarReport:
    """A sidecar's latest report, as kept: the identity is the one its certificate proved."""

    instance: str
    spiffe_id: SpiffeId
    seen: datetime
    report: StatusReport


def printable(text: str, limit: int = 256) -> str:
    """`text` safe for a terminal or a log line: every non-printable character escaped.

    Newlines, carriage returns, escape sequences and non-ASCII become
    backslash escapes, so a value from a workload can neither forge a line
    nor drive the terminal; long values are cut.
    """
    shown = text if len(text) <= limit else text[:limit] + "..."
    if shown.isascii() and shown.isprintable():
        return shown
    return shown.encode("unicode_escape").decode("ascii")


@dataclass(frozen=True, slots=True)
class TokenGrant:
    spiffe_id: SpiffeId
    dns_names: tuple[str, ...]
    ip_addresses: tuple[IpAddress, ...]


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


_PEM_HEAD = 200  # enough for the BEGIN line and a legacy Proc-Type header


def _is_encrypted(pem: bytes) -> bool:
    """Whether a PEM private key is passphrase-protected (PKCS#8 or legacy OpenSSL)."""
    head = pem[:_PEM_HEAD]
    return b"BEGIN ENCRYPTED PRIVATE KEY" in head or b"Proc-Type: 4,ENCRYPTED" in head


@contextmanager
def _dir_lock(state_dir: Path) -> Iterator[None]:
    with open(state_dir / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Authority:
    def __init__(
        self,
        state_dir: Path,
        store: Store,
        *,
        passphrase: bytes | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.state_dir = state_dir
        self.store = store
        self._passphrase = passphrase
        self._clock = clock
        with store.read() as conn:
            self.trust_domain = TrustDomain(Store.setting(conn, "trust_domain"))
            self.svid_ttl = timedelta(seconds=int(Store.setting(conn, "svid_ttl")))
            self.key_encrypted = Store.setting(conn, "key_encrypted") == "1"
        self._signer_cache: tuple[int, x509.Certificate, PrivateKey] | None = None
        self._signer_checked: datetime | None = None
        self._verified: dict[bytes, tuple[SpiffeId, int]] = {}
        self._bundle_checked = 0.0
        self._bundle_cache: TrustBundle | None = None
        self.capped_svids = 0  # SVIDs cut short by the root's expiry, for the server to log
        self.last_capped: tuple[SpiffeId, datetime] | None = None

    # -- lifecycle --

    @classmethod
    def open(
        cls, state_dir: Path, *, passphrase: bytes | None = None, clock: Clock = utcnow
    ) -> Authority:
        if not state_dir.is_dir():
            raise StateError(f"{state_dir}: no such directory (run 'meshid ca init')")
        return cls(state_dir, Store.open(state_dir / DB_NAME), passphrase=passphrase, clock=clock)

    @classmethod
    def init(
        cls,
        state_dir: Path,
        trust_domain: TrustDomain,
        *,
        svid_ttl: timedelta = DEFAULT_SVID_TTL,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        passphrase: bytes | None = None,
        clock: Clock = utcnow,
    ) -> Authority:
        check_svid_ttl(svid_ttl)
        if root_ttl <= svid_ttl:
            raise InvalidInput("the root lifetime must be longer than the SVID lifetime")
        if (state_dir / DB_NAME).exists():
            raise StateError(f"{state_dir}: already holds an authority; nothing was changed")
        if state_dir.exists() and not state_dir.is_dir():
            raise StateError(f"{state_dir}: exists and is not a directory")
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{state_dir}: cannot create: {exc.strerror}") from None
        with _dir_lock(state_dir):
            if (state_dir / DB_NAME).exists():
                raise StateError(f"{state_dir}: already holds an authority; nothing was changed")
            staging = state_dir / f".init-{secrets.token_hex(4)}"
            try:
                staging.mkdir(mode=0o700)
                cls._build(staging, trust_domain, svid_ttl, root_ttl, passphrase, clock())
                keys = state_dir / "keys"
                if keys.exists():  # left by an init that died before its database landed
                    shutil.rmtree(keys)
                os.replace(staging / "keys", keys)
                os.replace(staging / BUNDLE_FILE, state_dir / BUNDLE_FILE)
                for name in (AUDIT_KEY, AUDIT_HEAD):
                    os.replace(staging / name, state_dir / name)
                os.replace(staging / DB_NAME, state_dir / DB_NAME)  # the commit point
            except OSError as exc:
                raise StateError(f"{state_dir}: cannot write: {exc.strerror}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        JwtKeyring(state_dir, clock).keys()  # the first JWT-SVID key, so the bundle has one
        return cls.open(state_dir, passphrase=passphrase, clock=clock)

    @staticmethod
    def _build(
        staging: Path,
        trust_domain: TrustDomain,
        svid_ttl: timedelta,
        root_ttl: timedelta,
        passphrase: bytes | None,
        now: datetime,
    ) -> None:
        key = generate_key()
        root = build_root(
            trust_domain, key, not_before=now - timedelta(minutes=5), not_after=now + root_ttl
        )
        (staging / "keys").mkdir(mode=0o700)
        _write_private(staging / "keys" / "root-1.key", key_to_pem(key, passphrase))
        (staging / BUNDLE_FILE).write_bytes(certs_to_pem([root]))
        store = Store.open(staging / DB_NAME, create=True)
        try:
            at = now.timestamp()
            with store.write() as conn:
                settings = {
                    "schema_version": str(SCHEMA_VERSION),
                    "trust_domain": trust_domain.name,
                    "svid_ttl": str(int(svid_ttl.total_seconds())),
                    "root_ttl": str(int(root_ttl.total_seconds())),
                    "key_encrypted": "1" if passphrase else "0",
                }
                conn.executemany("INSERT INTO settings VALUES (?, ?)", settings.items())
                conn.executemany(
                    "INSERT INTO counters VALUES (?, ?)",
                    [("policy_version", 0), ("revocation_version", 0), ("bundle_sequence", 1)],
                )
                conn.execute(
                    "INSERT INTO roots (generation, cert_pem, key_file, state, not_after, "
                    "created_at) VALUES (1, ?, 'keys/root-1.key', 'active', ?, ?)",
                    (certs_to_pem([root]).decode(), root.not_valid_after_utc.timestamp(), at),
                )
                store.audit(
                    conn,
                    at,
                    "init",
                    trust_domain=trust_domain.name,
                    svid_ttl=int(svid_ttl.total_seconds()),
                    root_serial=f"{root.serial_number:x}",
                    root_not_after=root.not_valid_after_utc.isoformat(),
                    key_encrypted=bool(passphrase),
                )
        finally:
            store.close()

    def close(self) -> None:
        self.store.close()

    # -- identities --

    def resolve(self, text: str) -> SpiffeId:
        return SpiffeId.resolve(text, self.trust_domain).require_workload()

    def _now(self) -> datetime:
        return self._clock()

    def clock_now(self) -> datetime:
        return self._clock()

    # -- roots and the bundle --

    def bundle(self) -> TrustBundle:
        """The published roots; parsed again only when the sequence moves.

        Outside a transaction, the sequence itself is looked at again at most
        every BUNDLE_RECHECK seconds: a busy control plane asks for it several
        times per signature, and roots change on a scale of minutes.
        """
        now = time.monotonic()
        if (
            self._bundle_cache is not None
            and not self.store.in_transaction
            and now - self._bundle_checked < BUNDLE_RECHECK
        ):
            return self._bundle_cache
        self._bundle_checked = now
        with self.store.read() as conn:
            sequence = Store.counter(conn, "bundle_sequence")
            if self._bundle_cache is not None and self._bundle_cache.sequence == sequence:
                return self._bundle_cache
            rows = conn.execute(
                "SELECT cert_pem FROM roots WHERE state IN ('next', 'active', 'retiring') "
                "ORDER BY generation"
            ).fetchall()
        roots = [c for (pem,) in rows for c in certs_from_pem(pem.encode(), "root")]
        self._bundle_cache = TrustBundle(self.trust_domain, tuple(roots), sequence)
        return self._bundle_cache

    def signer(self) -> tuple[int, x509.Certificate, PrivateKey]:
        """The active root and its key; the key file is read on first use.

        The roots are looked at again at most once a second of the authority's
        clock: a root changes state on a schedule of minutes, and a busy
        control plane signs hundreds of SVIDs a second.
        """
        now = self._now()
        if (
            self._signer_cache is not None
            and self._signer_checked is not None
            and self._signer_checked <= now < self._signer_checked + SIGNER_RECHECK
        ):
            return self._signer_cache
        self.advance_roots()
        self._signer_checked = now
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation, cert_pem, key_file FROM roots WHERE state = 'active'"
            ).fetchone()
        if row is None:
            raise StateError("the authority has no active root; its database is damaged")
        generation, cert_pem, key_file = int(row[0]), str(row[1]), str(row[2])
        if self._signer_cache is not None and self._signer_cache[0] == generation:
            return self._signer_cache
        cert = certs_from_pem(cert_pem.encode(), "root")[0]
        key = self._load_key(self.state_dir / key_file)
        self._signer_cache = (generation, cert, key)
        return self._signer_cache

    def _load_key(self, path: Path) -> PrivateKey:
        """One root key, held to the protection the authority's first key set.

        The file itself says whether it is encrypted; on an authority whose
        keys are encrypted, a plaintext one (written by hand, or by a rotation
        of an older version) is refused rather than signed with.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StateError(f"cannot read root key {path}: {exc.strerror}") from None
        encrypted = _is_encrypted(data)
        if self.key_encrypted and not encrypted:
            raise StateError(
                f"root key {path.name} is not encrypted though this authority's keys are; "
                "encrypt it with the passphrase before it signs",
                reason="key_unprotected",
            )
        if encrypted and self._passphrase is None:
            raise StateError(
                "the root key is encrypted: give its passphrase with --passphrase-file "
                "or MESHID_CA_PASSPHRASE",
                reason="passphrase_required",
            )
        try:
            return key_from_pem(data, self._passphrase if encrypted else None, "root key")
        except InvalidSvid as exc:
            raise StateError(exc.message, reason=exc.reason) from None

    def _key_problem(self, conn: sqlite3.Connection, generation: int) -> str | None:
        """Why root `generation`'s key could not sign, as far as can be told without
        decrypting it: missing, unreadable, or less protected than the authority's keys."""
        row = conn.execute(
            "SELECT key_file FROM roots WHERE generation = ?", (generation,)
        ).fetchone()
        if row is None:
            return f"root {generation} is not in the database"
        path = self.state_dir / str(row[0])
        try:
            with open(path, "rb") as handle:
                head = handle.read(_PEM_HEAD)
        except OSError as exc:
            return f"cannot read root key {path.name}: {exc.strerror}"
        if self.key_encrypted and not _is_encrypted(head):
            return f"root key {path.name} is not encrypted though this authority's keys are"
        return None

    def next_root_problem(self) -> str | None:
        """Why a root waiting to activate could not take over, if its key is unusable."""
        with self.store.read() as conn:
            row = conn.execute("SELECT generation FROM roots WHERE state = 'next'").fetchone()
            return None if row is None else self._key_problem(conn, int(row[0]))

    def _new_key_protection(self, conn: sqlite3.Connection) -> bytes | None:
        """The passphrase a new root key is written under: the one the active key opens with.

        A new key is never less protected than the existing ones: on an
        encrypted authority a missing or wrong passphrase refuses the action
        before any file is written.
        """
        if not self.key_encrypted:
            return None
        row = conn.execute("SELECT key_file FROM roots WHERE state = 'active'").fetchone()
        if row is None:
            raise StateError("the authority has no active root; its database is damaged")
        self._load_key(self.state_dir / str(row[0]))  # proves the passphrase, or refuses
        return self._passphrase

    # -- issuing --

    def _check_not_revoked(self, conn: sqlite3.Connection, spiffe_id: SpiffeId) -> None:
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

    def _record(
        self, conn: sqlite3.Connection, generation: int, leaf: x509.Certificate, how: str
    ) -> None:
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
            check_not_reserved(spiffe_id)
        dns = [check_dns_name(n) for n in dns_names]
        generation, leaf = self._sign(spiffe_id, public_key, ttl, dns, list(ip_addresses))
        with self.store.write() as conn:
            self._check_not_revoked(conn, spiffe_id)
            self._record(conn, generation, leaf, how)
        return IssuedSvid(spiffe_id, (leaf,), self.bundle())

    # -- join tokens --

    def create_token(
        self,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta = DEFAULT_TOKEN_TTL,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[IpAddress] = (),
    ) -> str:
        check_not_reserved(spiffe_id.require_workload())
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

    def _usable_token(self, conn: sqlite3.Connection, digest: str) -> tuple[str, str, str]:
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

    def commit(self, prepared: Prepared) -> IssuedSvid:
        """Record a prepared issuance, checking again what may have changed meanwhile.

        Signing happens before, outside the transaction, so that concurrent
        workers do not hold the database's one write lock while they compute.
        """
        now = self._now().timestamp()
        with self.store.write() as conn:
            if prepared.token_digest is not None:
                row = self._usable_token(conn, prepared.token_digest)
                if row[0] != str(prepared.spiffe_id):  # pragma: no cover - hashes do not move
                    raise TokenRejected("join token changed", reason="token_unknown")
                conn.execute(
                    "UPDATE tokens SET used_at = ? WHERE hash = ?", (now, prepared.token_digest)
                )
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
            self._check_not_revoked(conn, prepared.spiffe_id)
            self._record(conn, prepared.generation, prepared.leaf, prepared.how)
        return IssuedSvid(prepared.spiffe_id, (prepared.leaf,), self.bundle())

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

    # -- renewal and the feed --

    def renew(self, caller: x509.Certificate, csr_data: bytes) -> IssuedSvid:
        """A fresh SVID for the holder of a current one; same identity, same granted SANs.

        The caller's certificate was verified by TLS; it is checked again here
        (profile, time, chain to our bundle) and must be one this authority
        recorded issuing, so a certificate minted with a stolen root key
        elsewhere does not renew.
        """
        return self.commit(self.prepare_renew(caller, csr_data))

    def prepare_renew(self, caller: x509.Certificate, csr_data: bytes) -> Prepared:
        sid = self._verified_caller(caller)
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
        check_not_reserved(sid)
        generation, leaf = self._sign(sid, public_key, None, dns, ips)
        return Prepared(sid, generation, leaf, "renew", caller_serial=f"{caller.serial_number:x}")

    def _verified_caller(self, caller: x509.Certificate) -> SpiffeId:
        """verify_svid, remembered per certificate and bundle: a sidecar renewing over
        a kept-alive connection presents the same certificate every time."""
        bundle = self.bundle()
        now = self._now()
        fingerprint = caller.fingerprint(hashes.SHA256())
        known = self._verified.get(fingerprint)
        if known is not None and known[1] == bundle.sequence:
            check_validity(caller, now, f"{known[0]} certificate")
            return known[0]
        sid = verify_svid([caller], bundle.roots, now).spiffe_id
        if len(self._verified) >= 4096:
            self._verified.clear()
        self._verified[fingerprint] = (sid, bundle.sequence)
        return sid

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
        return {
            "policy_version": policy_version,
            "revocation_version": revocation_version,
            "bundle_sequence": bundle.sequence,
            "pairs": [[src, dst] for src, dst in pairs],
            "revoked": [r for (r,) in revoked],
            "bundle": bundle.to_pem().decode(),
        }

    # -- root rollover --

    def rotate(self, propagation: timedelta, *, wait_for_acks: bool = True) -> tuple[int, datetime]:
        """Publish a next root now; it starts signing after `propagation`.

        Sidecars learn the new root from the bundle feed before any SVID it
        signs exists, so no peer ever sees a certificate it cannot verify.
        """
        now = self._now()
        with self.store.read() as conn:
            pending = conn.execute("SELECT generation FROM roots WHERE state = 'next'").fetchone()
            root_ttl = timedelta(seconds=int(Store.setting(conn, "root_ttl")))
            last = conn.execute("SELECT MAX(generation) FROM roots").fetchone()
            protection = self._new_key_protection(conn)
        if pending is not None:
            raise PolicyError(
                f"root {pending[0]} is already waiting to take over; a rollover is in progress",
                reason="rotation_in_progress",
            )
        generation = int(last[0]) + 1
        key = generate_key()
        root = build_root(
            self.trust_domain,
            key,
            not_before=now - timedelta(minutes=5),
            not_after=now + root_ttl,
            generation=generation,
        )
        key_file = f"keys/root-{generation}.key"
        path = self.state_dir / key_file
        try:
            path.unlink(missing_ok=True)  # an orphan of a rotation whose commit failed
            _write_private(path, key_to_pem(key, protection))
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise StorageUnavailable(f"cannot write root key {key_file}: {exc.strerror}") from None
        activate_at = now + propagation
        try:
            self._publish_root(generation, root, key_file, now, activate_at, wait_for_acks)
        except BaseException:
            path.unlink(missing_ok=True)  # the database does not know this key: drop it
            raise
        self._signer_checked = None  # a zero propagation delay takes effect at once
        self._bundle_checked = 0.0
        self.write_bundle_file()
        return generation, activate_at

    def _publish_root(
        self,
        generation: int,
        root: x509.Certificate,
        key_file: str,
        now: datetime,
        activate_at: datetime,
        wait_for_acks: bool,
    ) -> None:
        with self.store.write() as conn:
            sequence = Store.bump(conn, "bundle_sequence")
            conn.execute(
                "INSERT INTO roots (generation, cert_pem, key_file, state, not_after, created_at, "
                "activate_at, published_sequence, wait_for_acks) "
                "VALUES (?, ?, ?, 'next', ?, ?, ?, ?, ?)",
                (
                    generation,
                    certs_to_pem([root]).decode(),
                    key_file,
                    root.not_valid_after_utc.timestamp(),
                    now.timestamp(),
                    activate_at.timestamp(),
                    sequence,
                    1 if wait_for_acks else 0,
                ),
            )
            self.store.audit(
                conn,
                now.timestamp(),
                "root_published",
                generation=generation,
                root_serial=f"{root.serial_number:x}",
                activate_at=activate_at.isoformat(),
                bundle_sequence=sequence,
            )

    def advance_roots(self) -> bool:
        """Activate a next root whose time has come; retire roots whose last SVID expired.

        Returns True when the bundle changed. Cheap when there is nothing to do.
        """
        now = self._now().timestamp()
        with self.store.read() as conn:
            due = conn.execute(
                "SELECT generation, published_sequence, wait_for_acks FROM roots "
                "WHERE state = 'next' AND activate_at <= ?",
                (now,),
            ).fetchone()
            if due is not None and due[2] and self._lagging(conn, int(due[1] or 0), now):
                due = None  # a live sidecar has not confirmed the new bundle yet
            if due is not None and self._key_problem(conn, int(due[0])) is not None:
                due = None  # the old root keeps signing; `meshid ca status` says why
            retiring = conn.execute(
                "SELECT r.generation FROM roots r WHERE r.state = 'retiring' AND "
                "COALESCE((SELECT MAX(not_after) FROM svids s WHERE s.generation = r.generation),"
                " 0) <= ?",
                (now,),
            ).fetchall()
        if due is None and not retiring:
            return False
        self._signer_checked = None  # the active root may change here
        self._bundle_checked = 0.0
        changed = False
        with self.store.write() as conn:
            if due is not None:
                old = conn.execute("SELECT generation FROM roots WHERE state = 'active'").fetchone()
                conn.execute(
                    "UPDATE roots SET state = 'retiring' WHERE state = 'active'",
                )
                updated = conn.execute(
                    "UPDATE roots SET state = 'active' WHERE generation = ? AND state = 'next'",
                    (due[0],),
                ).rowcount
                if updated:
                    self.store.audit(
                        conn,
                        now,
                        "root_activated",
                        generation=int(due[0]),
                        previous=int(old[0]) if old else None,
                    )
            for (generation,) in retiring:
                updated = conn.execute(
                    "UPDATE roots SET state = 'retired' WHERE generation = ? "
                    "AND state = 'retiring' AND COALESCE("
                    "(SELECT MAX(not_after) FROM svids WHERE generation = ?), 0) <= ?",
                    (generation, generation, now),
                ).rowcount
                if updated:
                    sequence = Store.bump(conn, "bundle_sequence")
                    self.store.audit(
                        conn, now, "root_retired", generation=generation, bundle_sequence=sequence
                    )
                    changed = True
        if changed:
            self.write_bundle_file()
        return changed

    # -- what sidecars report --

    @staticmethod
    def _lagging(conn: sqlite3.Connection, sequence: int, now: float) -> list[str]:
        """Live sidecars whose last report holds a bundle older than `sequence`.

        A stored report that no longer parses counts as lagging: a rollover
        waits rather than assume what it cannot read.
        """
        rows = conn.execute(
            "SELECT instance, spiffe_id, report FROM reports WHERE seen_at >= ? "
            "ORDER BY spiffe_id, instance",
            (now - REPORT_FRESH.total_seconds(),),
        ).fetchall()
        lagging = []
        for instance, sid, text in rows:
            try:
                held = parse_report(json.loads(text)).bundle_sequence
            except (MeshIdError, ValueError, TypeError, RecursionError):
                held = -1
            if held < sequence:
                lagging.append(f"{printable(str(sid))} ({printable(str(instance))})")
        return lagging

    def rotation_status(self) -> tuple[int, list[str]] | None:
        """(generation, sidecars not yet holding it) for a root waiting to activate."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation, published_sequence FROM roots WHERE state = 'next'"
            ).fetchone()
            if row is None:
                return None
            return int(row[0]), self._lagging(conn, int(row[1] or 0), self._now().timestamp())

    # -- the root's own lifetime (the schedule is ca/rootlife.py) --

    def root_lifecycle(self) -> tuple[ActiveRoot, PendingRoot | None]:
        """The active root's life, and the root waiting to take over, if any."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT generation, created_at, not_after FROM roots WHERE state = 'active'"
            ).fetchone()
            nxt = conn.execute(
                "SELECT generation, activate_at, created_at, wait_for_acks FROM roots "
                "WHERE state = 'next'"
            ).fetchone()
        if row is None:
            raise StateError("the authority has no active root; its database is damaged")
        active = ActiveRoot(
            int(row[0]), datetime.fromtimestamp(row[1], UTC), datetime.fromtimestamp(row[2], UTC)
        )
        if nxt is None:
            return active, None
        at = nxt[1] if nxt[1] is not None else nxt[2]
        return active, PendingRoot(int(nxt[0]), datetime.fromtimestamp(at, UTC), bool(nxt[3]))

    def rotate_unless_pending(
        self, propagation: timedelta, *, wait_for_acks: bool
    ) -> tuple[int, datetime] | None:
        """`rotate`, unless a next root is already published (then None).

        Several server workers may decide to rotate in the same second: under
        `rotation_lock` one of them does it and the others see it done.
        """
        with self.rotation_lock():
            with self.store.read() as conn:
                pending = conn.execute("SELECT 1 FROM roots WHERE state = 'next'").fetchone()
            if pending is not None:
                return None
            return self.rotate(propagation, wait_for_acks=wait_for_acks)

    @contextmanager
    def rotation_lock(self) -> Iterator[None]:
        """Held around `rotate`: two rotations at once would pick the same generation
        and one would overwrite the other's key file."""
        with open(self.state_dir / ".rotate.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def release_next_root(self, reason: str) -> int | None:
        """Let the waiting root activate now, whether or not every sidecar confirmed it.

        For when the active root is about to expire: past that, no SVID it
        signed verifies anywhere, so waiting for a laggard helps nobody.
        """
        now = self._now().timestamp()
        with self.store.write() as conn:
            row = conn.execute("SELECT generation FROM roots WHERE state = 'next'").fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE roots SET wait_for_acks = 0, "
                "activate_at = MIN(COALESCE(activate_at, ?), ?) WHERE state = 'next'",
                (now, now),
            )
            self.store.audit(conn, now, "root_released", generation=int(row[0]), reason=reason)
        self._signer_checked = None
        return int(row[0])

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
                "ORDER BY instance = ? DESC, seen_at DESC, rowid DESC LIMIT ?)",
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

    def write_bundle_file(self) -> None:
        with contextlib.suppress(OSError):
            write_atomic(self.state_dir / BUNDLE_FILE, self.bundle().to_pem())
