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
- The watcher follows the feed (allow-list, revocations, bundle): see
  `sidecar.feed`. The report loop is `sidecar.reporting`.
- Every request (enrollment, renewal, the feed, the report, a JWT-SVID for
  the Workload API) goes through `sidecar.link`, which fails over between
  the servers `authority.server` lists (`sidecar.failover`); what follows
  is what happens when every one of them has failed.
- Failures are judged by `sidecar.failures`. Before enrollment a permanent
  one (plain HTTP at the authority's address, another trust domain, a bundle
  the authority's certificate does not chain to, a refused token) ends the
  sidecar with its one-line message; a transient one is retried with backoff,
  each attempt shown in /readyz. Once serving, nothing ends the sidecar: a
  permanent failure of renewal, watch or report is logged, shown in /readyz
  and retried every `Pacing.slow_retry` (±10 %) instead of at full rate, and
  so is the authority refusing a revoked identity; the first success clears it.
  The SVID it holds revoked by serial (the identity not) is the one case where
  a serving sidecar enrolls again, with a new token: see `sidecar.feed`.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import trio

from meshid.bundle import TrustBundle
from meshid.errors import ConfigError, InvalidSvid, MeshIdError
from meshid.events import EventLog
from meshid.feedwire import Feed
from meshid.policy import Policy
from meshid.reasons import Reason
from meshid.report import StatusReport
from meshid.spiffeid import SpiffeId
from meshid.svid import certs_from_pem, generate_key
from meshid.wire import ENROLL, RENEW, REPORT, RenewRequest, SvidReply, WatchQuery, WireError
from sidecar import failures as failures_mod
from sidecar.config import AuthoritySource
from sidecar.control import ControlClient, ControlPlaneError
from sidecar.credentials import Svid
from sidecar.enrollment import enroll_request, read_credential, refusal
from sidecar.failover import ServerChoice
from sidecar.feed import FeedFollower
from sidecar.lifecycle import ENROLLING, Lifecycle
from sidecar.link import AuthorityLink
from sidecar.renewal import (
    DUTY_RENEW,
    IDENTITY_REVOKED,
    STATE_RETRY_MAX,
    failure_reason,
    permanent,
)
from sidecar.renewal import (
    Pacing as Pacing,
)
from sidecar.renewal import (
    build_csr as build_csr,
)
from sidecar.renewal import (
    renewal_loop as renewal_loop,
)
from sidecar.reporting import Reporter
from sidecar.schedule import EXPIRED
from sidecar.state import Current
from sidecar.statedir import (
    IDENTITY,
    StateDir,
)


class Host(Protocol):
    """What the identity asks of the sidecar it serves: to swap credentials and policy in.

    What it only reads (our identity, the clock, the credentials and policy in
    force) and the clock offset it measures are in the state holder,
    `sidecar.state.Current`, which it is given directly.
    """

    events: EventLog
    lifecycle: Lifecycle

    def install_svid(self, svid: Svid, how: str) -> None: ...
    def install_policy(self, policy: Policy) -> int: ...
    def install_addresses(self, addresses: Mapping[tuple[str, int], SpiffeId]) -> None: ...
    def count_renewal(self, result: str) -> None: ...
    def count_failover(self, reason: str) -> None: ...
    def status_report(self, instance: str) -> StatusReport: ...


class DynamicIdentity(FeedFollower):
    task = "dynamic_identity"  # its name as a background duty

    def __init__(
        self,
        host: Host,
        current: Current,
        source: AuthoritySource,
        *,
        client: ControlClient | Sequence[ControlClient],
        pacing: Pacing | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """`client`: one per server of `authority.server`, in its order (see `sidecar.link`)."""
        self.host = host
        self.current = current
        self.source = source
        self.pacing = pacing or Pacing()
        clients = (client,) if isinstance(client, ControlClient) else tuple(client)
        self.link = AuthorityLink(
            clients,
            current,
            source,
            events=host.events,
            rand=rand,
            choice=ServerChoice(len(clients), self.pacing.failover),
            on_failover=host.count_failover,
        )
        self.client = clients[0]  # every client has the same timeout and skew
        self.schedule = self.pacing.schedule
        self.rand = rand
        self.dir = source.state_dir
        self.state = StateDir(source.state_dir, host.events)
        self._feed: Feed | None = None  # the last feed applied, as feed.json holds it
        self.versions: tuple[int, int, int] = (-1, -1, -1)
        self._revoked_svid: int | None = None
        self._refused_credential: bytes | None = None  # digest of a token the authority refused
        self.instance = secrets.token_hex(6)  # this run of the sidecar, as `ca status` lists it
        self.reporter = Reporter(
            self._post_report,
            lambda: self.host.status_report(self.instance),
            host.events,
            self._note,
            self.pacing,
            rand,
            wall=current.wall,
        )

    # -- files --

    # What is current in memory, written to the state directory. Each of these is
    # also what a retry runs, so a retry writes what is current then, not a copy
    # of what failed.

    def _write_identity(self) -> None:
        svid = self.current.svid()
        if svid is not None:
            self.state.write_identity(svid.key, svid.chain, svid.bundle)

    def _write_bundle(self) -> None:
        svid = self.current.svid()
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
                self.current.identity.trust_domain, bundle_pem, what="persisted bundle"
            )
            return Svid.check(
                chain, key, bundle, self.current.identity, self.current.wall(), self._skew()
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
        return read_credential(self.source, self.current.identity, self.dir)

    def _check_bootstrap_bundle(self) -> None:
        """The bundle enrollment trusts holds certificates: else no attempt can ever work."""
        path = self.source.bundle
        pem = self.link.trust_pem()
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
                by_jwt = self.source.jwt_file is not None
                passes = by_jwt and exc.reason in failures_mod.JWT_REFUSALS_THAT_PASS
                if exc.refused and exc.reason != failures_mod.NOT_AUTHORITY and not passes:
                    raise refusal(exc, self.source, self.current.identity) from None
                if exc.permanent and not passes:
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
                if by_jwt:
                    token = self._read_token()

    async def _enroll(self, token: str) -> None:
        key = generate_key()
        reply = await self.link.ask(
            "POST",
            ENROLL,
            enroll_request(self.source, token, build_csr(key, self.current.identity)).to_json(),
            as_client=False,  # the token is who we are, until we hold an SVID
        )
        svid = self._svid_from(reply, key)
        self._learn_offset(svid)
        self.host.install_svid(svid, "enrolled")
        self.host.count_renewal("ok")
        self.state.request(IDENTITY, self._write_identity)

    async def _enroll_again(self) -> None:
        """Enroll anew, as at first start: the SVID we hold is revoked (see `sidecar.feed`).

        A token the authority refused is not sent again: the file still holding
        it is waited on, so a spent token costs one refusal, not one a minute
        (each counts against the enrollment rate limit of our address).
        """
        token = self._read_token()
        digest = hashlib.sha256(token.encode()).digest()
        if digest == self._refused_credential:
            raise MeshIdError(
                "the authority refused the token in the enrollment file already: write a new "
                "one there to enroll again",
                reason=Reason.TOKEN_USED,
            )
        try:
            await self._enroll(token)
        except ControlPlaneError as exc:
            if exc.refused:
                self._refused_credential = digest
            raise

    async def renew(self) -> None:
        key = generate_key()
        reply = await self.link.ask(
            "POST",
            RENEW,
            RenewRequest(build_csr(key, self.current.identity).decode(), self._held()).to_json(),
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
        svid = self.current.svid()
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
        current = self.current.svid()
        if reply.bundle is None:
            if current is None or current.bundle.sequence != reply.bundle_sequence:
                raise ControlPlaneError(
                    f"control plane left out bundle {reply.bundle_sequence}, which we do not hold",
                    reason=Reason.AUTHORITY_PROTOCOL,
                )
            bundle = current.bundle  # unchanged: the reply left it out
        else:
            bundle = TrustBundle.from_pem(
                self.current.identity.trust_domain,
                reply.bundle.encode(),
                sequence=reply.bundle_sequence,
                what="bundle from the control plane",
            )
        return Svid.check(
            chain,
            key,
            bundle,
            self.current.identity,
            self.current.wall(),
            self._skew(),
            current.federated if current is not None else (),  # the feed moves these
        )

    def _learn_offset(self, svid: Svid) -> None:
        """How far our clock is from the authority's, from an SVID it just issued.

        The authority issued it moments ago, at NotBefore + backdate on its
        clock; the schedule and expiry use the SVID's times shifted into ours,
        so a sidecar whose clock is off renews on time rather than early or late.
        Bounded by the clock-skew allowance: beyond it, nothing else would work.
        """
        issued = svid.leaf.not_valid_before_utc + self.schedule.backdate
        offset = self.current.wall() - issued
        limit = self._skew()
        self.current.clock_offset = max(-limit, min(limit, offset))

    def validity(self) -> tuple[datetime, datetime] | None:
        """The current SVID's NotBefore and NotAfter, on our clock."""
        svid = self.current.svid()
        if svid is None:
            return None
        shift = self.current.clock_offset
        return svid.leaf.not_valid_before_utc + shift, svid.not_after + shift

    def _note(self, duty: str, exc: BaseException | None) -> None:
        """Show (or clear) in /readyz a duty failing in a way retrying cannot fix.

        A revoked identity is shown as such by /readyz itself, not as a duty's failure.
        """
        if exc is None or not permanent(exc) or failure_reason(exc) == IDENTITY_REVOKED:
            self.host.lifecycle.problem(duty, None)
        else:
            brief = exc.brief if isinstance(exc, ControlPlaneError) else failure_reason(exc)
            self.host.lifecycle.problem(duty, brief)

    def _on_renewal_failure(
        self, exc: MeshIdError, failures: int, left: float, retry_in: float
    ) -> None:
        self.host.count_renewal("error")
        self._note(DUTY_RENEW, exc)
        if isinstance(exc, ControlPlaneError):
            self._refused_as_revoked(exc)
        validity = self.validity()
        state = (
            self.schedule.state(validity[0], validity[1], self.current.wall())
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
                    f"the SVID of {self.current.identity} has expired and the control plane at "
                    f"{self._servers_named()} could not renew it ({exc.message}); "
                    "peers refuse this sidecar until the control plane is back and renewal "
                    f"succeeds, or until a new join token ('meshid ca token "
                    f"{self.current.identity}') is written to {self.source.token_file} and the "
                    "sidecar restarted"
                ),
            )

    def _servers_named(self) -> str:
        """The authority's servers, for a message: `a:1`, or `a:1 (or b:2)`."""
        first, *others = (str(a) for a in self.link.servers())
        return f"{first} (or {', '.join(others)})" if others else first

    async def call(self, method: str, target: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One authenticated request to the control plane (e.g. a JWT-SVID for the Workload API)."""
        return await self.link.ask(method, target, body)

    async def _post_report(self, body: dict[str, Any]) -> None:
        await self.link.ask("POST", REPORT, body)

    def poke(self) -> None:
        """Something an operator may ask about changed: report it soon."""
        self.reporter.poke()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.reporter.run)
                nursery.start_soon(
                    renewal_loop,
                    self.schedule,
                    self.validity,
                    self.renew,
                    self.current.wall,
                    self._on_renewal_failure,
                    self.rand,
                    self.pacing.slow,
                )
                nursery.start_soon(self.watch)
                nursery.start_soon(self.state.run, self._state_retry_delay)
        finally:
            self.link.close()

    def _state_retry_delay(self, failures: int) -> float:
        return min(STATE_RETRY_MAX, self.schedule.retry_delay(failures, 0.0, self.rand()))
