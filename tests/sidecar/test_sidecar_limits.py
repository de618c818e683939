"""Limits: many connections at once, and the timeouts and caps that protect the sidecar.

Each limit is configured short or small, and each test checks both sides of
it: what crosses the limit is cut with its reason, what stays within it is
left alone.
"""

from __future__ import annotations

import functools
import struct

import pytest
import trio
from sidecar_helpers import Backend, connect, metric, receive_exactly, roundtrip, wait_cut
from sidecar_mesh import Mesh, start_pair

CONCURRENT = 500


@pytest.mark.slow  # ~4 s on two cores: 1000 mTLS handshakes in one process
async def test_500_concurrent_connections(mesh: Mesh, backend: Backend) -> None:
    pair = await start_pair(mesh, backend)
    opened = 0
    all_open = trio.Event()
    peak: dict[str, float] = {}

    async def one(i: int) -> None:
        nonlocal opened
        stream = await connect(pair.app)
        async with stream:
            message = struct.pack("!I", i) * 4
            await stream.send_all(message)
            assert await receive_exactly(stream, len(message)) == message
            opened += 1
            if opened == CONCURRENT:
                peak["api"] = metric(pair.api.sidecar, "meshid_live_connections")
                peak["web"] = metric(pair.web.sidecar, "meshid_live_connections")
                all_open.set()
            await all_open.wait()

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for i in range(CONCURRENT):
                nursery.start_soon(one, i)
        await pair.api.log.wait_for("close", count=CONCURRENT)
        await pair.web.log.wait_for("close", count=CONCURRENT)
    # All of them were open through both sidecars at the same moment.
    assert peak == {"api": CONCURRENT, "web": CONCURRENT}
    assert backend.accepted == CONCURRENT
    for side in (pair.api, pair.web):
        assert len(side.log.find("decision", decision="allow")) == CONCURRENT
        assert not side.log.find("decision", decision="deny")
        assert {r["reason"] for r in side.log.find("close")} == {"closed"}
        assert metric(side.sidecar, "meshid_live_connections") == 0
        assert len(side.sidecar.registry) == 0


async def test_handshake_timeout_cuts_a_silent_client_only(mesh: Mesh, backend: Backend) -> None:
    pair = await start_pair(mesh, backend, api_limits={"handshake_timeout": 0.3})
    with trio.fail_after(20):
        good = await connect(pair.app)
        async with good:
            await good.send_all(b"before")
            assert await receive_exactly(good, 6) == b"before"
            silent = await connect(pair.api.inbound)
            async with silent:
                assert await wait_cut(silent) == b""  # sends nothing, so the deadline cuts it
            [deny] = await pair.api.log.wait_for("decision", decision="deny")
            # The good connection, older than the handshake limit, is untouched.
            await good.send_all(b"after")
            assert await receive_exactly(good, 5) == b"after"
    assert deny["reason"] == "handshake_timeout"
    assert "peer_id" not in deny
    api = pair.api.sidecar
    assert metric(api, "meshid_handshake_failures_total", reason="handshake_timeout") == 1
    assert metric(api, "meshid_connections_total", decision="allow") == 1
    assert not pair.api.log.find("close")  # the good one is still open


async def test_handshake_timeout_cuts_a_silent_upstream_only(
    mesh: Mesh, backend: Backend, nursery: trio.Nursery
) -> None:
    """Outbound: an upstream that accepts TCP and never answers the ClientHello is cut."""
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)  # kept open, never read from: no TLS answer, no FIN
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    upstream = listeners[0].socket.getsockname()[:2]
    pair = await start_pair(mesh, backend, api_allows=[("web", "api"), ("web2", "api")])
    web = await mesh.start(
        "web2",
        outbound=[("api", pair.api.inbound), ("api", upstream)],
        allow=[("web2", "api")],
        limits={"handshake_timeout": 0.3},
    )
    good_addr, silent_addr = web.outbound(0), web.outbound(1)
    with trio.fail_after(20):
        good = await connect(good_addr)
        async with good:
            await good.send_all(b"before")
            assert await receive_exactly(good, 6) == b"before"
            stuck = await connect(silent_addr)
            async with stuck:
                assert await wait_cut(stuck) == b""
            [deny] = await web.log.wait_for("decision", decision="deny")
            await good.send_all(b"after")
            assert await receive_exactly(good, 5) == b"after"
    assert deny["reason"] == "handshake_timeout"
    assert deny["direction"] == "outbound"
    assert metric(web.sidecar, "meshid_handshake_failures_total", reason="handshake_timeout") == 1
    assert metric(web.sidecar, "meshid_connections_total", decision="allow") == 1


async def test_idle_timeout_cuts_the_idle_connection_only(mesh: Mesh, backend: Backend) -> None:
    pair = await start_pair(mesh, backend, api_limits={"idle_timeout": 0.5})
    with trio.fail_after(20):
        idle = await connect(pair.app)
        busy = await connect(pair.app)
        async with idle, busy:
            for stream in (idle, busy):
                await stream.send_all(b"hi")
                assert await receive_exactly(stream, 2) == b"hi"
            idle_cut = trio.Event()

            async def watch_idle() -> None:
                assert await wait_cut(idle) == b""
                idle_cut.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_idle)
                # Keep `busy` busy until the idle one is cut (bounded by the deadline above).
                for i in range(1_000_000):
                    if idle_cut.is_set():
                        break
                    byte = bytes([i % 256])
                    await busy.send_all(byte)
                    assert await receive_exactly(busy, 1) == byte
            await busy.send_all(b"still")
            assert await receive_exactly(busy, 5) == b"still"
            [close] = await pair.api.log.wait_for("close")
            live = metric(pair.api.sidecar, "meshid_live_connections", direction="inbound")
    assert live == 1  # busy
    assert close["reason"] == "idle_timeout"
    assert close["bytes_in"] == close["bytes_out"] == 2
    assert metric(pair.api.sidecar, "meshid_connections_closed_total", reason="idle_timeout") == 1


async def test_max_connections(mesh: Mesh, backend: Backend) -> None:
    pair = await start_pair(mesh, backend, api_limits={"max_connections": 2})
    with trio.fail_after(20):
        first, second = await connect(pair.app), await connect(pair.app)
        async with first:
            async with second:
                for stream in (first, second):
                    await stream.send_all(b"in")
                    assert await receive_exactly(stream, 2) == b"in"
                third = await connect(pair.app)
                async with third:
                    await third.send_all(b"me too")
                    assert await wait_cut(third) == b""
                [deny] = await pair.api.log.wait_for("decision", decision="deny")
                # The two within the limit are undisturbed.
                for stream in (first, second):
                    await stream.send_all(b"ok")
                    assert await receive_exactly(stream, 2) == b"ok"
            await pair.api.log.wait_for("close", count=1)
            # One slot is free again: a new connection gets through.
            assert await roundtrip(pair.app, b"my turn") == b"my turn"
    assert deny["reason"] == "connection_limit"
    assert backend.accepted == 3
    api = pair.api.sidecar
    assert metric(api, "meshid_connections_total", decision="deny", reason="connection_limit") == 1
    assert metric(api, "meshid_connections_total", decision="allow") == 3
