"""The control plane's HTTP API as plain functions: a request in, a JSON reply out.

No sockets here. The trio shell (`ca.server`) parses HTTP with h11, does TLS,
and calls `ControlApi.handle` in a worker thread (the authority talks to
SQLite, which may wait on a lock held by a CLI command). The long poll of
`/v1/watch` is split: `watch_check` here decides whether to answer now,
the shell does the waiting.

Endpoints (all JSON; errors are ``{"error": reason, "message": text}``); the
messages, their versions and their paths are `meshid.wire`'s:

    POST /v1/enroll   EnrollRequest     -> SvidReply   (no client cert)
    POST /v1/renew    RenewRequest      -> SvidReply   (mTLS, current SVID)
    POST /v1/report   StatusReport      -> ReportAck   (mTLS): sidecar status
    GET  /v1/bundle                     -> SPIFFE bundle (JWKS), JWT keys included
    POST /v1/jwt-svid JwtSvidRequest    -> JwtSvidReply (mTLS): a JWT-SVID for the caller
    GET  /v1/watch?WatchQuery           -> Feed        (mTLS): the caller's feed
    GET  /healthz
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from cryptography import x509

from ca import jwtmint
from ca.authority import Authority, IssuedSvid, Prepared
from ca.feedindex import encode_members
from ca.jwtkeys import JwtKeyring, with_jwt_keys
from meshid.bundle import TrustBundle
from meshid.errors import (
    AuthorityError,
    CsrRejected,
    IdentityRevoked,
    InvalidInput,
    InvalidSvid,
    MeshIdError,
    RateLimited,
    StateError,
    StorageUnavailable,
    TokenRejected,
)
from meshid.ratelimit import FailureLimiter, OncePerWindow, TokenBucket
from meshid.reasons import Reason
from meshid.report import TOO_LARGE, decode_report
from meshid.skew import clock_offset
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_to_pem
from meshid.version import VERSION
from meshid.wire import (
    BUNDLE,
    ENROLL,
    HEALTH,
    JWT_SVID,
    RENEW,
    REPORT,
    WATCH,
    WIRE_VERSION,
    EnrollRequest,
    ErrorBody,
    JwtSvidRequest,
    RenewRequest,
    ReportAck,
    SvidReply,
    WatchQuery,
    decode,
)

MAX_BODY = 64 * 1024
# A caller refused on the management routes is audited once per this many seconds
# (per serving process); the row counts the refusals left out since the last one.
REFUSAL_AUDIT_WINDOW = 60.0
# A change of the addresses a workload's reports advertise is taken at most once per
# this many seconds per identity (per serving process): each moves the policy version,
# which wakes every watch of the fleet, and writes an audit row. The rest wait.
ADVERTISE_CHANGE_INTERVAL = 30.0
STORAGE_RETRY_AFTER = 5  # seconds a client waits after a full or read-only disk
# Renewals allowed per SPIFFE ID per SVID lifetime, in a burst or spread out (a token
# bucket in the database, shared by every worker and instance): replicas share an
# identity, and each renews about twice per lifetime (at 40-60 % of it), once more when
# a root rollover shortens its SVID, and again after a lost reply. 1,024 covers 256
# replicas (the per-identity watch budget) at four renewals each; a workload renewing in
# a loop is held to that pace.
RENEWALS_PER_IDENTITY = 1024
# What a feed starts with, and those bytes (a reply is spliced: see `ca.feedindex`)
FEED_HEAD: dict[str, object] = {"v": WIRE_VERSION}
FEED_HEAD_JSON = encode_members(FEED_HEAD)
# Callers remembered as not revoked at a revocation version (see `ControlApi._caller`):
# one entry per sidecar certificate, forgotten all at once past this many.
CLEAN_CALLERS = 65536


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes
    source: str  # the client's IP address, for rate limiting and the audit
    peer_cert: x509.Certificate | None = None
    # When the request began to arrive (wall clock): with the time it is handled, the
    # window a sidecar's clock reading is judged against (see `meshid.skew`).
    received: datetime | None = None
    # The SPIFFE ID `peer_cert` names, read once per connection (None: no certificate,
    # or no ID in it); not yet verified: `ControlApi._caller` does that.
    peer_id: SpiffeId | None = None
    peer_fingerprint: bytes | None = None  # SHA-256 of `peer_cert`, also once per connection


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    # `body` already encoded, when it was spliced from parts encoded once (a feed: see
    # `ca.feedindex`); `body` still says the same, for whatever looks into the reply.
    raw: bytes | None = None
    # A streamed answer (a watch with stream=1, ca.dispatch): the shell sends the
    # head, runs this with a function that sends one line, then ends the reply.
    stream: Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]] | None = None

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw + b"\n"
        return json.dumps(self.body, separators=(",", ":")).encode() + b"\n"


# a request on its way to phase two: what it signed (if anything), the bundle it holds
_Staged = tuple[Request, Prepared | None, int | None]


def error(status: int, reason: str, message: str, **headers: str) -> Reply:
    return Reply(
        status,
        ErrorBody(reason, message).to_json(),
        tuple((k.replace("_", "-"), v) for k, v in headers.items()),
    )


def _status_for(exc: MeshIdError) -> int:
    if isinstance(exc, StorageUnavailable):
        return 503
    if exc.reason == TOO_LARGE:
        return 413
    if isinstance(exc, TokenRejected):
        return 401
    if isinstance(exc, IdentityRevoked):
        return 403
    if isinstance(exc, CsrRejected):
        return 403 if exc.reason == Reason.CSR_IDENTITY_MISMATCH else 400
    if isinstance(exc, InvalidInput | InvalidSvid):
        return 400
    if isinstance(exc, StateError):
        return 503
    if isinstance(exc, AuthorityError):
        return 403
    return 400


class CallerRevoked(IdentityRevoked):
    """The caller itself is revoked; the reply says under which revocation version.

    The feed is refused to a revoked caller, so this reply is all its sidecar
    hears of the revocation: with the version, the revoked sidecar says the
    same "revocation version N" as everyone else, not the last one it saw.

    `serial` is set when the identity is not revoked but the very SVID the
    caller presented is (`ca revoke --serial`): the reply names it, so that its
    holder can tell "this certificate is revoked, enroll again" from "this
    workload is revoked". The reason is the same either way, as peers log it.
    """

    def __init__(self, message: str, *, revocation_version: int, serial: int | None = None) -> None:
        super().__init__(message)
        self.revocation_version = revocation_version
        self.serial = serial


def error_for(exc: MeshIdError) -> Reply:
    """The reply for one of our errors; a storage fault says when to try again."""
    if isinstance(exc, StorageUnavailable):
        return error(503, exc.reason, exc.message, retry_after=str(STORAGE_RETRY_AFTER))
    if isinstance(exc, RateLimited):
        return error(
            429, exc.reason, exc.message, retry_after=str(max(1, math.ceil(exc.retry_after)))
        )
    reply = error(_status_for(exc), exc.reason, exc.message)
    if isinstance(exc, CallerRevoked):
        reply.body["revocation_version"] = exc.revocation_version
        if exc.serial is not None:
            reply.body["revoked_serial"] = f"{exc.serial:x}"
    return reply


def svid_reply(
    issued: IssuedSvid, held_sequence: int | None = None, bundle_pem: str | None = None
) -> Reply:
    """The new SVID; the bundle too unless the caller says it holds this very sequence."""
    leaf = issued.leaf
    sequence = issued.bundle.sequence
    reply = SvidReply(
        spiffe_id=issued.spiffe_id,
        svid=certs_to_pem(issued.chain).decode(),
        serial=f"{leaf.serial_number:x}",
        not_after=leaf.not_valid_after_utc.isoformat(),
        bundle_sequence=sequence,
        bundle=None if held_sequence == sequence else bundle_pem or issued.bundle.to_pem().decode(),
    )
    return Reply(200, reply.to_json())


@dataclass(slots=True)
class ControlApi:
    authority: Authority
    clock: Callable[[], datetime]
    monotonic: Callable[[], float]
    limiter: FailureLimiter = field(default_factory=FailureLimiter)
    # which refused management callers to audit (see `ca.adminapi`)
    refusals: OncePerWindow = field(default_factory=lambda: OncePerWindow(REFUSAL_AUDIT_WINDOW))
    # which callers changed the addresses they advertise lately (see `_report`)
    advertising: OncePerWindow = field(
        default_factory=lambda: OncePerWindow(ADVERTISE_CHANGE_INTERVAL)
    )
    # how often each identity may renew (see RENEWALS_PER_IDENTITY); None: no limit
    renewals: TokenBucket | None = None
    _lock_fd: int | None = None
    _pem: tuple[TrustBundle, str] | None = None  # the bundle last encoded, and its PEM
    # certificate serial -> (its identity, the revocation version at which neither was
    # revoked): a watch parked right after its feed, at that version, needs no lookup
    _clean: dict[int, tuple[SpiffeId, int]] = field(default_factory=dict)
    jwt_keys: JwtKeyring | None = None  # JWT-SVID signing keys, loaded on first use

    def handle(self, req: Request) -> Reply:
        """Answer one request; never raises for anything a client can send."""
        routes: dict[tuple[str, str], Callable[[Request], Reply]] = {
            ("POST", ENROLL): self._enroll,
            ("POST", RENEW): self._renew,
            ("GET", BUNDLE): self._bundle,
            ("GET", WATCH): self._watch_now,
            ("POST", REPORT): self._report,
            ("GET", HEALTH): self._health,
            ("POST", JWT_SVID): self._jwt_svid,
        }
        from ca.adminapi import ADMIN_ROUTES  # it builds on this module

        for key, admin in ADMIN_ROUTES.items():
            routes[key] = partial(admin, self)
        handler = routes.get((req.method, req.path))
        if handler is None:
            if any(path == req.path for _, path in routes):
                return error(405, Reason.METHOD_NOT_ALLOWED, f"{req.method} is not allowed here")
            return error(404, Reason.NOT_FOUND, "no such endpoint")
        try:
            return handler(req)
        except MeshIdError as exc:
            return error_for(exc)

    def handle_each(self, requests: list[Request]) -> list[Reply]:
        """Several reading requests (the feeds of watches woken together), one by one, in
        one read transaction: each reads several things (the caller's revocation, the
        versions, its pairs), and a transaction apiece was a tenth of the authority's CPU
        when a change woke ten thousand watches."""
        with self.authority.store.read():
            current = self.authority.versions()  # before any caller is looked up
            return [self._feed(req, current) for req in requests]

    def _feed(self, req: Request, current: tuple[int, int, int]) -> Reply:
        """`handle`, a watch's feed read against `current` (this transaction's versions)."""
        if (req.method, req.path) != ("GET", WATCH):
            return self.handle(req)
        try:
            return self._watch_now(req, current)
        except MeshIdError as exc:
            return error_for(exc)

    def watch_check_each(
        self, requests: list[Request]
    ) -> list[tuple[Reply | None, tuple[int, int, int]]]:
        """Several watches parked again together (after a change), the versions read once:
        a change committed meanwhile is the poller's to see, and it wakes them."""
        with self.authority.store.read():  # one snapshot, as `handle_each`
            current = self.authority.versions()
            return [self.watch_check(req, current) for req in requests]

    def handle_batch(self, requests: list[Request]) -> list[Reply]:
        """Several writing requests, their writes in one database transaction.

        Two phases: everything costly (checking CSRs and callers, signing) runs
        first, outside any transaction, so that several workers sign in
        parallel; then one transaction records them all with one fsync (see
        `Store.batch`), each request in its own savepoint.

        When the host cannot write (disk full, read-only), the whole batch is
        rolled back and every request that reached phase two is answered 503
        with Retry-After: none of their writes landed, whatever phase two said.
        """
        staged = [self._guarded(self._stage, req) for req in requests]
        try:
            with self._writer_turn(), self.authority.store.batch():
                return [
                    item if isinstance(item, Reply) else self._guarded(self._finish, item)
                    for item in staged
                ]
        except StorageUnavailable as exc:
            return [item if isinstance(item, Reply) else error_for(exc) for item in staged]

    def _bundle_pem(self, bundle: TrustBundle) -> str:
        if self._pem is None or self._pem[0] is not bundle:
            self._pem = (bundle, bundle.to_pem().decode())
        return self._pem[1]

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """Take turns with the other workers before asking SQLite for its write lock.

        SQLite makes a writer that finds the lock taken sleep and poll (1 ms,
        then longer); with several workers committing batches back to back that
        polling, not the work, set the pace. A blocking flock wakes the next
        worker the moment the previous one lets go.
        """
        if self._lock_fd is None:
            path = self.authority.state_dir / ".writer.lock"
            try:
                self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:  # a read-only or full state directory
                raise StorageUnavailable(f"cannot open {path.name}: {exc.strerror}") from None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @staticmethod
    def _guarded(step: Callable[[Any], Any], arg: Any) -> Any:
        try:
            return step(arg)
        except MeshIdError as exc:
            return error_for(exc)
        except Exception as exc:  # a bug must cost one request, not the batch
            return error(500, Reason.INTERNAL_ERROR, type(exc).__name__)

    def _stage(self, req: Request) -> Reply | _Staged:
        """Phase one: a reply already, or what phase two must record."""
        if req.method == "POST" and req.path == ENROLL:
            return self._stage_enroll(req)
        if req.method == "POST" and req.path == RENEW:
            return self._prepare_renew(req)
        return req, None, None  # not a signature: handled whole in phase two

    def _finish(self, staged: _Staged) -> Reply:
        req, prepared, held = staged
        if prepared is None:
            return self.handle(req)
        try:
            issued = self.authority.commit(prepared, self.renewals)
            return svid_reply(issued, held, self._bundle_pem(issued.bundle))
        except TokenRejected:
            if prepared.token_digest is not None or prepared.attested is not None:
                self.limiter.failed(req.source, self.monotonic())
            raise

    # -- endpoints --

    def _stage_enroll(self, req: Request) -> Reply | _Staged:
        now = self.monotonic()
        wait = self.limiter.blocked(req.source, now)
        if wait:
            return error(
                429,
                Reason.RATE_LIMITED,
                f"too many failed enrollments from {req.source}; retry in {wait:.0f}s",
                retry_after=str(max(1, round(wait))),
            )
        try:
            body = EnrollRequest.parse(decode(req.body, "request body"))
            if body.jwt is not None:
                prepared = self.authority.prepare_enroll_jwt(body.jwt, body.csr.encode())
            else:
                prepared = self.authority.prepare_enroll(body.token, body.csr.encode())
            return req, prepared, None
        except (TokenRejected, CsrRejected, InvalidInput) as exc:
            self.limiter.failed(req.source, now)
            raise exc from None

    def _enroll(self, req: Request) -> Reply:
        staged = self._stage_enroll(req)
        return staged if isinstance(staged, Reply) else self._finish(staged)

    def _prepare_renew(self, req: Request) -> _Staged:
        # A revoked SVID must not renew into a fresh one (that would launder the
        # revocation), nor one past its budget; the commit checks both again, in the
        # transaction that records it (and spends the budget).
        caller = self._caller(req)
        assert req.peer_cert is not None  # `_caller` refused a call without one
        if self.renewals is not None:  # a caller past its budget costs a lookup, no signature
            wait = self.authority.renewal_wait(caller, self.renewals)
            if wait:
                raise RateLimited(
                    f"{caller} renewed too often; retry in {math.ceil(wait)}s", retry_after=wait
                )
        body = RenewRequest.parse(decode(req.body, "request body"))
        try:
            prepared = self.authority.prepare_renew(req.peer_cert, body.csr.encode())
        except InvalidSvid as exc:
            raise TokenRejected(
                f"client certificate refused: {exc.message}", reason=exc.reason
            ) from None
        return req, prepared, body.bundle_sequence

    def _renew(self, req: Request) -> Reply:
        return self._finish(self._prepare_renew(req))

    def _report(self, req: Request) -> Reply:
        """A sidecar's status: what `meshid ca status`, `--dry-run` and rollovers rely on.

        The whole document is checked here (`meshid.report`), before anything
        is stored; the identity it is kept under is the client certificate's.
        """
        caller = self._caller(req)
        report = decode_report(req.body)
        skew = None
        if report.sent_at is not None:
            now = self.clock()
            earliest = min(req.received or now, now)
            skew = clock_offset(report.sent_at, earliest, now).total_seconds()
        self.authority.record_report(caller, report, skew=skew)
        # A change of the map wakes the fleet and is audited: one per caller per interval.
        # A report within it is stored all the same, and the next one after it is taken.
        key, at = str(caller), self.monotonic()
        if not self.advertising.recent(key, at) and self.authority.record_advertised(caller):
            self.advertising.admit(key, at)
        return Reply(200, ReportAck().to_json())

    def _bundle(self, req: Request) -> Reply:
        self.authority.advance_roots()
        keyring = self._published_keyring()
        doc = with_jwt_keys(
            self.authority.bundle().to_spiffe(), keyring, self.authority.shared_jwt_keys()
        )
        return Reply(200, doc)

    def _keyring(self) -> JwtKeyring:
        if self.jwt_keys is None:
            self.jwt_keys = JwtKeyring(self.authority.state_dir, self.clock)
        return self.jwt_keys

    def _published_keyring(self) -> JwtKeyring:
        """The keyring, its public keys in the database (a key is there before it signs)."""
        keyring = self._keyring()
        self.authority.publish_jwt_keys(keyring.bundle_entries())
        return keyring

    def _jwt_svid(self, req: Request) -> Reply:
        body = JwtSvidRequest.parse(decode(req.body, "request body"))
        reply = jwtmint.mint(self._caller(req), body, self._published_keyring(), self.clock())
        return Reply(200, reply.to_json())

    def _health(self, req: Request) -> Reply:
        policy, revocation, sequence = self.authority.versions()
        return Reply(
            200,
            {
                "status": "ok",
                "version": VERSION,
                "trust_domain": self.authority.trust_domain.name,
                "policy_version": policy,
                "revocation_version": revocation,
                "bundle_sequence": sequence,
                "time": self.clock().isoformat(),  # for `meshid doctor --config`'s clock check
            },
        )

    def _watch_now(self, req: Request, current: tuple[int, int, int] | None = None) -> Reply:
        """The feed, answered at once (the shell waits first when nothing changed).

        `current`: the versions, read in this transaction before the caller is looked up.
        """
        caller = self._caller(req, current)
        query = WatchQuery.parse(req.query)
        since = query.policy_version if query.delta else None
        # The rows straight into the reply: a `Feed` in between would hold a large
        # allow-list twice more (tests/ca/test_ca_feed_delta.py checks it parses).
        index, own = self.authority.feed_parts(caller, since=since, versions=current)
        return Reply(
            200, {**FEED_HEAD, **index.shared, **own}, raw=index.encode(FEED_HEAD_JSON, own)
        )

    # -- helpers the shell uses --

    def _caller(self, req: Request, current: tuple[int, int, int] | None = None) -> SpiffeId:
        """The authenticated caller: a current SVID of ours, neither its identity nor this
        very certificate (its serial) revoked.

        `current`: the versions, read in this transaction before the call. A caller
        found not revoked at a revocation version is not looked up again at that
        version: after a change every sidecar reads its feed and parks its next watch
        at once, and each asked the database the same question twice. Every
        revocation moves the version, so a revoked caller is always looked up.
        """
        if req.peer_cert is None:
            raise TokenRejected(
                "this endpoint needs a client certificate (the caller's SVID)",
                reason=Reason.NO_CLIENT_CERTIFICATE,
            )
        try:
            sequence = None if current is None else current[2]
            caller = self.authority.verified_caller(
                req.peer_cert, sequence, fingerprint=req.peer_fingerprint
            )
        except InvalidSvid as exc:
            raise TokenRejected(
                f"client certificate refused: {exc.message}", reason=exc.reason
            ) from None
        if caller.trust_domain != self.authority.trust_domain:
            raise TokenRejected(
                "caller is of another trust domain", reason=Reason.UNTRUSTED_TRUST_DOMAIN
            )
        # One lookup, not the whole allow-list: every authenticated request asks.
        serial = req.peer_cert.serial_number
        if current is not None and self._clean.get(serial) == (caller, current[1]):
            return caller
        revoked_at = self.authority.revocation(caller, serial)
        if revoked_at is None:
            if current is not None:
                if len(self._clean) >= CLEAN_CALLERS:
                    self._clean.clear()
                self._clean[serial] = (caller, current[1])
            return caller
        if self.authority.revocation(caller) is not None:  # asked on a refusal only
            raise CallerRevoked(f"{caller} is revoked", revocation_version=revoked_at)
        raise CallerRevoked(
            f"{caller}: SVID {serial:x} is revoked (the identity is not)",
            revocation_version=revoked_at,
            serial=serial,
        )

    def watch_check(
        self, req: Request, current: tuple[int, int, int] | None = None
    ) -> tuple[Reply | None, tuple[int, int, int]]:
        """Authenticate a watch; answer now (a Reply) if the caller is behind or wrong.

        Returns the current versions (`current`, if the caller read them) so the
        shell can wait for them to move.
        """
        if current is None:
            current = self.authority.versions()
        try:
            self._caller(req, current)
            seen = WatchQuery.parse(req.query).versions
        except MeshIdError as exc:
            return error_for(exc), (0, 0, 0)
        if seen != current:
            return self._feed(req, current), current
        return None, current
