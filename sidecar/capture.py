"""Captured connections: the listeners of `[transparent]`, routed by their original destination.

Outbound: the app connected to a peer's real address and the rules sent the
connection here; the identity that serves that address (the address map, from
the control plane) is required of the server, the allow-list applies, and
mTLS goes to the original address, where the peer host's capture hands it to
its inbound sidecar. An unmapped destination is refused (`unknown_destination`)
or, when configured, passed through as plain TCP.

Inbound: a connection from another host to an app port was sent here; it is
terminated like any inbound one (mTLS required, allow-list applied) and
forwarded to the app at the address it was going to. Plaintext never reaches
the app: the handshake refuses it (`not_tls`, `plaintext_http`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping

import trio

from meshid.errors import MeshIdError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from sidecar.config import Address, Inbound, Outbound
from sidecar.connection import Connections
from sidecar.flow import reset
from sidecar.peer import INBOUND, OUTBOUND, Verdict
from sidecar.registry import LiveConnection
from sidecar.tlsio import TlsStream
from sidecar.transparent import Transparent, original_destination

Endpoint = tuple[str, int]
Setup = tuple[socket.socket | None, TlsStream | None]
PASSTHROUGH_CHUNK = 65536


class Capture:
    """The two captured listeners' handlers and the address map they route by."""

    def __init__(
        self,
        connections: Connections,
        config: Transparent,
        *,
        original_dst: Callable[[socket.socket], Endpoint] = original_destination,
    ) -> None:
        self.connections = connections
        self.config = config
        self.original_dst = original_dst
        self.addresses: dict[Endpoint, SpiffeId] = {}
        connections.mark = config.mark

    def bind(
        self,
        listeners: list[tuple[socket.socket, Callable[..., Awaitable[None]], str]],
        bound: dict[str, tuple[str, int]],
    ) -> None:
        """Bind both capture ports, adding them to `listeners` (which the caller closes)."""
        for name, port, handler, direction in (
            ("transparent.outbound", self.config.outbound_port, self.outbound_handler(), OUTBOUND),
            ("transparent.inbound", self.config.inbound_port, self.inbound_handler(), INBOUND),
        ):
            for j, lsock in enumerate(bind_capture(port)):
                bound[f"{name}[{j}]"] = lsock.getsockname()[:2]
                listeners.append((lsock, handler, direction))

    def advertised(self) -> tuple[str, ...]:
        """`advertise` as the status report carries it: IP:PORT, IPv6 in brackets."""
        return tuple(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.config.advertise)

    def install_map(self, addresses: Mapping[Endpoint, SpiffeId]) -> None:
        """The address map as the control plane sent it; connections take it when they start."""
        self.addresses = dict(addresses)

    def _destination(self, sock: socket.socket, entry: LiveConnection) -> Endpoint | None:
        """The original destination, recorded on the connection for its decision line."""
        try:
            dst = self.original_dst(sock)
            local = sock.getsockname()
        except (OSError, ValueError):
            return None
        if dst == (local[0], local[1]):
            # Not redirected: someone dialled the capture port itself. Passing it on to
            # where it was going would connect the sidecar to itself, again and again.
            return None
        entry.original_dst = f"[{dst[0]}]:{dst[1]}" if ":" in dst[0] else f"{dst[0]}:{dst[1]}"
        return dst

    def _refuse(self, entry: LiveConnection, detail: str) -> Setup:
        verdict = Verdict(False, Reason.UNKNOWN_DESTINATION, detail)
        self.connections.gate.deny(entry, verdict, handshake=False)
        return None, None

    async def _outbound(self, sock: socket.socket, entry: LiveConnection) -> Setup:
        dst = self._destination(sock, entry)
        if dst is None:
            return self._refuse(entry, "no original destination: the connection was not captured")
        upstream = Address(dst[0], dst[1])
        identity = self.addresses.get(dst)
        if identity is None:
            if self.config.unknown_destination == "passthrough":
                await self._passthrough(sock, entry, upstream)
                return None, None
            return self._refuse(entry, f"no identity is known to serve {upstream}")
        route = Outbound(listen=upstream, upstream=upstream, identity=identity)
        return await self.connections.setup_outbound(sock, entry, route)

    async def _inbound(self, sock: socket.socket, entry: LiveConnection, peer: Endpoint) -> Setup:
        dst = self._destination(sock, entry)
        if dst is None or dst[1] not in self.config.app_ports:
            return self._refuse(entry, "not a captured connection to an app port")
        app = Address(dst[0], dst[1])
        listener = Inbound(listen=app, forward=app)
        return await self.connections.setup_inbound(sock, entry, listener, peer)

    async def _passthrough(self, sock: socket.socket, entry: LiveConnection, to: Address) -> None:
        """Plain TCP to an unmeshed destination, as configured: copied both ways until closed."""
        try:
            up = await self.connections.connect_to(to)
        except OSError as exc:
            verdict = Verdict(False, Reason.UPSTREAM_UNREACHABLE, f"cannot reach {to}: {exc}")
            self.connections.gate.deny(entry, verdict, handshake=False)
            return
        self.connections.metrics.connections.labels(
            OUTBOUND, "passthrough", Reason.UNKNOWN_DESTINATION
        ).inc()
        self.connections.events.emit(
            "decision",
            direction=OUTBOUND,
            decision="passthrough",
            reason=Reason.UNKNOWN_DESTINATION,
            local_id=str(self.connections.current.identity),
            peer_addr=entry.peer_addr,
            upstream=str(to),
            original_dst=entry.original_dst,
            conn_id=entry.id,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, sock, up)
                nursery.start_soon(_copy, up, sock)
        finally:
            reset(up)

    def outbound_handler(self) -> Callable[[socket.socket, Endpoint], Awaitable[None]]:
        async def handle(sock: socket.socket, peer: Endpoint) -> None:
            await self.connections.serve_connection(
                sock, peer, OUTBOUND, lambda s, e: self._outbound(s, e)
            )

        return handle

    def inbound_handler(self) -> Callable[[socket.socket, Endpoint], Awaitable[None]]:
        async def handle(sock: socket.socket, peer: Endpoint) -> None:
            await self.connections.serve_connection(
                sock, peer, INBOUND, lambda s, e: self._inbound(s, e, peer)
            )

        return handle


async def _copy(src: socket.socket, dst: socket.socket) -> None:
    """Bytes from `src` to `dst` until `src` ends; then half-close `dst`."""
    while True:
        try:
            data = src.recv(PASSTHROUGH_CHUNK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        except OSError:
            return
        if not data:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[dst.send(view) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst)
            except OSError:
                return


def bind_capture(port: int) -> list[socket.socket]:
    """Listeners on every address at `port`: IPv4, and IPv6 (v6 only) where the host has it."""
    out: list[socket.socket] = []
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(4096)
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET:
                raise MeshIdError(
                    f"cannot listen on 0.0.0.0:{port}: {exc.strerror}", reason=Reason.LISTEN_FAILED
                ) from None
            continue
        sock.setblocking(False)
        out.append(sock)
    return out
