"""The sidecar process: the composition root that wires config, credentials, listeners and admin.

Theory of operation. `Sidecar.run` opens the admin listener first (so
/healthz answers, and /readyz says why not ready, while the sidecar waits for
its authority), then loads credentials, binds every listener, and only then
reports started (and /readyz turns 200); the admin listener closes last.
Each accepted socket gets a task that registers the connection,
authenticates the peer inside the TLS handshake (our verify callback judges
the SVID and the allow-list; a resumed session, which skips the callback, is
judged right after), logs the
decision, and pumps bytes until both directions end. New credentials and a
new allow-list are swapped in by reference; a policy change re-checks every
live connection and closes exactly those that became denied. SIGTERM drains:
stop accepting, let live connections finish up to `drain_timeout`, then cut.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import trio
from OpenSSL import SSL, crypto

from meshid import report as report_limits
from meshid.errors import MeshIdError
from meshid.policy import IDENTITY_REVOKED, Policy
from meshid.spiffeid import SpiffeId
from meshid.version import VERSION
from sidecar.admin import Response, serve_admin
from sidecar.config import Address, Inbound, Outbound, SidecarConfig, StaticSource
from sidecar.control import ControlClient
from sidecar.credentials import Generation, Svid
from sidecar.dynamic import DynamicIdentity, Pacing
from sidecar.events import EventLog
from sidecar.lifecycle import DRAINING, SERVING, STOPPED, Lifecycle
from sidecar.metrics import Gauges, Metrics
from sidecar.peer import (
    INBOUND,
    OUTBOUND,
    X509_CERT_NOT_YET_VALID,
    LeafFacts,
    Verdict,
    chain_error_verdict,
    judge_facts,
    leaf_facts,
)
from sidecar.proxyproto import encode_v2
from sidecar.pump import Pump, StreamAborted, reset
from sidecar.quarantine import ADDRESS, QUARANTINED, SPIFFE_ID, Quarantine
from sidecar.registry import LiveConnection, Registry
from sidecar.static import load_policy, load_svid, stamp
from sidecar.tlsio import TlsStream, handshake_failure_reason
from sidecar.workload.run import Prepared as PreparedWorkloadApi
from sidecar.workload.run import WorkloadApi, prepare_workload_api, serve_workload_api


def utcnow() -> datetime:
    return datetime.now(UTC)


INTERNAL_ERROR = "internal_error"
ACCEPT_BACKOFF = 0.1  # seconds to wait after accept() failed in a way we did not foresee
# accept(2) on Linux: errors of the connection being accepted, to be retried like EAGAIN
_ACCEPT_TRANSIENT = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ENONET,
    }
)
_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FACTS_CACHE = 4096  # peer certificates whose facts are remembered (a few hundred bytes each)


def _host_of(peer_addr: str) -> str:
    host = peer_addr.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def _fmt_addr(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=256)  # hosts come from the config: a handful, asked per connection
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(slots=True)
class Handshake:
    """Per-connection state the verify callback reads and fills in."""

    direction: str
    expected: SpiffeId | None
    verdict: Verdict | None = None


class Sidecar:
    def __init__(
        self,
        config: SidecarConfig,
        *,
        events: EventLog | None = None,
        wall: Callable[[], datetime] = utcnow,
        reload_interval: float = 1.0,
        sweep_interval: float = 1.0,
        pacing: Pacing | None = None,
    ) -> None:
        self.config = config
        self.pacing = pacing  # how the control-plane duties retry (dynamic mode)
        self.lifecycle = Lifecycle()
        self.identity = config.identity
        self.limits = config.limits
        self.events = events if events is not None else EventLog()
        self.wall = wall
        self.reload_interval = reload_interval
        self.sweep_interval = sweep_interval
        self.registry = Registry()
        self.pump = Pump()
        # What each peer certificate says about itself, by its digest: resumed sessions
        # present the same SVID again and again, and parsing it was a tenth of the
        # Python a new connection cost. Pure facts only; time and policy are per use.
        self._facts: dict[bytes, LeafFacts] = {}
        self.generation: Generation | None = None
        self._generation_number = 0
        self.policy = Policy.build([], 0)
        self.quarantine = Quarantine(
            identity_failures=config.limits.quarantine_failures,
            address_failures=config.limits.quarantine_address_failures,
            window=config.limits.quarantine_window,
            block=config.limits.quarantine_period,
        )
        self.skew = timedelta(seconds=config.limits.clock_skew)
        self.ready = False
        self.draining = False
        self.bound: dict[str, tuple[str, int]] = {}
        self._drain = trio.Event()
        self.stopped = trio.Event()
        self._accept_scopes: list[trio.CancelScope] = []
        self.dynamic: DynamicIdentity | None = None
        self.clock_offset = timedelta(0)  # ours minus the authority's (dynamic mode measures it)
        self.changed: Callable[[], None] = lambda: None  # live connections or policy moved
        self.svid_listeners: list[Callable[[Svid], None]] = []  # e.g. the Workload API
        self.workload_api: WorkloadApi | None = None
        self.metrics = Metrics(
            Gauges(
                registry=self.registry,
                svid_seconds_left=self.svid_seconds_left,
                policy_version=lambda: self.policy.version,
                bundle_sequence=lambda: (
                    self.generation.svid.bundle.sequence if self.generation else 0
                ),
                quarantined=lambda: len(self.quarantined()),
                state_dir_writable=lambda: self.dynamic.state.writable if self.dynamic else None,
                state_write_failures=lambda: self.dynamic.state.failures if self.dynamic else {},
                ready=lambda: self._readiness()[0] == 200,  # as /readyz
            )
        )

    # -- credentials and policy ------------------------------------------------

    def svid_seconds_left(self) -> float | None:
        if self.generation is None:
            return None
        expiry = self.generation.svid.not_after + self.clock_offset
        return (expiry - self.wall()).total_seconds()

    def install_svid(self, svid: Svid, how: str) -> None:
        """Swap in new credentials; live connections keep the generation they started with."""
        self._generation_number += 1
        self.generation = Generation.build(self._generation_number, svid, self._verify)
        for listener in self.svid_listeners:
            listener(svid)
        self.events.emit(
            "credentials",
            how=how,
            spiffe_id=str(svid.spiffe_id),
            serial=f"{svid.serial:x}",
            not_after=svid.not_after.isoformat(),
            generation=self._generation_number,
        )

    def wall_now(self) -> datetime:
        return self.wall()

    def current_svid(self) -> Svid | None:
        return self.generation.svid if self.generation is not None else None

    def current_policy(self) -> Policy:
        return self.policy

    def count_renewal(self, result: str) -> None:
        self.metrics.renewals.labels(result=result).inc()

    def install_policy(self, policy: Policy) -> int:
        """Swap in a new allow-list and close exactly the live connections it denies."""
        self.policy = policy
        self.metrics.policy_updates.inc()

        def now_denied(entry: LiveConnection) -> str | None:
            if entry.peer_id is None:
                return None
            if entry.direction == INBOUND:
                decision = policy.decide(entry.peer_id, self.identity)
            else:
                decision = policy.decide(self.identity, entry.peer_id)
            if decision.allowed:
                return None
            return "identity_revoked" if decision.reason == IDENTITY_REVOKED else "policy_revoked"

        closed = self.registry.close_where(now_denied)
        self.changed()
        self.events.emit(
            "policy", version=policy.version, pairs=len(policy.pairs), closed_connections=closed
        )
        return closed

    def _leaf_facts(self, cert: crypto.X509) -> LeafFacts:
        key = cert.digest("sha256")
        facts = self._facts.get(key)
        if facts is None:
            if len(self._facts) >= FACTS_CACHE:
                self._facts.clear()  # SVIDs rotate: old entries simply age out this way
            facts = self._facts[key] = leaf_facts(cert.to_cryptography())
        return facts

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
    ) -> bool:
        """OpenSSL's per-certificate callback: the place a peer is refused with an alert."""
        hs = conn.get_app_data()
        if not isinstance(hs, Handshake):
            return False
        try:
            td = self.identity.trust_domain
            if not ok:
                leaf = cert.to_cryptography() if depth == 0 else None
                if (
                    errnum == X509_CERT_NOT_YET_VALID
                    and leaf is not None
                    and leaf.not_valid_before_utc - self.wall() <= self.skew
                ):
                    return True  # within the clock skew we tolerate
                if hs.verdict is None:
                    hs.verdict = chain_error_verdict(leaf, errnum, td)
                return False
            if depth > 0:
                return True
            hs.verdict = judge_facts(
                self._leaf_facts(cert),
                direction=hs.direction,
                local_id=self.identity,
                expected=hs.expected,
                policy=self.policy,
                now=self.wall(),
                skew=self.skew,
            )
            # A quarantined ID is not refused here: the peer has not yet shown it holds
            # the key (CertificateVerify comes next), so _handshake checks, after it.
            return hs.verdict.allowed
        except Exception as exc:  # never let a hostile certificate escape as a crash
            hs.verdict = Verdict(False, "invalid_certificate", f"certificate rejected: {exc}")
            return False

    # -- decisions -------------------------------------------------------------

    def status_report(self) -> dict[str, object]:
        """What the control plane hears every few seconds (see `meshid ca status`).

        Within the report's limits (`meshid.report`), so a busy sidecar is never
        refused: a sample of connections and quarantined peers with a count of
        the rest, and the pairs with the most connections first.
        """
        svid = self.current_svid()
        pairs: dict[tuple[str, str], int] = {}
        listed: list[dict[str, object]] = []
        for entry in self.registry.live():
            if entry.peer_id is None or not entry.established:
                continue
            key = (entry.direction, str(entry.peer_id))
            pairs[key] = pairs.get(key, 0) + 1
            if len(listed) < report_limits.MAX_CONNECTIONS:
                listed.append(
                    {
                        "id": entry.id,
                        "direction": entry.direction,
                        "peer_id": str(entry.peer_id),
                        "peer_addr": entry.peer_addr,
                        "started": entry.started_wall.isoformat(),
                        "bytes_in": entry.bytes_in,
                        "bytes_out": entry.bytes_out,
                    }
                )
        established = sum(pairs.values())
        busiest = sorted(pairs.items(), key=lambda item: -item[1])[: report_limits.MAX_PAIRS]
        quarantined = sorted(self.quarantined().items())
        return {
            "svid_serial": f"{svid.serial:x}" if svid else None,
            "svid_not_after": svid.not_after.isoformat() if svid else None,
            "bundle_sequence": svid.bundle.sequence if svid else 0,
            "policy_version": self.policy.version,
            "revocation_version": self.policy.revocation_version,
            "live_connections": len(self.registry),
            "pairs": [{"direction": d, "peer_id": p, "count": n} for (d, p), n in sorted(busiest)],
            "connections": listed,
            "connections_omitted": established - len(listed),
            "quarantined": [
                {"peer": peer[: report_limits.MAX_TEXT], "seconds_left": round(left)}
                for peer, left in quarantined[: report_limits.MAX_QUARANTINED]
            ],
            "quarantined_omitted": max(0, len(quarantined) - report_limits.MAX_QUARANTINED),
        }

    # -- quarantine ------------------------------------------------------------

    def quarantined(self) -> dict[str, float]:
        """Blocked peers (SPIFFE IDs or source addresses) and the seconds they have left."""
        return self.quarantine.active(trio.current_time())

    def _blocked_address(self, host: str) -> bool:
        return self.quarantine.blocked(ADDRESS, host, trio.current_time())

    def _blocked_identity(self, peer: SpiffeId) -> bool:
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
            address=_host_of(entry.peer_addr),
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

    def _deny(
        self,
        entry: LiveConnection,
        verdict: Verdict,
        *,
        handshake: bool = True,
        proved: bool = False,
    ) -> None:
        """Log and count a refusal. `proved`: the peer completed its handshake (see quarantine)."""
        self._count_refusal(entry, verdict, proved)
        self.metrics.connections.labels(entry.direction, "deny", verdict.reason).inc()
        if handshake:
            self.metrics.handshake_failures.labels(entry.direction, verdict.reason).inc()
        self.events.emit(
            "decision",
            direction=entry.direction,
            decision="deny",
            reason=verdict.reason,
            detail=verdict.detail,
            local_id=str(self.identity),
            peer_id=str(verdict.peer_id) if verdict.peer_id else None,
            peer_addr=entry.peer_addr,
            conn_id=entry.id,
        )

    def _allow(self, entry: LiveConnection, verdict: Verdict, **extra: object) -> None:
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
            local_id=str(self.identity),
            peer_id=str(verdict.peer_id),
            peer_serial=f"{verdict.serial:x}" if verdict.serial is not None else None,
            peer_addr=entry.peer_addr,
            conn_id=entry.id,
            policy_version=self.policy.version,
            **extra,
        )

    # -- connection handling ---------------------------------------------------

    async def _connect(self, addr: Address) -> socket.socket:
        """A non-blocking TCP connection to `addr`, within connect_timeout. Raises OSError."""
        if _is_ip(addr.host):
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            targets: list[tuple[socket.AddressFamily, tuple[str, int]]] = [
                (family, (addr.host, addr.port))
            ]
        else:
            infos = await trio.socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
            targets = [(info[0], info[4][:2]) for info in infos]  # type: ignore[misc]
        last: OSError = OSError(errno.EHOSTUNREACH, "no address")
        with trio.move_on_after(self.limits.connect_timeout):
            for family, sockaddr in targets:
                try:
                    return await _connect_one(family, sockaddr)
                except OSError as exc:
                    last = exc
            raise last
        raise OSError(errno.ETIMEDOUT, "connect timed out")

    async def _handshake(
        self, tls: TlsStream, hs: Handshake, entry: LiveConnection
    ) -> Verdict | None:
        """Run the handshake; on refusal log it and return None."""
        with trio.move_on_after(self.limits.handshake_timeout) as timer:
            try:
                await self.metrics.timed_handshake(hs.direction, tls.handshake())
            except SSL.Error as exc:
                verdict = hs.verdict
                if verdict is None or verdict.allowed:
                    reason = handshake_failure_reason(exc)
                    verdict = Verdict(False, reason, f"TLS handshake failed: {reason}")
                self._deny(entry, verdict)
                if hs.direction == INBOUND:
                    await _linger(tls.sock)
                return None
        if timer.cancelled_caught:
            self._deny(entry, Verdict(False, "handshake_timeout", "TLS handshake took too long"))
            return None
        verdict = hs.verdict
        if verdict is None:  # a resumed session: OpenSSL did not call us, so judge now
            cert = tls.conn.get_peer_certificate()
            if cert is None:
                verdict = Verdict(False, "no_client_certificate", "peer sent no certificate")
            else:
                verdict = judge_facts(
                    self._leaf_facts(cert),
                    direction=hs.direction,
                    local_id=self.identity,
                    expected=hs.expected,
                    policy=self.policy,
                    now=self.wall(),
                    skew=self.skew,
                )
        elif verdict.allowed and verdict.peer_id is not None:
            # The callback judged under the policy of that moment; install_policy skips
            # connections still in their handshake, so judge the pair again under today's.
            pair = (
                (verdict.peer_id, self.identity)
                if hs.direction == INBOUND
                else (self.identity, verdict.peer_id)
            )
            decision = self.policy.decide(*pair)
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
            and self._blocked_identity(verdict.peer_id)
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
            self._deny(entry, verdict, proved=True)
            return None
        return verdict

    async def _inbound(
        self,
        sock: socket.socket,
        entry: LiveConnection,
        listener: Inbound,
        peer: tuple[str, int],
    ) -> tuple[socket.socket | None, TlsStream | None]:
        gen = self.generation
        assert gen is not None
        hs = Handshake(INBOUND, None)
        conn = SSL.Connection(gen.server, sock)
        conn.set_app_data(hs)
        conn.set_accept_state()
        tls = TlsStream(conn, sock)
        verdict = await self._handshake(tls, hs, entry)
        conn.set_app_data(None)  # judged: an idle connection need not keep the verdict
        if verdict is None:
            return None, tls
        self._allow(entry, verdict)
        header = b""
        if listener.proxy_protocol:
            # The peer's address is the one accept() gave: by now the peer may have
            # reset, and getpeername() on a reset socket fails.
            try:
                local = sock.getsockname()[:2]
            except OSError:
                raise StreamAborted("peer_reset") from None
            header = encode_v2(peer[:2], local, str(verdict.peer_id))
        try:
            app = await self.metrics.timed_connect(INBOUND, self._connect(listener.forward))
        except OSError:
            entry.close_reason = "app_unreachable"
            return None, tls
        if header:
            try:
                await _send_plain(app, header)
            except OSError:
                reset(app)
                entry.close_reason = "app_unreachable"
                return None, tls
            except BaseException:  # cancelled, or worse: the caller never learns of `app`
                reset(app)
                raise
        return app, tls

    async def _outbound(
        self, app: socket.socket, entry: LiveConnection, route: Outbound
    ) -> tuple[socket.socket | None, TlsStream | None]:
        decision = self.policy.decide(self.identity, route.identity)
        if not decision.allowed:
            self._deny(
                entry,
                Verdict(False, decision.reason, decision.explanation, route.identity),
                handshake=False,
            )
            return None, None
        gen = self.generation
        assert gen is not None
        try:
            up = await self.metrics.timed_connect(OUTBOUND, self._connect(route.upstream))
        except OSError as exc:
            self._deny(
                entry,
                Verdict(
                    False,
                    "upstream_unreachable",
                    f"cannot reach {route.upstream}: {exc.strerror or exc}",
                    route.identity,
                ),
                handshake=False,
            )
            return None, None
        try:
            hs = Handshake(OUTBOUND, route.identity)
            conn = SSL.Connection(gen.client, up)
            conn.set_app_data(hs)
            conn.set_connect_state()
            if route.sni:
                conn.set_tlsext_host_name(route.sni)
            key = str(route.upstream)
            session = gen.sessions.get(key)
            if session is not None:
                conn.set_session(session)
            tls = TlsStream(conn, up, sessions=gen.sessions, session_key=key)
            verdict = await self._handshake(tls, hs, entry)
            conn.set_app_data(None)
        except BaseException:  # the caller closes only what we return: `up` is ours to close
            reset(up)
            raise
        if verdict is None:
            return None, tls
        self._allow(entry, verdict, upstream=str(route.upstream))
        return up, tls

    async def _serve_connection(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        direction: str,
        setup: Callable[
            [socket.socket, LiveConnection],
            Awaitable[tuple[socket.socket | None, TlsStream | None]],
        ],
    ) -> None:
        """One connection's whole life, inside its failure boundary.

        Whatever goes wrong in here (a bug, a peer doing something no one
        foresaw, a socket call failing in an unexpected way) ends this
        connection only: it is logged once as `internal_error` with the
        exception's type, counted, and the connection's sockets are closed.
        Only `Exception` is caught: `trio.Cancelled` (and a group holding one,
        which is a BaseExceptionGroup) goes on up.
        """
        peer_addr = _fmt_addr(peer)
        entry: LiveConnection | None = None
        try:
            if self._refused_at_accept(sock, peer, direction, peer_addr):
                return
            scope = trio.CancelScope()
            entry = self.registry.open(direction, self.identity, peer_addr, scope, self.wall())
            await self._run_connection(sock, direction, setup, entry, scope)
        except Exception as exc:
            reset(sock)
            if entry is not None:
                self.registry.remove(entry)
                if entry.established:  # its close line never made it: count the close here
                    self.metrics.closes.labels(direction, INTERNAL_ERROR).inc()
            self._internal_error(direction, peer_addr, exc, entry)

    def _refused_at_accept(
        self, sock: socket.socket, peer: tuple[str, int], direction: str, peer_addr: str
    ) -> bool:
        """Quarantine of the source address and the connection cap, before any TLS."""
        reason = None
        detail = None
        if direction == INBOUND and self._blocked_address(peer[0]):
            reason, detail = QUARANTINED, f"{peer[0]} is quarantined after repeated refusals"
        elif len(self.registry) >= self.limits.max_connections:
            reason = "connection_limit"
        if reason is None:
            return False
        self.metrics.connections.labels(direction, "deny", reason).inc()
        self.events.emit(
            "decision",
            direction=direction,
            decision="deny",
            reason=reason,
            detail=detail,
            local_id=str(self.identity),
            peer_addr=peer_addr,
        )
        reset(sock)
        return True

    async def _run_connection(
        self,
        sock: socket.socket,
        direction: str,
        setup: Callable[
            [socket.socket, LiveConnection],
            Awaitable[tuple[socket.socket | None, TlsStream | None]],
        ],
        entry: LiveConnection,
        scope: trio.CancelScope,
    ) -> None:
        other: socket.socket | None = None
        tls: TlsStream | None = None
        aborted: str | None = None
        failure: Exception | None = None
        try:
            with scope:
                other, tls = await setup(sock, entry)
                if other is not None and tls is not None:
                    plain = sock if direction == OUTBOUND else other
                    await self.pump.copy(plain, tls, entry)
                    tls.keep_session()
        except StreamAborted as exc:
            aborted = exc.reason
        except Exception as exc:  # the failure boundary: this connection ends, nothing else
            aborted = INTERNAL_ERROR
            failure = exc
        finally:
            self.registry.remove(entry)
            reason = aborted or entry.close_reason or "closed"
            cut = aborted is not None or entry.close_reason is not None
            # A refused outbound handshake returns no `other`; its upstream socket is tls.sock.
            upstream = tls.sock if tls is not None and tls.sock is not sock else None
            for s in (sock, other) if other is not None else (sock, upstream):
                if s is None:
                    continue
                if cut and (s is not (tls.sock if tls else None)):
                    reset(s)
                else:
                    s.close()
        if failure is not None:
            self._internal_error(direction, entry.peer_addr, failure, entry)
        if entry.established:
            self._log_close(entry, reason)

    def _log_close(self, entry: LiveConnection, reason: str) -> None:
        self.changed()
        duration = trio.current_time() - entry.started
        self.metrics.closes.labels(entry.direction, reason).inc()
        self.events.emit(
            "close",
            direction=entry.direction,
            reason=reason,
            local_id=str(self.identity),
            peer_id=str(entry.peer_id),
            peer_addr=entry.peer_addr,
            conn_id=entry.id,
            bytes_in=entry.bytes_in,
            bytes_out=entry.bytes_out,
            duration_ms=round(duration * 1000, 1),
        )

    def _internal_error(
        self,
        direction: str,
        peer_addr: str | None,
        exc: BaseException,
        entry: LiveConnection | None = None,
    ) -> None:
        """Log and count a failure of ours inside one connection (or one accept).

        Only the exception's type is logged: its text may quote a certificate,
        a path or a peer's bytes. A connection that was already established
        is counted as a close with this reason (its close line says so too);
        one that was not, as a refused connection.
        """
        try:
            established = entry is not None and entry.established
            if not established:
                self.metrics.connections.labels(direction, "deny", INTERNAL_ERROR).inc()
            self.events.emit(
                INTERNAL_ERROR,
                reason=INTERNAL_ERROR,
                direction=direction,
                error=type(exc).__name__,
                established=established,
                local_id=str(self.identity),
                peer_addr=peer_addr,
                conn_id=entry.id if entry is not None else None,
            )
        except Exception:  # noqa: S110 - the log itself failing must not end the sidecar
            pass

    # -- listeners -------------------------------------------------------------

    @staticmethod
    def _bind(addr: Address) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr.host, addr.port))
            sock.listen(4096)
        except OSError as exc:
            sock.close()
            raise MeshIdError(
                f"cannot listen on {addr}: {exc.strerror}", reason="listen_failed"
            ) from None
        sock.setblocking(False)
        return sock

    async def _accept_loop(
        self,
        lsock: socket.socket,
        scope: trio.CancelScope,
        nursery: trio.Nursery,
        handler: Callable[[socket.socket, tuple[str, int]], Awaitable[None]],
        direction: str = INBOUND,
    ) -> None:
        """Accept until cancelled; a failed accept is that connection's problem, not the loop's."""
        with scope:
            while True:
                try:
                    sock, peer = _accept(lsock)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(lsock)
                    continue
                except OSError as exc:
                    if exc.errno in _ACCEPT_TRANSIENT:
                        continue  # that connection is gone already; the next may be fine
                    if exc.errno in _ACCEPT_EXHAUSTED:
                        self.events.emit("accept_failed", reason="resource_exhausted")
                        await trio.sleep(0.1)  # let connections close before accepting more
                        continue
                    self._internal_error(direction, None, exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                except Exception as exc:
                    self._internal_error(direction, None, exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                nursery.start_soon(handler, sock, peer)

    # -- background duties -----------------------------------------------------

    async def _sweep(self) -> None:
        """Idle timeout and peer-certificate expiry for live connections."""
        while True:
            await trio.sleep(self.sweep_interval)
            self.registry.close_where(self._overdue(trio.current_time(), self.wall()))

    def _overdue(self, now: float, wall: datetime) -> Callable[[LiveConnection], str | None]:
        idle = self.limits.idle_timeout
        expiry = self.limits.close_on_peer_expiry

        def overdue(entry: LiveConnection) -> str | None:
            if now - entry.last_activity > idle:
                return "idle_timeout"
            if expiry and entry.peer_not_after is not None and wall > entry.peer_not_after:
                return "peer_certificate_expired"
            return None

        return overdue

    def _load_static(self, source: StaticSource) -> None:
        svid = load_svid(source, self.identity, self.identity.trust_domain, self.wall(), self.skew)
        self.install_svid(svid, "static")
        self.count_renewal("ok")

    async def _watch_static(self, source: StaticSource) -> None:
        svid_files = (source.cert, source.key, source.bundle)
        seen_svid = tuple(stamp(p) for p in svid_files)
        seen_policy = stamp(source.policy) if source.policy else None
        version = self.policy.version
        while True:
            await trio.sleep(self.reload_interval)
            now_svid = tuple(stamp(p) for p in svid_files)
            if now_svid != seen_svid:
                seen_svid = now_svid
                try:
                    self._load_static(source)
                except MeshIdError as exc:
                    self.metrics.renewals.labels(result="error").inc()
                    self.events.emit(
                        "reload_failed",
                        reason=exc.reason,
                        detail=exc.message,
                        keeping_serial=(
                            f"{self.generation.svid.serial:x}" if self.generation else None
                        ),
                    )
            if source.policy is not None:
                now_policy = stamp(source.policy)
                if now_policy != seen_policy:
                    seen_policy = now_policy
                    try:
                        version += 1
                        self.install_policy(
                            load_policy(source.policy, self.identity.trust_domain, version)
                        )
                    except MeshIdError as exc:
                        self.events.emit("reload_failed", reason=exc.reason, detail=exc.message)

    # -- admin -----------------------------------------------------------------

    def route(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n")
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/readyz":
            status, text = self._readiness()
            return Response(status, text.encode())
        if path == "/metrics":
            return Response(
                200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
            )
        if path == "/svid":
            if self.generation is None:
                why = self._readiness()[1].splitlines()[0].removeprefix("not ready: ")
                missing = {"error": "no_credentials", "detail": f"no credentials yet: {why}"}
                return Response(503, json.dumps(missing).encode() + b"\n", "application/json")
            svid = self.generation.svid
            body = {
                "spiffe_id": str(svid.spiffe_id),
                "serial": f"{svid.serial:x}",
                "not_before": svid.leaf.not_valid_before_utc.isoformat(),
                "not_after": svid.not_after.isoformat(),
                "seconds_left": round(self.svid_seconds_left() or 0.0, 1),
                "bundle_sequence": svid.bundle.sequence,
                "policy_version": self.policy.version,
            }
            return Response(200, json.dumps(body).encode() + b"\n", "application/json")
        return Response(404, b"not found\n")

    def _readiness(self) -> tuple[int, str]:
        """/readyz: why not ready, else ready; a full state_dir is said but does not stop it."""
        return self.lifecycle.answer(
            now=trio.current_time(),
            svid_seconds_left=self.svid_seconds_left(),
            revoked=self.identity in self.policy.revoked,
            degraded=self.dynamic.state.describe() if self.dynamic else None,
        )

    # -- lifecycle -------------------------------------------------------------

    def request_drain(self) -> None:
        self._drain.set()

    async def run(
        self, *, task_status: trio.TaskStatus[Sidecar] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Admin listener first, then credentials and listeners; the admin listener goes last.

        Our own errors (a permanent enrollment failure, a port in use) leave as
        themselves, not wrapped in the admin nursery's exception group.
        """
        failure: MeshIdError | None = None
        try:
            async with trio.open_nursery() as admin_nursery:
                if self.config.admin is not None:
                    admin = await admin_nursery.start(
                        functools.partial(serve_admin, events=self.events),
                        self.config.admin,
                        self.route,
                    )
                    self.bound["admin"] = admin[0].socket.getsockname()[:2]
                    self.events.emit("admin_listening", listen=_fmt_addr(self.bound["admin"]))
                try:
                    await self._serve(task_status)
                except MeshIdError as exc:
                    failure = exc
                admin_nursery.cancel_scope.cancel()
        finally:
            self.ready = False
            self.lifecycle.phase = STOPPED
            self.stopped.set()
        if failure is not None:
            raise failure

    async def _serve(self, task_status: trio.TaskStatus[Sidecar]) -> None:
        source = self.config.source
        if isinstance(source, StaticSource):
            self._load_static(source)
            if source.policy is not None:
                self.install_policy(load_policy(source.policy, self.identity.trust_domain, 1))
        else:
            self.dynamic = DynamicIdentity(
                self,
                source,
                client=ControlClient(
                    source.server.host,
                    source.server.port,
                    self.identity.trust_domain,
                    skew=self.skew,
                ),
                pacing=self.pacing,
            )
            self.changed = self.dynamic.poke
            await self.dynamic.start()
        listeners: list[tuple[socket.socket, Callable[..., Awaitable[None]], str]] = []
        workload: PreparedWorkloadApi | None = None
        try:
            for i, ib in enumerate(self.config.inbound):
                lsock = self._bind(ib.listen)
                self.bound[f"inbound[{i}]"] = lsock.getsockname()[:2]
                listeners.append((lsock, self._inbound_handler(ib), INBOUND))
            for i, ob in enumerate(self.config.outbound):
                lsock = self._bind(ob.listen)
                self.bound[f"outbound[{i}]"] = lsock.getsockname()[:2]
                listeners.append((lsock, self._outbound_handler(ob), OUTBOUND))
            if self.config.workload_api is not None:
                workload = prepare_workload_api(self.config.workload_api)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pump.run)
                for lsock, handler, direction in listeners:
                    scope = trio.CancelScope()
                    self._accept_scopes.append(scope)
                    nursery.start_soon(self._accept_loop, lsock, scope, nursery, handler, direction)
                nursery.start_soon(self._sweep)
                if workload is not None:
                    self.workload_api = await nursery.start(
                        functools.partial(
                            serve_workload_api,
                            self,
                            workload,
                            self.dynamic.call if self.dynamic is not None else None,
                            registry=self.metrics.registry,
                        )
                    )
                if isinstance(source, StaticSource):
                    nursery.start_soon(self._watch_static, source)
                elif self.dynamic is not None:
                    nursery.start_soon(self.dynamic.run)
                self.ready = True
                self.lifecycle.phase = SERVING
                self.events.emit(
                    "started",
                    version=VERSION,
                    spiffe_id=str(self.identity),
                    listeners={k: _fmt_addr(v) for k, v in self.bound.items()},
                )
                task_status.started(self)
                await self._drain.wait()
                await self._shutdown(listeners, nursery)
        finally:
            for lsock, _, _ in listeners:
                lsock.close()
            if workload is not None:
                workload.close()
            self.ready = False

    async def _shutdown(
        self,
        listeners: list[tuple[socket.socket, Callable[..., Awaitable[None]], str]],
        nursery: trio.Nursery,
    ) -> None:
        self.ready = False
        self.lifecycle.phase = DRAINING
        self.draining = True
        for scope in self._accept_scopes:
            scope.cancel()
        for lsock, _, _ in listeners:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
        live = len(self.registry)
        self.events.emit("draining", live_connections=live, timeout_s=self.limits.drain_timeout)
        with trio.move_on_after(self.limits.drain_timeout):
            await self.registry.wait_empty()
        left = len(self.registry)
        if left:
            self.registry.close_all("drain_timeout")
            with trio.move_on_after(5):
                await self.registry.wait_empty()
        self.events.emit("stopped", drained=live - left, cut=left)
        nursery.cancel_scope.cancel()

    def _inbound_handler(
        self, listener: Inbound
    ) -> Callable[[socket.socket, tuple[str, int]], Awaitable[None]]:
        async def handle(sock: socket.socket, peer: tuple[str, int]) -> None:
            await self._serve_connection(
                sock, peer, INBOUND, lambda s, e: self._inbound(s, e, listener, peer)
            )

        return handle

    def _outbound_handler(
        self, route: Outbound
    ) -> Callable[[socket.socket, tuple[str, int]], Awaitable[None]]:
        async def handle(sock: socket.socket, peer: tuple[str, int]) -> None:
            await self._serve_connection(
                sock, peer, OUTBOUND, lambda s, e: self._outbound(s, e, route)
            )

        return handle


def _accept(lsock: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """One accepted connection, non-blocking, with Nagle off. BlockingIOError: none waiting."""
    sock, peer = lsock.accept()
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # some kernels refuse options on a connection reset before we saw it
        sock.close()
        raise OSError(errno.ECONNABORTED, "connection aborted before it was set up") from None
    except BaseException:
        sock.close()
        raise
    return sock, peer


async def _linger(sock: socket.socket, seconds: float = 1.0, limit: int = 65536) -> None:
    """Let the alert we just sent reach the peer before the socket closes.

    Closing a socket with unread bytes (the client's Finished, its first
    request) makes the kernel send a reset, which can overtake the alert: the
    refused client would see "connection reset" instead of why. So: FIN after
    the alert, then read and discard what is in flight, briefly and boundedly.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    seen = 0
    with trio.move_on_after(seconds):
        while seen < limit:
            try:
                data = sock.recv(16384)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            if not data:
                return
            seen += len(data)


async def _connect_one(family: socket.AddressFamily, sockaddr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except BaseException:
        sock.close()
        raise
    if err:
        sock.close()
        raise OSError(err, errno.errorcode.get(err, "connect failed"))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _send_plain(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
