"""The Workload API's HTTP/2 server against clients that misbehave, and against many.

A raw h2 client (tests/sidecar/workload_helpers.py) does what real clients
never do: opens a stream and says nothing, never reads, sends a malformed
frame. The server is the real one, on a real Unix socket, serving the SVIDs
our own authority issues; what it says is decoded with py-spiffe's generated
protobuf classes, an independent reader of the same messages.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import h2.events
import h2.settings
import pytest
import trio
from sidecar_helpers import TD, LogCapture, utcnow
from sidecar_mesh import Pki
from spiffe._proto import workload_pb2
from workload_helpers import H2Client, raw_call, short_dir

from meshid.events import EventLog
from meshid.spiffeid import SpiffeId
from sidecar.credentials import Svid
from sidecar.workload.grpc import Limits
from sidecar.workload.run import WorkloadApi, serve_workload_api
from sidecar.workload.settings import WorkloadApiConfig

WEB = SpiffeId(TD, "/web")


@dataclass
class Host:
    svid: Svid
    events: EventLog
    svid_listeners: list[Callable[[Svid], None]] = field(default_factory=list)
    identity: SpiffeId = WEB

    def current_svid(self) -> Svid | None:
        return self.svid

    def wall_now(self) -> datetime:
        return utcnow()

    def install(self, svid: Svid) -> None:
        self.svid = svid
        for listener in self.svid_listeners:
            listener(svid)


def make_svid(pki: Pki) -> Svid:
    creds = pki.issue("web")
    from meshid.bundle import TrustBundle

    bundle = TrustBundle(TD, (pki.root,))
    return Svid.check(list(creds.chain), creds.key, bundle, WEB, utcnow())


@dataclass
class Served:
    host: Host
    api: WorkloadApi
    socket: Path
    log: LogCapture


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


async def serve(
    nursery: trio.Nursery, pki: Pki, directory: Path, limits: Limits | None = None
) -> Served:
    log = LogCapture()
    host = Host(make_svid(pki), EventLog(log))
    config = WorkloadApiConfig(directory / "api.sock", frozenset({os.getuid()}), frozenset())
    api = await nursery.start(serve_workload_api, host, config, None, limits)
    return Served(host, api, config.socket, log)


@pytest.fixture
async def served(nursery: trio.Nursery, pki: Pki, sock_dir: Path) -> AsyncIterator[Served]:
    yield await serve(nursery, pki, sock_dir, Limits(request_timeout=0.5, write_timeout=1.0))


def serial_of(message: bytes) -> int:
    from cryptography import x509

    response = workload_pb2.X509SVIDResponse.FromString(message)
    return x509.load_der_x509_certificate(response.svids[0].x509_svid[:4096]).serial_number


async def test_a_stream_that_sends_nothing_is_reset_and_others_are_served(
    served: Served,
) -> None:
    with trio.fail_after(10):
        silent = await H2Client.connect(served.socket)
        sid = await silent.call("FetchX509SVID", message=None)
        # the server keeps serving others meanwhile
        other = await trio.to_thread.run_sync(
            lambda: raw_call(served.socket, "FetchX509SVID", stream=True)
        )
        assert serial_of(other[0]) == served.host.svid.serial
        await silent.wait(lambda: silent.streams[sid].reset)
        await silent.aclose()


async def test_a_client_that_never_speaks_is_dropped(served: Served) -> None:
    import socket as stdsocket

    with trio.fail_after(10):
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        await sock.connect(str(served.socket))
        stream = trio.SocketStream(sock)
        while await stream.receive_some(65536):
            pass  # the server's SETTINGS, then EOF when it gives up on us
        await stream.aclose()
    assert served.api.server.connections == 0


async def test_a_client_that_never_reads_holds_bounded_memory(served: Served, pki: Pki) -> None:
    """Window 0: nothing can be sent; 300 renewals later the server holds one message per stream."""
    renewals = [make_svid(pki) for _ in range(3)]
    with trio.fail_after(20):
        client = await H2Client.connect(
            served.socket, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
        )
        sids = [await client.call("FetchX509SVID") for _ in range(20)]
        await client.wait(lambda: all(client.streams[s].headers for s in sids))
        tracemalloc.start()
        try:
            await trio.lowlevel.checkpoint()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(300):
                served.host.install(renewals[i % 3])
                await trio.lowlevel.checkpoint()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # 20 streams x one ~2 KB message would be ~40 KB; a queue of 300 x 20 would be 12 MB.
        assert grown < 1_000_000, grown
        assert not any(client.streams[s].messages for s in sids)
        await client.aclose()


async def test_a_client_that_never_reads_the_socket_is_dropped(served: Served, pki: Pki) -> None:
    """A huge window but a socket nobody reads: the write times out and the connection goes."""
    with trio.fail_after(20):
        client = await H2Client.connect(
            served.socket, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
        )
        client.h2.increment_flow_control_window(2**31 - 1 - 65535)
        await client.flush()
        for _ in range(50):
            await client.call("FetchX509SVID")
        svids = [make_svid(pki) for _ in range(3)]
        for i in range(200):
            served.host.install(svids[i % 3])
            await trio.lowlevel.checkpoint()
            if served.log.find("workload_api_drop"):
                break
        await served.log.wait_for("workload_api_drop", reason="workload_api_slow_reader")
        while await client.stream.receive_some(1 << 20):
            pass  # what the server had sent, then EOF: it closed the connection
        assert served.api.server.connections == 0
        await client.aclose()


async def test_a_malformed_frame_gets_goaway_and_the_server_lives(served: Served) -> None:
    with trio.fail_after(10):
        client = await H2Client.connect(served.socket)
        # A SETTINGS frame whose length is not a multiple of 6: FRAME_SIZE_ERROR.
        await client.stream.send_all(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5)
        while not client.closed and client.terminated is None:
            await client.pump()
        assert client.terminated is not None
        assert client.terminated.error_code != 0
        await client.aclose()
        other = await trio.to_thread.run_sync(
            lambda: raw_call(served.socket, "FetchX509SVID", stream=True)
        )
        assert serial_of(other[0]) == served.host.svid.serial
    assert served.log.find("workload_api_drop", reason="workload_api_protocol_error")


async def test_200_streaming_callers_all_get_the_renewal(served: Served, pki: Pki) -> None:
    with trio.fail_after(30):
        clients = [await H2Client.connect(served.socket) for _ in range(200)]
        sids = [await c.call("FetchX509SVID") for c in clients]

        async def first(c: H2Client, sid: int) -> None:
            await c.wait(lambda: len(c.streams[sid].messages) >= 1)

        async with trio.open_nursery() as n:
            for c, sid in zip(clients, sids, strict=True):
                n.start_soon(first, c, sid)
        renewed = make_svid(pki)
        served.host.install(renewed)

        async def second(c: H2Client, sid: int) -> None:
            await c.wait(lambda: len(c.streams[sid].messages) >= 2)
            assert serial_of(c.streams[sid].messages[-1]) == renewed.serial

        async with trio.open_nursery() as n:
            for c, sid in zip(clients, sids, strict=True):
                n.start_soon(second, c, sid)
        assert served.api.server.connections == 200
        for c in clients:
            await c.aclose()


async def test_a_caller_that_leaves_mid_stream_leaves_nothing(served: Served, pki: Pki) -> None:
    with trio.fail_after(10):
        client = await H2Client.connect(served.socket)
        sids = [await client.call("FetchX509SVID") for _ in range(50)]
        await client.wait(lambda: all(client.streams[s].messages for s in sids))
        assert served.api.server.connections == 1
        await client.aclose()
        while served.api.server.connections:  # noqa: ASYNC110 - the server notices the EOF
            await trio.sleep(0.01)
        served.host.install(make_svid(pki))  # a renewal finds no stream left to feed
        await trio.lowlevel.checkpoint()
        # and the server still serves
        other = await trio.to_thread.run_sync(
            lambda: raw_call(served.socket, "FetchX509SVID", stream=True)
        )
        assert serial_of(other[0]) == served.host.svid.serial


async def test_connections_past_the_limit_are_closed(
    nursery: trio.Nursery, pki: Pki, sock_dir: Path
) -> None:
    served = await serve(nursery, pki, sock_dir, Limits(max_connections=2))
    with trio.fail_after(10):
        kept = [await H2Client.connect(served.socket) for _ in range(2)]
        for c in kept:
            await c.pump()  # the server's SETTINGS: this connection is being served
        extra: H2Client | None = None
        try:
            extra = await H2Client.connect(served.socket)
            while not extra.closed:
                await extra.pump()  # EOF: closed at once
        except trio.BrokenResourceError:
            pass  # or reset, as it closed with our preface unread
        finally:
            if extra is not None:
                await extra.aclose()
        assert served.log.find("workload_api_drop", reason="workload_api_too_many_connections")
        sid = await kept[0].call("FetchX509SVID")
        await kept[0].wait(lambda: bool(kept[0].streams[sid].messages))
        for c in kept:
            await c.aclose()


async def test_ping_is_answered_during_an_idle_stream(served: Served) -> None:
    with trio.fail_after(10):
        client = await H2Client.connect(served.socket)
        sid = await client.call("FetchX509SVID")
        await client.wait(lambda: bool(client.streams[sid].messages))
        client.h2.ping(b"8 bytes!")
        await client.flush()
        acked: list[bytes] = []
        while not acked:
            data = await client.stream.receive_some(65536)
            assert data
            for event in client.h2.receive_data(data):
                if isinstance(event, h2.events.PingAckReceived):
                    acked.append(event.ping_data)
        assert acked == [b"8 bytes!"]
        await client.aclose()
