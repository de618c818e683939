"""Abuse of the mTLS ports, both sides: junk, truncation, resets at every handshake step, silence.

Inbound, the test is a client of api's mTLS port that drives a real TLS 1.3
handshake (the stdlib's, over memory buffers) and stops or resets at a
chosen step. Outbound, the test is the upstream web's sidecar dials: it
plays a real TLS server the same way, with api's own SVID, and misbehaves at
a chosen step. After each, the sidecar must have refused or closed just that
connection with a reason, and still serve an allowed peer.
"""

from __future__ import annotations

import contextlib
import functools
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from sidecar_helpers import (
    Addr,
    Backend,
    LogCapture,
    client_context,
    connect,
    roundtrip,
    server_context,
    wait_cut,
)
from sidecar_mesh import Mesh, Pair, Pki, Running, start_pair

HANDSHAKE_TIMEOUT = 0.5


def _reset(sock: trio.socket.SocketType) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def _send(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def _drain(sock: trio.socket.SocketType) -> None:
    """Read until the other side closes or resets (callers bound this with fail_after)."""
    for _ in range(10_000):
        try:
            if not await sock.recv(65536):
                return
        except OSError:
            return
    raise AssertionError("never closed")


def _pump_until_done(tls: ssl.SSLObject, incoming: ssl.MemoryBIO) -> Callable[[bytes], bool]:
    """Feed bytes to `tls`; True once its handshake has completed."""

    def feed(data: bytes) -> bool:
        incoming.write(data)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    return feed


async def _refused_or_closed(log: LogCapture) -> dict[str, object]:
    """The first refusal or close in `log`, waiting for one (callers bound this)."""
    for _ in range(10_000):
        found = log.find("decision", decision="deny") + log.find("close")
        if found:
            return found[0]
        await log.wait_for(count=len(log.records) + 1)
    raise AssertionError("neither refused nor closed")


async def _no_internal_error(*logs: LogCapture) -> None:
    for log in logs:
        assert not log.find("internal_error"), log.find("internal_error")


# -- inbound: the test is a hostile client of api's mTLS port ---------------------------

INBOUND_STAGES = [
    "tcp_then_reset",
    "tcp_then_silence",
    "partial_hello_then_reset",
    "partial_hello_then_eof",
    "partial_hello_then_silence",
    "hello_then_reset",
    "server_flight_then_reset",
    "partial_client_flight_then_reset",
    "handshake_then_reset",
]


async def _hostile_client(addr: Addr, ctx: ssl.SSLContext, stage: str, api: Running) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=None)
    sock = trio.socket.socket()
    await sock.connect(addr)
    try:
        if stage == "tcp_then_reset":
            return
        if stage == "tcp_then_silence":
            await _drain(sock)  # the handshake deadline cuts us
            return
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        if stage.startswith("partial_hello"):
            await _send(sock, hello[: len(hello) // 2])
            if stage.endswith("eof"):
                sock.shutdown(socket.SHUT_WR)
            if not stage.endswith("reset"):
                await _drain(sock)
            return
        await _send(sock, hello)
        if stage == "hello_then_reset":
            return
        feed = _pump_until_done(tls, incoming)
        for _ in range(1000):
            data = await sock.recv(65536)
            assert data, "api closed during its own flight"
            if feed(data):
                break
        flight = outgoing.read()
        if stage == "server_flight_then_reset":
            return
        if stage == "partial_client_flight_then_reset":
            await _send(sock, flight[: len(flight) // 2])
            return
        await _send(sock, flight)
        await api.log.wait_for("decision", decision="allow")  # api is pumping: now reset
    finally:
        _reset(sock)


@pytest.mark.parametrize("stage", INBOUND_STAGES)
async def test_inbound_survives_abuse_at_every_handshake_step(
    stage: str, mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path
) -> None:
    pair = await start_pair(mesh, backend, api_limits={"handshake_timeout": HANDSHAKE_TIMEOUT})
    ctx = client_context(tmp_path, pki.bundle_pem, pki.issue("web"))
    with trio.fail_after(20):
        live = await connect(pair.app)
        async with live:
            await live.send_all(b"live")
            await _hostile_client(pair.api.inbound, ctx, stage, pair.api)
            if stage == "handshake_then_reset":
                [close] = await pair.api.log.wait_for("close")
                assert close["reason"] in ("peer_reset", "peer_truncated")
            else:
                [deny] = await pair.api.log.wait_for("decision", decision="deny")
                expected = "handshake_timeout" if stage.endswith("silence") else None
                assert expected is None or deny["reason"] == expected, deny
            # the live connection was not disturbed, and a new one gets through
            assert await live.receive_some(4) == b"live"
            assert await roundtrip(pair.app, b"next") == b"next"
    await _no_internal_error(pair.api.log, pair.web.log)


async def test_inbound_refuses_random_junk(mesh: Mesh, backend: Backend) -> None:
    """Random byte prefixes, some dressed as TLS records; none reaches the app."""
    pair = await start_pair(mesh, backend, api_limits={"handshake_timeout": HANDSHAKE_TIMEOUT})
    rng = random.Random(1729)  # fixed: a failure must be reproducible
    prefixes = [rng.randbytes(rng.randrange(1, 600)) for _ in range(20)]
    for kind in (0x14, 0x15, 0x16, 0x17):  # record types with a random body
        body = rng.randbytes(rng.randrange(0, 300))
        prefixes.append(bytes([kind, 3, rng.choice((1, 3, 4))]) + struct.pack("!H", 0x4000) + body)
    prefixes += [b"\x80\x2e\x01\x03\x01" + rng.randbytes(40), b"\x16\x03\x01\x00", b"\x00"]
    with trio.fail_after(60):
        for prefix in prefixes:
            stream = await connect(pair.api.inbound)
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(prefix)
                    await stream.send_eof()
                await wait_cut(stream)
        await pair.api.log.wait_for("decision", decision="deny", count=len(prefixes))
        assert await roundtrip(pair.app, b"after junk") == b"after junk"
    assert backend.accepted == 1  # only the allowed peer's connection
    await _no_internal_error(pair.api.log)


# -- outbound: the test is the upstream web dials, with api's own SVID -------------------

OUTBOUND_STAGES = [
    "reset_on_accept",
    "silence",
    "garbage_reply",
    "hello_then_reset",
    "partial_flight_then_reset",
    "partial_flight_then_eof",
    "flight_then_reset",
    "handshake_then_reset",
]


# The ServerHello random that marks a HelloRetryRequest (RFC 8446, 4.1.3).
HELLO_RETRY = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def _hostile_upstream(
    stage: str, ctx: ssl.SSLContext
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(stream: trio.SocketStream) -> None:
        sock = stream.socket
        try:
            if stage == "reset_on_accept":
                return
            if stage == "silence":
                await _drain(sock)
                return
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
            feed = _pump_until_done(tls, incoming)
            flight = b""
            for _ in range(1000):  # the whole ClientHello, however it was cut into segments
                data = await sock.recv(65536)
                if not data:
                    return
                feed(data)
                if outgoing.pending:
                    flight = outgoing.read()
                    if HELLO_RETRY not in flight:
                        break
                    # This server lacks the client's first key share: a HelloRetryRequest
                    # and a second ClientHello come first, as with any such server.
                    await _send(sock, flight)
            if stage == "garbage_reply":
                await _send(sock, b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(range(256)))
                sock.shutdown(socket.SHUT_WR)
                await _drain(sock)
                return
            if stage == "hello_then_reset":
                return
            if stage.startswith("partial_flight"):
                await _send(sock, flight[: len(flight) // 2])
                if stage.endswith("eof"):
                    sock.shutdown(socket.SHUT_WR)
                    await _drain(sock)
                return
            await _send(sock, flight)
            if stage == "flight_then_reset":
                return
            for _ in range(1000):
                data = await sock.recv(65536)
                if not data or feed(data):
                    break
        except OSError:
            pass  # the sidecar cut us first: that is its right
        finally:
            _reset(sock)

    return handle


@pytest.mark.parametrize("stage", OUTBOUND_STAGES)
async def test_outbound_survives_an_upstream_misbehaving_at_every_step(
    stage: str, mesh: Mesh, backend: Backend, pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    api = await mesh.start("api", forward=backend.addr, allow=[("web", "api")])
    # the impostor holds api's real SVID, so the handshake can get as far as the stage says
    handler = _hostile_upstream(stage, server_context(tmp_path, pki.issue("api")))
    [listener] = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), handler, 0
    )
    hostile: Addr = listener.socket.getsockname()[:2]
    web = await mesh.start(
        "web",
        outbound=[("api", hostile), ("api", api.inbound)],
        allow=[("web", "api")],
        limits={"handshake_timeout": HANDSHAKE_TIMEOUT},
    )
    pair = Pair(web, api, backend)
    good = web.outbound(1)
    with trio.fail_after(20):
        live = await connect(good)
        async with live:
            await live.send_all(b"live")
            victim = await connect(web.outbound(0))
            async with victim:
                with contextlib.suppress(trio.BrokenResourceError):
                    await victim.send_all(b"to the impostor")
                assert await wait_cut(victim) == b""
            if stage == "handshake_then_reset":
                [close] = await web.log.wait_for("close")
                assert close["reason"] in ("peer_reset", "peer_truncated"), close
            elif stage == "flight_then_reset":
                # web's side of a TLS 1.3 handshake may complete before the reset lands
                ended = await _refused_or_closed(web.log)
                assert ended.get("reason") in ("connection_closed", "peer_reset", "peer_truncated")
            else:
                [deny] = await web.log.wait_for("decision", decision="deny")
                if stage == "silence":
                    assert deny["reason"] == "handshake_timeout"
            assert await live.receive_some(4) == b"live"
            assert await roundtrip(good, b"next") == b"next"
    await _no_internal_error(pair.api.log, pair.web.log)
