"""One connection's life: setup in either direction, the hand-off to the pump, the close.

Theory of operation. Each listener has an accept loop, which a failed
accept never ends (running out of descriptors pauses it and is logged once a
second). An accepted socket gets a task that runs
`serve_connection`: the gate may refuse it at once (quarantined address,
connection cap); otherwise it is registered, set up (inbound: TLS handshake
with the peer, then the app connection and an optional PROXY header;
outbound: the allow-list, the upstream connection, then the TLS handshake),
pumped until both directions end, and closed with one `close` line. The
whole of it is one failure boundary: whatever goes wrong ends this
connection only, logged once as `internal_error` with the exception's type.
A connection takes the credentials current when it starts and keeps them.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio
from OpenSSL import SSL

from adminhttp import Throttle
from meshid.reasons import Reason
from sidecar.config import Address, Inbound, Limits, Outbound
from sidecar.events import EventLog
from sidecar.flow import StreamAborted, reset
from sidecar.gate import Gate, Handshake
from sidecar.metrics import Metrics
from sidecar.peer import INBOUND, OUTBOUND, Verdict, decide_pair
from sidecar.proxyproto import encode_v2
from sidecar.pump import Pump
from sidecar.registry import LiveConnection, Registry
from sidecar.sockets import (
    ACCEPT_BACKOFF,
    ACCEPT_EXHAUSTED,
    ACCEPT_TRANSIENT,
    accept,
    connect,
    fmt_addr,
    send_plain,
)
from sidecar.state import Current
from sidecar.tlsio import TlsStream

INTERNAL_ERROR = Reason.INTERNAL_ERROR

Handler = Callable[[socket.socket, tuple[str, int]], Awaitable[None]]


class Connections:
    def __init__(
        self,
        current: Current,
        gate: Gate,
        registry: Registry,
        pump: Pump,
        metrics: Metrics,
        events: EventLog,
        limits: Limits,
        *,
        throttle: Throttle,
        changed: Callable[[], None],
    ) -> None:
        self.current = current
        self.gate = gate
        self.registry = registry
        self.pump = pump
        self.metrics = metrics
        self.events = events
        self.limits = limits
        self.throttle = throttle  # accept_failed lines, once a second at most
        self.changed = changed
        self.mark: int | None = None  # SO_MARK for our own connections, under [transparent]

    async def accept_loop(
        self,
        lsock: socket.socket,
        scope: trio.CancelScope,
        nursery: trio.Nursery,
        handler: Handler,
        direction: str = INBOUND,
    ) -> None:
        """Accept until cancelled; a failed accept is that connection's problem, not the loop's."""
        with scope:
            while True:
                try:
                    sock, peer = accept(lsock)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(lsock)
                    continue
                except OSError as exc:
                    if exc.errno in ACCEPT_TRANSIENT:
                        continue  # that connection is gone already; the next may be fine
                    if exc.errno in ACCEPT_EXHAUSTED:
                        held = self.throttle.allow("accept_failed:resource_exhausted")
                        if held is not None:
                            self.events.emit(
                                "accept_failed",
                                reason=Reason.RESOURCE_EXHAUSTED,
                                suppressed=held or None,
                            )
                        await trio.sleep(0.1)  # let connections close before accepting more
                        continue
                    self.internal_error(direction, None, exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                except Exception as exc:
                    self.internal_error(direction, None, exc)
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                nursery.start_soon(handler, sock, peer)

    async def connect_to(self, addr: Address) -> socket.socket:
        return await connect(addr, self.limits.connect_timeout, self.mark)

    async def _inbound(
        self,
        sock: socket.socket,
        entry: LiveConnection,
        listener: Inbound,
        peer: tuple[str, int],
    ) -> tuple[socket.socket | None, TlsStream | None]:
        gen = self.current.generation
        assert gen is not None
        hs = Handshake(INBOUND, None, bundles=gen.bundles)
        conn = SSL.Connection(gen.server_context(self.current.clock.monotonic()), sock)
        conn.set_app_data(hs)
        conn.set_accept_state()
        tls = TlsStream(conn, sock)
        verdict = await self.gate.handshake(tls, hs, entry)
        conn.set_app_data(None)  # judged: an idle connection need not keep the verdict
        if verdict is None:
            return None, tls
        self.gate.allow(entry, verdict, resumed=hs.resumed)
        self.registry.establish(entry)
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
            app = await self.metrics.timed_connect(INBOUND, self.connect_to(listener.forward))
        except OSError:
            entry.close_reason = Reason.APP_UNREACHABLE
            return None, tls
        if header:
            try:
                await send_plain(app, header)
            except OSError:
                reset(app)
                entry.close_reason = Reason.APP_UNREACHABLE
                return None, tls
            except BaseException:  # cancelled, or worse: the caller never learns of `app`
                reset(app)
                raise
        return app, tls

    async def _outbound(
        self, app: socket.socket, entry: LiveConnection, route: Outbound
    ) -> tuple[socket.socket | None, TlsStream | None]:
        decision = decide_pair(self.current.policy, OUTBOUND, self.current.identity, route.identity)
        if not decision.allowed:
            self.gate.deny(
                entry,
                Verdict(False, decision.reason, decision.explanation, route.identity),
                handshake=False,
            )
            return None, None
        gen = self.current.generation
        assert gen is not None
        try:
            up = await self.metrics.timed_connect(OUTBOUND, self.connect_to(route.upstream))
        except OSError as exc:
            self.gate.deny(
                entry,
                Verdict(
                    False,
                    Reason.UPSTREAM_UNREACHABLE,
                    f"cannot reach {route.upstream}: {exc.strerror or exc}",
                    route.identity,
                ),
                handshake=False,
            )
            return None, None
        try:
            hs = Handshake(OUTBOUND, route.identity, bundles=gen.bundles)
            conn = SSL.Connection(gen.client, up)
            conn.set_app_data(hs)
            conn.set_connect_state()
            if route.sni:
                conn.set_tlsext_host_name(route.sni)
            key = str(route.upstream)
            session = gen.sessions.take(key, self.current.clock.monotonic())
            if session is not None:
                conn.set_session(session)
            tls = TlsStream(
                conn,
                up,
                sessions=gen.sessions,
                session_key=key,
                offered=session,
                clock=self.current.clock.monotonic,
            )
            verdict = await self.gate.handshake(tls, hs, entry)
            conn.set_app_data(None)
        except BaseException:  # the caller closes only what we return: `up` is ours to close
            reset(up)
            raise
        if verdict is None:
            return None, tls
        self.gate.allow(entry, verdict, upstream=str(route.upstream), resumed=hs.resumed)
        self.registry.establish(entry)
        return up, tls

    # The setups of the captured listeners (sidecar/capture.py), which route per connection.
    async def setup_inbound(
        self, sock: socket.socket, entry: LiveConnection, listener: Inbound, peer: tuple[str, int]
    ) -> tuple[socket.socket | None, TlsStream | None]:
        return await self._inbound(sock, entry, listener, peer)

    async def setup_outbound(
        self, sock: socket.socket, entry: LiveConnection, route: Outbound
    ) -> tuple[socket.socket | None, TlsStream | None]:
        return await self._outbound(sock, entry, route)

    async def serve_connection(
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
        peer_addr = fmt_addr(peer)
        entry: LiveConnection | None = None
        try:
            if self.gate.refused_at_accept(peer, direction, peer_addr, len(self.registry)):
                reset(sock)
                return
            scope = trio.CancelScope()
            entry = self.registry.open(
                direction, self.current.identity, peer_addr, scope, self.current.wall()
            )
            await self._run_connection(sock, direction, setup, entry, scope)
        except Exception as exc:
            reset(sock)
            if entry is not None:
                self.registry.remove(entry)
                if entry.established:  # its close line never made it: count the close here
                    self.metrics.closes.labels(direction, INTERNAL_ERROR).inc()
            self.internal_error(direction, peer_addr, exc, entry)

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
            reason = aborted or entry.close_reason or Reason.CLOSED
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
            self.internal_error(direction, entry.peer_addr, failure, entry)
        if entry.established:
            self.log_close(entry, reason)

    def log_close(self, entry: LiveConnection, reason: str) -> None:
        self.changed()
        duration = trio.current_time() - entry.started
        self.metrics.closes.labels(entry.direction, reason).inc()
        self.events.emit(
            "close",
            direction=entry.direction,
            reason=reason,
            local_id=str(self.current.identity),
            peer_id=str(entry.peer_id),
            peer_addr=entry.peer_addr,
            original_dst=entry.original_dst,  # a captured connection's; a cut names it too
            conn_id=entry.id,
            bytes_in=entry.bytes_in,
            bytes_out=entry.bytes_out,
            duration_ms=round(duration * 1000, 1),
        )

    def internal_error(
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
                local_id=str(self.current.identity),
                peer_addr=peer_addr,
                conn_id=entry.id if entry is not None else None,
            )
        except Exception:  # noqa: S110 - the log itself failing must not end the sidecar
            pass

    def inbound_handler(
        self, listener: Inbound
    ) -> Callable[[socket.socket, tuple[str, int]], Awaitable[None]]:
        async def handle(sock: socket.socket, peer: tuple[str, int]) -> None:
            await self.serve_connection(
                sock, peer, INBOUND, lambda s, e: self._inbound(s, e, listener, peer)
            )

        return handle

    def outbound_handler(
        self, route: Outbound
    ) -> Callable[[socket.socket, tuple[str, int]], Awaitable[None]]:
        async def handle(sock: socket.socket, peer: tuple[str, int]) -> None:
            await self.serve_connection(
                sock, peer, OUTBOUND, lambda s, e: self._outbound(s, e, route)
            )

        return handle
