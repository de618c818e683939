"""Streamed watches against peers on a slow link: the authority's fan-out and its stop.

Real TLS on 127.0.0.1 against a real `ControlPlane`. The slow peer is a real
socket with small kernel buffers that the test leaves unread, so the
authority's write of a large feed line blocks until the test reads it.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio
from ca_helpers import TD, Clock
from cryptography import x509
from test_control_keepalive import WEB, CountingPlane, Served, held, serial
from test_watch_stream import API, Watcher

from ca.authority import Authority
from ca.server import ServerOptions
from meshid.spiffeid import SpiffeId
from meshid.wire import WatchQuery
from sidecar.control import HeldIdentity

SMALL_BUFFER = 4096  # bytes; the kernel doubles it, still far below one line of the feed


class SlowLinkPlane(CountingPlane):
    """The control plane, with a small send buffer on the connections of `slow` serials."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slow: set[int] = set()

    async def _serve_http(
        self, stream: trio.SSLStream[trio.SocketStream], source: str, cert: x509.Certificate | None
    ) -> None:
        if cert is not None and cert.serial_number in self.slow:
            stream.transport_stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        await super()._serve_http(stream, source, cert)


@asynccontextmanager
async def serving(state: Path, clock: Clock) -> AsyncIterator[tuple[Served, trio.CancelScope]]:
    """A control plane on a free port, and the scope that stops it; a long `request_timeout`:
    a blocked write outlives the test unless something other than its timeout ends it."""
    authority = Authority.open(state, clock=clock)
    server = SlowLinkPlane(
        Authority.open(state, clock=clock),
        ServerOptions(host="127.0.0.1", port=0, request_timeout=20.0, poll_interval=0.05),
        log=lambda event, **f: None,
        clock=clock,
    )
    try:
        async with trio.open_nursery() as own:
            _host, port = await own.start(server.serve)
            served = Served(server, authority, port, authority.bundle().to_pem(), clock)
            yield served, own.cancel_scope
            served.client.drop()
            own.cancel_scope.cancel()
    finally:
        server.authority.close()
        authority.close()


@dataclass
class Unread:
    """A streamed watch over a socket with a small receive buffer, read only when asked."""

    stream: trio.SSLStream[trio.SocketStream]
    http: h11.Connection
    pending: bytearray

    async def first_bytes(self) -> None:
        """Read until the first bytes of a line arrive: its write has begun."""
        while not self.pending:
            await self._next()

    async def read_until(self, policy_version: int) -> list[dict[str, Any]]:
        """Read the stream's lines until one carries `policy_version`; all of them."""
        docs: list[dict[str, Any]] = []
        while not docs or docs[-1]["policy_version"] != policy_version:
            await self._next()
            while (end := self.pending.find(b"\n")) >= 0:
                line = bytes(self.pending[:end])
                del self.pending[: end + 1]
                if line.strip():
                    docs.append(json.loads(line))
        return docs

    async def _next(self) -> None:
        """One event of the answer; its body's bytes go to `pending`."""
        event = self.http.next_event()
        if event is h11.NEED_DATA:
            chunk = await self.stream.receive_some(4096)
            assert chunk, "the authority ended the stream"
            self.http.receive_data(bytes(chunk))
        elif isinstance(event, h11.Data):
            self.pending += event.data
        else:
            assert isinstance(event, h11.Response) and event.status_code == 200, event


async def unread_stream(served: Served, ident: HeldIdentity, tmp: Path) -> Unread:
    """A streamed watch from the versions held now, whose answer stays unread."""
    pem = tmp / "svid.pem"  # the key too: 0600, as every key file
    pem.touch(mode=0o600)
    pem.write_bytes(ident.pem)
    ctx = ssl.create_default_context(cadata=served.bundle_pem.decode())
    ctx.check_hostname = False
    ctx.load_cert_chain(pem)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    await sock.connect(("127.0.0.1", served.port))
    stream = trio.SSLStream(trio.SocketStream(sock), ctx)
    http = h11.Connection(h11.CLIENT)
    query = WatchQuery(*served.authority.versions(), wait=30, stream=True)
    request = h11.Request(method="GET", target=query.target(), headers=[("host", "ca")])
    await stream.send_all((http.send(request) or b"") + (http.send(h11.EndOfMessage()) or b""))
    return Unread(stream, http, bytearray())


async def parked(served: Served, count: int) -> None:
    while served.server._watching < count:  # noqa: ASYNC110 (the server's own counter)
        await trio.sleep(0.01)


def large_allow_list(authority: Authority) -> None:
    """A whole feed of ~300 KiB for WEB: one line far larger than the slow link's buffers."""
    authority.apply_policy((str(SpiffeId(TD, f"/svc{i}")), str(WEB)) for i in range(3000))


async def test_a_slow_stream_sends_no_other_watch_a_feed_twice(state: Path, clock: Clock) -> None:
    """A stream that finished writing an older feed does not take the authority's versions
    back to that feed's: every other watch would wake and be sent the feed it has."""
    async with serving(state, clock) as (served, _stop):
        authority = served.authority
        large_allow_list(authority)
        slow_ident = held(authority)
        served.server.slow.add(serial(slow_ident))
        watcher = Watcher(served, held(authority, API))
        with trio.fail_after(30):
            slow = await unread_stream(served, slow_ident, state.parent)
            async with trio.open_nursery() as nursery:
                query = WatchQuery(*authority.versions(), wait=30, delta=True, stream=True)
                nursery.start_soon(watcher.watch, query)
                await parked(served, 2)
                first = authority.allow(API, WEB)  # the slow stream's line blocks on it
                await watcher.until(1)
                second = authority.allow(WEB, API)  # seen while that line is being written
                await watcher.until(2)
                docs = await slow.read_until(second)  # its write of `first` completes
                assert [d["policy_version"] for d in docs] == [first, second]
                third = authority.allow(API, SpiffeId(TD, "/db"))
                while watcher.feeds[-1].policy_version != third:
                    await watcher.arrived.wait()
                nursery.cancel_scope.cancel()
        await trio.aclose_forcefully(slow.stream)
    assert [f.policy_version for f in watcher.feeds] == [first, second, third]


async def test_the_authority_stops_at_once_while_writing_to_a_slow_stream(
    state: Path, clock: Clock
) -> None:
    """Stopping does not wait for a line's write to a peer that does not read (up to
    `request_timeout`, 20 s here): the line is cut and the connection closed."""
    with trio.fail_after(30):
        async with serving(state, clock) as (served, stop):
            authority = served.authority
            large_allow_list(authority)
            slow_ident = held(authority)
            served.server.slow.add(serial(slow_ident))
            slow = await unread_stream(served, slow_ident, state.parent)
            await parked(served, 1)
            authority.allow(API, WEB)  # a line of ~300 KiB for the slow stream
            await slow.first_bytes()  # the rest of the line waits in the authority's write
            started = trio.current_time()
            stop.cancel()
        stopped = trio.current_time() - started
        await trio.aclose_forcefully(slow.stream)
    assert stopped < 5
