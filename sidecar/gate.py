"""The gate: every decision to let a peer in (or out) or refuse it, and its one log line.

Theory of operation. OpenSSL calls `verify` for each certificate of the
peer's chain inside the handshake; OpenSSL checks no times itself
(`X509_V_FLAG_NO_CHECK_TIME`), so the chain's and the leaf's validity are
judged here on the process's clock. `verify` leaves its verdict on the
connection's `Handshake`; `handshake` then runs the TLS handshake, judges a
resumed session (which skips the callback), judges the pair again under
today's policy, and only then, the peer having proved its key, lets
quarantine refuse its ID. Each decision is one log line (`decision`) and one
metric; a refusal is charged to quarantine (the rules are in
sidecar/quarantine.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import trio
from OpenSSL import SSL, crypto

from meshid.federation import Bundles
from meshid.reasons import Reason
from meshid.report import Direction
from meshid.spiffeid import SpiffeId
from sidecar.events import EventLog
from sidecar.metrics import Metrics
from sidecar.peer import (
    INBOUND,
    LeafFacts,
    Verdict,
    anchor_verdict,
    asn1_time,
    ca_time_verdict,
    chain_error_verdict,
    decide_pair,
    judge_facts,
    leaf_facts,
)
from sidecar.quarantine import ADDRESS, QUARANTINED, SPIFFE_ID, Quarantine
from sidecar.refusals import RecentRefusals
from sidecar.registry import LiveConnection
from sidecar.sockets import host_of, linger
from sidecar.state import Current
from sidecar.tlsio import TlsStream, cert_digest, handshake_failure_reason

FACTS_CACHE = 4096  # peer certificates whose facts are remembered (a few hundred bytes each)


@dataclass(slots=True)
class Handshake:
    """Per-connection state the verify callback reads and fills in."""

    direction: str
    expected: SpiffeId | None
    verdict: Verdict | None = None
    # The trust bundles of the connection's credential generation, by trust domain.
    bundles: Bundles | None = None
    # The top of the chain OpenSSL built (the trust anchor from its store): OpenSSL
    # calls `verify` from the top down, so the deepest certificate seen is it.
    anchor: crypto.X509 | None = None
    anchor_depth: int = -1
    resumed: bool = False  # the handshake resumed a session: the callback never ran


class Gate:
    def __init__(
        self,
        current: Current,
        quarantine: Quarantine,
        metrics: Metrics,
        events: EventLog,
        *,
        handshake_timeout: float,
        max_connections: int,
        changed: Callable[[], None],
    ) -> None:
        self.current = current
        self.quarantine = quarantine
        self.metrics = metrics
        self.events = events
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.changed = changed  # live connections moved: the status report may want to know
        # What each peer certificate says about itself, by its digest: resumed sessions
        # present the same SVID again and again, and parsing it was a tenth of the
        # Python a new connection cost. Pure facts only; time and policy are per use.
        self._facts: dict[bytes, LeafFacts] = {}
        self.refusals = RecentRefusals()  # the last hour's, for the status report

    def cutting(
        self, predicate: Callable[[LiveConnection], str | None]
    ) -> Callable[[LiveConnection], str | None]:
        """`predicate` for `close_where`, counting each close but idle ones as a cut."""

        def cut(entry: LiveConnection) -> str | None:
            reason = predicate(entry)
            if reason is not None and reason != Reason.IDLE_TIMEOUT and entry.peer_id is not None:
                direction = cast(Direction, entry.direction)
                self.refusals.add(direction, entry.peer_id, "cut", reason, trio.current_time())
            return reason

        return cut

    def leaf_facts(self, cert: crypto.X509) -> LeafFacts:
        key = cert_digest(cert)
        facts = self._facts.get(key)
        if facts is None:
            if len(self._facts) >= FACTS_CACHE:
                self._facts.clear()  # SVIDs rotate: old entries simply age out this way
            facts = self._facts[key] = leaf_facts(cert.to_cryptography())
        return facts

    def _judge(self, cert: crypto.X509, hs: Handshake) -> Verdict:
        """The peer's leaf judged under the credentials, policy and clock in force now."""
        return judge_facts(
            self.leaf_facts(cert),
            direction=hs.direction,
            local_id=self.current.identity,
            expected=hs.expected,
            policy=self.current.policy,
            now=self.current.wall(),
            skew=self.current.skew,
            federated=self._bundles(hs).domains(),
        )

    def verify(
        self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
    ) -> bool:
        """OpenSSL's per-certificate callback: the place a peer is refused with an alert."""
        hs = conn.get_app_data()
        if not isinstance(hs, Handshake):
            return False
        try:
            if not ok:
                leaf = cert.to_cryptography() if depth == 0 else None
                if hs.verdict is None:
                    hs.verdict = chain_error_verdict(leaf, errnum, self._bundles(hs).domains())
                return False
            if depth > 0:
                # OpenSSL checks no times (X509_V_FLAG_NO_CHECK_TIME): ours, on our clock.
                late = ca_time_verdict(
                    asn1_time(cert.get_notBefore()),
                    asn1_time(cert.get_notAfter()),
                    self.current.wall(),
                    self.current.skew,
                )
                if late is not None:
                    hs.verdict = late
                    return False
                if depth > hs.anchor_depth:
                    hs.anchor, hs.anchor_depth = cert, depth
                return True
            facts = self.leaf_facts(cert)
            bundles = self._bundles(hs)
            anchor = hs.anchor.to_cryptography() if hs.anchor is not None else None
            wrong_anchor = anchor_verdict(facts, anchor, bundles)
            if wrong_anchor is not None:
                hs.verdict = wrong_anchor
                return False
            hs.verdict = self._judge(cert, hs)
            # A quarantined ID is not refused here: the peer has not yet shown it holds
            # the key (CertificateVerify comes next), so _handshake checks, after it.
            return hs.verdict.allowed
        except Exception as exc:  # never let a hostile certificate escape as a crash
            hs.verdict = Verdict(False, Reason.INVALID_CERTIFICATE, f"certificate rejected: {exc}")
            return False

    def _bundles(self, hs: Handshake) -> Bundles:
        """The connection's bundles; with none given, the current generation's (or none)."""
        if hs.bundles is not None:
            return hs.bundles
        svid = self.current.svid()
        if svid is None:
            raise ValueError("no credentials in force")
        return svid.bundles

    def quarantined(self) -> dict[str, float]:
        """Blocked peers (SPIFFE IDs or source addresses) and the seconds they have left."""
        return self.quarantine.active(trio.current_time())

    def blocked_address(self, host: str) -> bool:
        return self.quarantine.blocked(ADDRESS, host, trio.current_time())

    def blocked_identity(self, peer: SpiffeId) -> bool:
        return self.quarantine.blocked(SPIFFE_ID, str(peer), trio.current_time())

    def _count_refusal(self, entry: LiveConnection, verdict: Verdict, proved: bool) -> None:
        """An inbound peer refused: by its ID if it proved one, else by its address.

        The rules (which reasons count, against what) are in sidecar/quarantine.py.
        """
        if entry.direction != INBOUND:
            return
        tipped = self.quarantine.refused(
            verdict.reason,
            proved=proved,
            identity=str(verdict.peer_id) if verdict.peer_id is not None else None,
            address=host_of(entry.peer_addr),
            now=trio.current_time(),
        )
        if tipped is not None:
            self.metrics.quarantines.labels(tipped.kind).inc()
            self.events.emit(
                "peer_quarantined",
                reason=QUARANTINED,
                peer=tipped.key,
                kind=tipped.kind,
                last_reason=verdict.reason,
                failures=tipped.failures,
                window_s=tipped.window,
                blocked_s=tipped.block,
            )

    def deny(
        self,
        entry: LiveConnection,
        verdict: Verdict,
        *,
        handshake: bool = True,
        proved: bool = False,
        resumed: bool | None = None,
    ) -> None:
        """Log and count a refusal. `proved`: the peer completed its handshake (see quarantine)."""
        self._count_refusal(entry, verdict, proved)
        if verdict.peer_id is not None:
            direction = cast(Direction, entry.direction)
            now = trio.current_time()
            self.refusals.add(direction, verdict.peer_id, "deny", verdict.reason, now)
        self.metrics.connections.labels(entry.direction, "deny", verdict.reason).inc()
        if handshake:
            self.metrics.handshake_failures.labels(entry.direction, verdict.reason).inc()
        self.events.emit(
            "decision",
            direction=entry.direction,
            decision="deny",
            reason=verdict.reason,
            detail=verdict.detail,
            local_id=str(self.current.identity),
            peer_id=str(verdict.peer_id) if verdict.peer_id else None,
            peer_addr=entry.peer_addr,
            original_dst=entry.original_dst,
            conn_id=entry.id,
            resumed=resumed,
        )

    def allow(self, entry: LiveConnection, verdict: Verdict, **extra: object) -> None:
        entry.peer_id = verdict.peer_id
        entry.peer_serial = verdict.serial
        entry.peer_not_after = verdict.not_after
        entry.established = True
        self.changed()
        self.metrics.connections.labels(entry.direction, "allow", verdict.reason).inc()
        self.events.emit(
            "decision",
            direction=entry.direction,
            decision="allow",
            reason=verdict.reason,
            local_id=str(self.current.identity),
            peer_id=str(verdict.peer_id),
            peer_serial=f"{verdict.serial:x}" if verdict.serial is not None else None,
            peer_addr=entry.peer_addr,
            original_dst=entry.original_dst,
            conn_id=entry.id,
            policy_version=self.current.policy.version,
            **extra,
        )

    async def handshake(
        self, tls: TlsStream, hs: Handshake, entry: LiveConnection
    ) -> Verdict | None:
        """Run the handshake; on refusal log it and return None.

        The time limit is a deadline on the connection's own cancel scope, set
        for the length of the handshake: a cancel scope of its own cost about
        a fiftieth of a resumed connection's CPU. When the deadline passes, the
        refusal is logged here and the cancellation goes on up to the
        connection's scope, which ends the connection (and resets an upstream).
        A handshake that completes only once its deadline has passed is refused
        the same way.
        """
        scope = entry.scope
        scope.deadline = trio.current_time() + self.handshake_timeout
        refused = False
        try:
            await self.metrics.timed_handshake(hs.direction, tls.handshake())
        except SSL.Error as exc:
            verdict = hs.verdict
            if verdict is None or verdict.allowed:
                reason = handshake_failure_reason(exc)
                verdict = Verdict(False, reason, f"TLS handshake failed: {reason}")
            refused = True
            self.deny(entry, verdict)
            if hs.direction == INBOUND:
                await linger(tls.sock)
            return None
        finally:
            if not scope.cancel_called:
                scope.deadline = math.inf
            elif not refused and entry.close_reason is None:  # the deadline, not a cut
                refused = True
                self.deny(
                    entry, Verdict(False, Reason.HANDSHAKE_TIMEOUT, "TLS handshake took too long")
                )
        if refused:
            return None
        hs.resumed = tls.resumed
        verdict = hs.verdict
        if verdict is None or hs.resumed:  # OpenSSL did not call us: judge the session now
            cert = tls.conn.get_peer_certificate()
            if cert is None:
                verdict = Verdict(False, Reason.NO_CLIENT_CERTIFICATE, "peer sent no certificate")
            else:
                # The session was made by a full handshake whose chain and anchor were
                # judged under this same generation's bundles: a session resumes only
                # within its generation (server tickets are sealed with keys of this
                # generation's context, client sessions are cached in it). The leaf is
                # judged again here, on today's clock, policy and revocations.
                verdict = self._judge(cert, hs)
        elif verdict.allowed and verdict.peer_id is not None:
            # The callback judged under the policy of that moment; install_policy skips
            # connections still in their handshake, so judge the pair again under today's.
            policy = self.current.policy
            decision = policy.serial_decision(verdict.peer_id, verdict.serial) or decide_pair(
                policy, hs.direction, self.current.identity, verdict.peer_id
            )
            if not decision.allowed:
                verdict = Verdict(
                    False,
                    decision.reason,
                    decision.explanation,
                    verdict.peer_id,
                    verdict.serial,
                    verdict.not_after,
                )
        # The handshake is complete: the peer holds the key of the ID it presented,
        # full handshake or resumed session alike. Only now may that ID's quarantine
        # refuse it, and only now may a refusal be charged to the ID.
        if (
            verdict.allowed
            and hs.direction == INBOUND
            and verdict.peer_id is not None
            and self.blocked_identity(verdict.peer_id)
        ):
            verdict = Verdict(
                False,
                QUARANTINED,
                f"{verdict.peer_id} is quarantined after repeated refusals",
                verdict.peer_id,
                verdict.serial,
                verdict.not_after,
            )
        if not verdict.allowed:
            self.deny(entry, verdict, proved=True, resumed=hs.resumed)
            return None
        return verdict

    def refused_at_accept(
        self, peer: tuple[str, int], direction: str, peer_addr: str, live: int
    ) -> bool:
        """Quarantine of the source address and the connection cap, before any TLS."""
        reason = None
        detail = None
        if direction == INBOUND and self.blocked_address(peer[0]):
            reason, detail = QUARANTINED, f"{peer[0]} is quarantined after repeated refusals"
        elif live >= self.max_connections:
            reason = Reason.CONNECTION_LIMIT
        if reason is None:
            return False
        self.metrics.connections.labels(direction, "deny", reason).inc()
        self.events.emit(
            "decision",
            direction=direction,
            decision="deny",
            reason=reason,
            detail=detail,
            local_id=str(self.current.identity),
            peer_addr=peer_addr,
        )
        return True
