"""Dynamic identity: enroll once with a join token, then renew and follow the feed forever.

Theory of operation:

- `state_dir` holds what survives a restart: ``svid.key`` (0600, the key and
  its chain), ``svid.pem``, ``bundle.pem`` (the newest bundle heard, which may
  hold roots the configured bootstrap bundle lacks) and ``feed.json`` (the
  last allow-list and revocations). A restart with a valid SVID needs neither
  a token nor the control plane; it serves with the last policy it knew.
- What arrives is installed in memory first and written to `state_dir`
  second (`sidecar.statedir`): a full or read-only disk is logged, counted,
  shown in /readyz and retried, and never stops a new SVID, bundle or deny
  from taking effect, nor ends the process.
- The renewer sleeps until half the SVID's lifetime (±10 %), then sends a
  CSR for a brand-new key over mTLS with the current SVID. A failure is
  retried with capped exponential backoff while the current SVID keeps
  serving; every failure is logged with the seconds left, and an expired SVID
  is called out with what the operator must do.
- The watcher long-polls the feed with the versions it holds; the control
  plane answers when one moves. A new allow-list or revocation is installed
  at once (live connections it now denies are closed); a new bundle becomes
  a new credential generation with the same SVID, so rolled-in roots are
  trusted before anything is signed by them.
- Failures are judged by `sidecar.failures`. Before enrollment a permanent
  one (plain HTTP at the authority's address, another trust domain, a bundle
  the authority's certificate does not chain to, a refused token) ends the
  sidecar with its one-line message; a transient one is retried with backoff,
  each attempt shown in /readyz. Once serving, nothing ends the sidecar: a
  permanent failure of renewal, watch or report is logged, shown in /readyz
  and retried every `Pacing.slow_retry` (±10 %) instead of at full rate, and
  so is the authority refusing a revoked identity; the first success clears it.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshid.bundle import TrustBundle
from meshid.errors import ConfigError, InvalidSvid, MeshIdError
from meshid.events import EventLog
from meshid.policy import Policy
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_from_pem, generate_key
from meshid.wire import (
    ENROLL,
    RENEW,
    REPORT,
    WIRE_VERSION,
    EnrollRequest,
    Feed,
    RenewRequest,
    SvidReply,
    WatchQuery,
    WireError,
)
from sidecar import failures as failures_mod
from sidecar.config import AuthoritySource
from sidecar.control import ClientIdentity, ControlClient, ControlPlaneError, HeldIdentity
from sidecar.credentials import Svid
from sidecar.lifecycle import ENROLLING, Lifecycle
from sidecar.schedule import EXPIRED, Schedule
from sidecar.statedir import (
    BUNDLE,
    BUNDLE_FILE,
    FEED,
    IDENTITY,
    INTERNAL_ERROR,
    KEY_FILE,
    SVID_FILE,
    StateDir,
    identity_pem,
)

WATCH_WAIT = 25.0
REPORT_INTERVAL = 10.0
REPORT_MIN_INTERVAL = 1.0
STATE_RETRY_MAX = 30.0  # seconds between two attempts to write a pending state file
SLOW_RETRY = 60.0  # seconds between attempts after a permanent failure, or while revoked
WATCH_RETRY_MAX = 10.0
IDENTITY_REVOKED = "identity_revoked"
DUTY_RENEW, DUTY_WATCH, DUTY_REPORT = "renew", "watch", "report"  # as /readyz names them


@dataclass(frozen=True, slots=True)
class Pacing:
    """How fast the control-plane duties retry; injected, so a test need not wait a minute."""

    schedule: Schedule = field(default_factory=Schedule)
    slow_retry: float = SLOW_RETRY
    watch_retry_max: float = WATCH_RETRY_MAX

    def slow(self, rand: float) -> float:
        """The pause after a permanent failure: `slow_retry` ±10 %, so a fleet spreads out."""
        return self.slow_retry * (0.9 + 0.2 * rand)


def permanent(exc: BaseException) -> bool:
    """Whether retrying at full rate is futile (see `sidecar.failures`)."""
    if isinstance(exc, ControlPlaneError):
        return exc.permanent or exc.refused
    return isinstance(exc, MeshIdError) and exc.reason == IDENTITY_REVOKED


class Host(Protocol):
    """What the identity needs from the sidecar it serves."""

    identity: SpiffeId
    events: EventLog
    lifecycle: Lifecycle
    clock_offset: timedelta  # our clock minus the authority's, as last measured

    def wall_now(self) -> datetime: ...
    def current_svid(self) -> Svid | None: ...
    def install_svid(self, svid: Svid, how: str) -> None: ...
    def install_policy(self, policy: Policy) -> int: ...
    def count_renewal(self, result: str) -> None: ...
    def status_report(self) -> dict[str, Any]: ...
    def current_policy(self) -> Policy: ...


def build_csr(key: Any, spiffe_id: SpiffeId) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


async def renewal_loop(
    schedule: Schedule,
    current: Callable[[], tuple[datetime, datetime] | None],
    renew: Callable[[], Awaitable[None]],
    wall: Callable[[], datetime],
    on_failure: Callable[[MeshIdError, int, float, float], None],
    rand: Callable[[], float] = random.random,
    slow: Callable[[float], float] | None = None,
) -> None:
    """Renew on schedule forever; `on_failure(exc, failures, left, retry_in)`.

    `current()` is the SVID's validity (NotBefore, NotAfter) on the local clock.
    After a permanent failure (`permanent`), the next attempt waits `slow(rand)`
    when given, rather than the backoff.
    """
    failures = 0
    last_permanent = False
    while True:
        validity = current()
        if validity is None:
            raise ConfigError("no SVID to renew")
        not_before, not_after = validity
        left = (not_after - wall()).total_seconds()
        if failures == 0:
            delay = schedule.renew_delay(not_before, not_after, wall(), rand())
        elif last_permanent and slow is not None:
            delay = slow(rand())
        else:
            delay = schedule.retry_delay(failures, left, rand())
        await trio.sleep(delay)
        try:
            await renew()
        except Exception as exc:  # one failed attempt, never the end of the renewer
            failures += 1
            last_permanent = permanent(exc)
            left = (not_after - wall()).total_seconds()
            retry_in = (
                slow(0.5)
                if last_permanent and slow is not None
                else schedule.retry_delay(failures, left, 0.5)
            )
            on_failure(_as_meshid(exc), failures, left, retry_in)
        else:
            failures = 0
            last_permanent = False


def _reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, MeshIdError) else INTERNAL_ERROR


def _as_meshid(exc: Exception) -> MeshIdError:
    """Our own errors as they are; anything else is a bug of ours, said without a traceback."""
    if isinstance(exc, MeshIdError):
        return exc
    return MeshIdError(f"unexpected {type(exc).__name__}: {exc}"[:300], reason=INTERNAL_ERROR)


class DynamicIdentity:
    def __init__(
        self,
        host: Host,
        source: AuthoritySource,
        *,
        client: ControlClient,
        pacing: Pacing | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.host = host
        self.source = source
        self.client = client
        self.pacing = pacing or Pacing()
        self.schedule = self.pacing.schedule
        self.rand = rand
        self.dir = source.state_dir
        self.state = StateDir(source.state_dir, host.events)
        self._feed: Feed | None = None  # the last feed applied, as feed.json holds it
        self.versions: tuple[int, int, int] = (-1, -1, -1)
        self.instance = secrets.token_hex(6)  # this run of the sidecar, as `ca status` lists it
        self._report_now = trio.Event()

    # -- files --

    def _path(self, name: str) -> Path:
        return self.dir / name

    def _client_identity(self) -> ClientIdentity | HeldIdentity:
        """The SVID in memory: the state directory's copy may lag behind it or be unreadable."""
        svid = self.host.current_svid()
        if svid is None:
            return ClientIdentity(self._path(SVID_FILE), self._path(KEY_FILE))
        return HeldIdentity(identity_pem(svid.key, svid.chain))

    async def call(self, method: str, target: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One authenticated request to the control plane (e.g. a JWT-SVID for the Workload API)."""
        return await self.client.request(
            method,
            target,
            body,
            bundle_pem=self._trust_pem(),
            now=self.host.wall_now(),
            trust=self._trust_name(),
            identity=self._client_identity(),
        )

    def _trust_pem(self) -> bytes:
        """The newest bundle known: the current credentials', the persisted one, the configured."""
        svid = self.host.current_svid()
        if svid is not None:
            return svid.bundle.to_pem()
        for path in (self._path(BUNDLE_FILE), self.source.bundle):
            try:
                return path.read_bytes()
            except OSError:
                continue
        raise ConfigError(
            f"authority.bundle: cannot read {self.source.bundle}", reason="missing_file"
        )

    def _trust_name(self) -> str:
        """What `_trust_pem` is, for a message saying the authority does not chain to it."""
        if self.host.current_svid() is not None:
            return "the trust bundle this sidecar holds (from the authority)"
        return f"authority.bundle ({self.source.bundle})"

    # What is current in memory, written to the state directory. Each of these is
    # also what a retry runs, so a retry writes what is current then, not a copy
    # of what failed.

    def _write_identity(self) -> None:
        svid = self.host.current_svid()
        if svid is not None:
            self.state.write_identity(svid.key, svid.chain, svid.bundle)

    def _write_bundle(self) -> None:
        svid = self.host.current_svid()
        if svid is not None:
            self.state.write_bundle(svid.bundle)

    def _write_feed(self) -> None:
        if self._feed is not None:
            self.state.write_feed(self._feed.to_json())

    def _restore(self) -> Svid | None:
        """The persisted SVID if it is still good; why not, in the log, otherwise."""
        if not self.state.has_identity():
            return None
        try:
            chain, key, bundle_pem = self.state.read_identity()
            bundle = TrustBundle.from_pem(
                self.host.identity.trust_domain, bundle_pem, what="persisted bundle"
            )
            return Svid.check(
                chain, key, bundle, self.host.identity, self.host.wall_now(), self._skew()
            )
        except OSError as exc:
            self.host.events.emit("restore_failed", reason="unreadable", detail=str(exc.strerror))
        except MeshIdError as exc:
            self.host.events.emit("restore_failed", reason=exc.reason, detail=exc.message)
        return None

    def _skew(self) -> timedelta:
        return self.client.skew

    def _restore_feed(self) -> None:
        try:
            feed = Feed.parse(self.state.read_feed())
            self._apply_policy(feed)
        except (OSError, ValueError, MeshIdError):  # unreadable, not JSON, not a feed: the watch
            return  # brings the current one
        self._feed = feed

    # -- enroll and renew --

    async def start(self) -> None:
        """Have an SVID installed when this returns, or raise saying what the operator must do."""
        self.state.prepare()
        svid = self._restore()
        if svid is not None:
            self.host.install_svid(svid, "restored")
            self._restore_feed()
            return
        await self._enroll_with_retries()
        # Serve with the allow-list from the start, not with an empty one until the
        # first long poll returns (which would refuse everything for a moment).
        try:
            await self._poll_feed(WatchQuery(wait=0), self.client.timeout)
        except MeshIdError as exc:
            self.host.events.emit("watch_failed", reason=exc.reason, detail=exc.message)
        # The join token is spent: save the SVID before serving, if the disk lets us
        # (if not, it is served from memory and retried like any other write).
        await self.state.flush()

    def _read_token(self) -> str:
        sid = self.host.identity
        token_file = self.source.token_file
        advice = (
            f"create one with 'meshid ca token {sid}' on the authority, write it to "
            f"{token_file or 'the file named by authority.token_file'} and start again"
        )
        if token_file is None:
            raise ConfigError(f"no valid SVID in {self.dir} and no join token: {advice}")
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"no valid SVID in {self.dir} and the join token {token_file} is unreadable "
                f"({exc.strerror}): {advice}",
                reason="missing_token",
            ) from None
        if not token:
            raise ConfigError(f"join token file {token_file} is empty: {advice}")
        return token

    def _check_bootstrap_bundle(self) -> None:
        """The bundle enrollment trusts holds certificates: else no attempt can ever work."""
        path = self.source.bundle
        pem = self._trust_pem()
        try:
            roots = certs_from_pem(pem, str(path))
        except InvalidSvid:
            roots = []
        if not roots:
            raise ConfigError(
                f"authority.bundle: {path} holds no certificate: write the authority's bundle "
                "there ('meshid ca bundle' on the authority prints it)",
                reason="invalid_bundle",
            )

    async def _enroll_with_retries(self) -> None:
        """Enroll, retrying what may pass; a permanent failure ends with its one line."""
        token = self._read_token()
        self._check_bootstrap_bundle()
        self.host.lifecycle.phase = ENROLLING
        failures = 0
        while True:
            try:
                await self._enroll(token)
                return
            except ControlPlaneError as exc:
                if exc.refused and exc.reason != failures_mod.NOT_AUTHORITY:
                    raise ControlPlaneError(
                        f"join token refused: {exc.message}; create a new token with "
                        f"'meshid ca token {self.host.identity}', write it to "
                        f"{self.source.token_file} and start again",
                        reason=exc.reason,
                        status=exc.status,
                        permanent=True,
                    ) from None
                if exc.permanent:
                    self.host.events.emit(
                        "enroll_failed", reason=exc.reason, detail=exc.message, permanent=True
                    )
                    raise
                failures += 1
                delay = self.schedule.retry_delay(failures, 0.0, self.rand())
                self.host.events.emit(
                    "enroll_failed",
                    reason=exc.reason,
                    detail=exc.message,
                    attempt=failures,
                    retry_in_s=round(delay, 1),
                )
                self.host.lifecycle.enroll_failed(exc.brief, failures, trio.current_time() + delay)
                await trio.sleep(delay)

    async def _enroll(self, token: str) -> None:
        key = generate_key()
        reply = await self.client.request(
            "POST",
            ENROLL,
            EnrollRequest(token, build_csr(key, self.host.identity).decode()).to_json(),
            bundle_pem=self._trust_pem(),
            now=self.host.wall_now(),
            trust=self._trust_name(),
        )
        svid = self._svid_from(reply, key)
        self._learn_offset(svid)
        self.host.install_svid(svid, "enrolled")
        self.host.count_renewal("ok")
        self.state.request(IDENTITY, self._write_identity)

    async def renew(self) -> None:
        key = generate_key()
        reply = await self.client.request(
            "POST",
            RENEW,
            RenewRequest(build_csr(key, self.host.identity).decode(), self._held()).to_json(),
            bundle_pem=self._trust_pem(),
            now=self.host.wall_now(),
            trust=self._trust_name(),
            identity=self._client_identity(),
        )
        svid = self._svid_from(reply, key)
        self._learn_offset(svid)
        # In force first: if the disk cannot take the new key, the sidecar serves with
        # it from memory while the old pair on disk stays whole for a restart.
        self.host.install_svid(svid, "renewed")
        self.host.count_renewal("ok")
        self.state.request(IDENTITY, self._write_identity)

    def _held(self) -> int | None:
        """The bundle sequence we hold, so a renewal reply can leave the bundle out."""
        svid = self.host.current_svid()
        return svid.bundle.sequence if svid and svid.bundle.sequence else None

    def _svid_from(self, doc: dict[str, Any], key: Any) -> Svid:
        try:
            reply = SvidReply.parse(doc)
        except WireError as exc:
            raise ControlPlaneError(
                f"control plane reply is missing or malformed: {exc.message}",
                reason=Reason.AUTHORITY_PROTOCOL,
            ) from None
        chain = certs_from_pem(reply.svid.encode(), "SVID from the control plane")
        current = self.host.current_svid()
        if reply.bundle is None:
            if current is None or current.bundle.sequence != reply.bundle_sequence:
                raise ControlPlaneError(
                    f"control plane left out bundle {reply.bundle_sequence}, which we do not hold",
                    reason=Reason.AUTHORITY_PROTOCOL,
                )
            bundle = current.bundle  # unchanged: the reply left it out
        else:
            bundle = TrustBundle.from_pem(
                self.host.identity.trust_domain,
                reply.bundle.encode(),
                sequence=reply.bundle_sequence,
                what="bundle from the control plane",
            )
        return Svid.check(
            chain, key, bundle, self.host.identity, self.host.wall_now(), self._skew()
        )

    def _learn_offset(self, svid: Svid) -> None:
        """How far our clock is from the authority's, from an SVID it just issued.

        The authority issued it moments ago, at NotBefore + backdate on its
        clock; the schedule and expiry use the SVID's times shifted into ours,
        so a sidecar whose clock is off renews on time rather than early or late.
        Bounded by the clock-skew allowance: beyond it, nothing else would work.
        """
        issued = svid.leaf.not_valid_before_utc + self.schedule.backdate
        offset = self.host.wall_now() - issued
        limit = self._skew()
        self.host.clock_offset = max(-limit, min(limit, offset))

    def validity(self) -> tuple[datetime, datetime] | None:
        """The current SVID's NotBefore and NotAfter, on our clock."""
        svid = self.host.current_svid()
        if svid is None:
            return None
        shift = self.host.clock_offset
        return svid.leaf.not_valid_before_utc + shift, svid.not_after + shift

    def _note(self, duty: str, exc: BaseException | None) -> None:
        """Show (or clear) in /readyz a duty failing in a way retrying cannot fix.

        A revoked identity is shown as such by /readyz itself, not as a duty's failure.
        """
        if exc is None or not permanent(exc) or _reason(exc) == IDENTITY_REVOKED:
            self.host.lifecycle.problem(duty, None)
        else:
            brief = exc.brief if isinstance(exc, ControlPlaneError) else _reason(exc)
            self.host.lifecycle.problem(duty, brief)

    def _on_renewal_failure(
        self, exc: MeshIdError, failures: int, left: float, retry_in: float
    ) -> None:
        self.host.count_renewal("error")
        self._note(DUTY_RENEW, exc)
        validity = self.validity()
        state = (
            self.schedule.state(validity[0], validity[1], self.host.wall_now())
            if validity
            else EXPIRED
        )
        self.host.events.emit(
            "renewal_failed",
            reason=exc.reason,
            detail=exc.message,
            attempt=failures,
            seconds_left=round(left, 1),
            svid_state=state,
            retry_in_s=round(retry_in, 1),
            permanent=permanent(exc) or None,
        )
        if state == EXPIRED:
            self.host.events.emit(
                "svid_expired",
                reason="svid_expired",
                detail=(
                    f"the SVID of {self.host.identity} has expired and the control plane at "
                    f"{self.client.host}:{self.client.port} could not renew it ({exc.message}); "
                    "peers refuse this sidecar until the control plane is back and renewal "
                    f"succeeds, or until a new join token ('meshid ca token "
                    f"{self.host.identity}') is written to {self.source.token_file} and the "
                    "sidecar restarted"
                ),
            )

    # -- the feed --

    def _apply_policy(self, feed: Feed) -> None:
        td = self.host.identity.trust_domain
        for sid in [*feed.revoked, *(x for pair in feed.pairs for x in pair)]:
            if sid.trust_domain != td:
                raise InvalidSvid(
                    f"feed names {sid} of another trust domain", reason=Reason.BAD_FEED
                )
        self.host.install_policy(
            Policy.build(
                list(feed.pairs), feed.policy_version, list(feed.revoked), feed.revocation_version
            )
        )
        self.versions = (feed.policy_version, feed.revocation_version, feed.bundle_sequence)

    def _apply_bundle(self, feed: Feed) -> bool:
        """Install the feed's bundle if it is new; True if it was (and should be saved)."""
        svid = self.host.current_svid()
        if svid is None:
            return False
        bundle = TrustBundle.from_pem(
            self.host.identity.trust_domain,
            feed.bundle.encode(),
            sequence=feed.bundle_sequence,
            what="bundle from the feed",
        )
        if bundle.same_roots(svid.bundle) and bundle.sequence == svid.bundle.sequence:
            return False
        updated = Svid.check(
            list(svid.chain),
            svid.key,
            bundle,
            self.host.identity,
            self.host.wall_now(),
            self._skew(),
        )
        self.host.install_svid(updated, "bundle_updated")
        self._report_now.set()  # a root rollover waits for this acknowledgement
        return True

    async def _poll_feed(self, query: WatchQuery, wait: float) -> None:
        pv, rv, _ = self.versions
        doc = await self.client.request(
            "GET",
            query.target(),
            None,
            bundle_pem=self._trust_pem(),
            now=self.host.wall_now(),
            trust=self._trust_name(),
            identity=self._client_identity(),
            wait=wait,
        )
        try:
            feed = Feed.parse(doc)
        except WireError as exc:
            raise ControlPlaneError(
                f"bad feed: {exc.message}", reason=Reason.AUTHORITY_PROTOCOL
            ) from None
        changed = (feed.policy_version, feed.revocation_version) != (pv, rv)
        new_bundle = self._apply_bundle(feed)
        if changed:
            self._apply_policy(feed)
            self._feed = feed
        else:
            self.versions = (pv, rv, feed.bundle_sequence)
        # Both are in force already; saving them never waits on the disk.
        if new_bundle:
            self.state.request(BUNDLE, self._write_bundle)
        if changed:
            self.state.request(FEED, self._write_feed)

    async def watch(self) -> None:
        """Follow the allow-list, revocations and bundle; never returns."""
        failures = 0
        while True:
            query = WatchQuery(*self.versions, wait=WATCH_WAIT)
            try:
                await self._poll_feed(query, WATCH_WAIT + 10)
                failures = 0
                self._note(DUTY_WATCH, None)
            except Exception as exc:  # one failed poll, never the end of the watcher
                failures += 1
                err = _as_meshid(exc)
                reason, detail = err.reason, err.message
                slow = permanent(exc)
                if slow:
                    delay = self.pacing.slow(self.rand())
                else:
                    delay = min(
                        self.pacing.watch_retry_max,
                        self.schedule.retry_delay(failures, 0.0, self.rand()),
                    )
                self._note(DUTY_WATCH, exc)
                self.host.events.emit(
                    "watch_failed",
                    reason=reason,
                    detail=detail,
                    retry_in_s=round(delay, 1),
                    permanent=slow or None,
                )
                if reason == IDENTITY_REVOKED:
                    self._revoked_self(getattr(exc, "revocation_version", None))
                await trio.sleep(delay)

    def _revoked_self(self, revocation_version: int | None = None) -> None:
        """The authority revoked this very workload: stop using the identity, say so once.

        The revocation version is the one the authority's refusal names (the
        feed that would carry it is refused to us), so decisions here cite the
        same version as everywhere else.
        """
        me = self.host.identity
        policy = self.host.current_policy()
        if me in policy.revoked:
            return
        version = policy.revocation_version
        if revocation_version is not None:
            version = max(version, revocation_version)
        self.host.install_policy(
            Policy.build(policy.pairs, policy.version, {*policy.revoked, me}, version)
        )
        self.host.events.emit(
            "identity_revoked",
            reason="identity_revoked",
            detail=(
                f"the authority revoked {me}: this sidecar closed its connections and refuses "
                "new ones, as every peer does; to bring the workload back, enroll it under a "
                "new identity (meshid ca token NEW-ID) and change `identity` in this config"
            ),
        )

    async def report(self) -> None:
        """Tell the control plane how this sidecar is doing, every few seconds."""
        failing = False
        while True:
            body = {"v": WIRE_VERSION, "instance": self.instance, **self.host.status_report()}
            try:
                await self.client.request(
                    "POST",
                    REPORT,
                    body,
                    bundle_pem=self._trust_pem(),
                    now=self.host.wall_now(),
                    trust=self._trust_name(),
                    identity=self._client_identity(),
                )
                failing = False
                self._note(DUTY_REPORT, None)
            except MeshIdError as exc:
                if not failing:  # once per outage: renewal_failed already says it loudly
                    self.host.events.emit("report_failed", reason=exc.reason, detail=exc.message)
                failing = True
                self._note(DUTY_REPORT, exc)
                if permanent(exc):  # futile at full rate, and changes do not make it less so
                    await trio.sleep(self.pacing.slow(self.rand()))
                    self._report_now = trio.Event()
                    continue
            await trio.sleep(REPORT_MIN_INTERVAL)  # a burst of changes makes one report
            with trio.move_on_after(REPORT_INTERVAL - REPORT_MIN_INTERVAL):
                await self._report_now.wait()
            self._report_now = trio.Event()

    def poke(self) -> None:
        """Something an operator may ask about changed: report it soon."""
        self._report_now.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.report)
            nursery.start_soon(
                renewal_loop,
                self.schedule,
                self.validity,
                self.renew,
                self.host.wall_now,
                self._on_renewal_failure,
                self.rand,
                self.pacing.slow,
            )
            nursery.start_soon(self.watch)
            nursery.start_soon(self.state.run, self._state_retry_delay)

    def _state_retry_delay(self, failures: int) -> float:
        return min(STATE_RETRY_MAX, self.schedule.retry_delay(failures, 0.0, self.rand()))
