"""The data path end to end: every byte, in order, both ways, and every end of stream.

app -> web's outbound sidecar -> api's inbound sidecar -> local app, over real
sockets. Large transfers are checked by hash, tiny writes byte by byte, and
half-close with bytes still in flight in both orders.
"""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import trio
from sidecar_helpers import (
    API,
    Backend,
    closed_port,
    connect,
    echo,
    metric,
    receive_all,
    receive_exactly,
    roundtrip,
    wait_cut,
)
from sidecar_mesh import Mesh, Pair, start_pair

MiB = 1 << 20


async def _send_in_chunks(stream: trio.SocketStream, data: bytes, chunk: int = 256 * 1024) -> None:
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        await stream.send_all(view[start : start + chunk])


async def _hash_until_eof(stream: trio.SocketStream, limit: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    for _ in range(limit // 1024 + 10):  # at most limit bytes in pieces of at least ~1 KiB
        data = await stream.receive_some(256 * 1024)
        if not data:
            return digest.hexdigest(), total
        digest.update(data)
        total += len(data)
    raise AssertionError(f"no EOF after {total} bytes")


async def test_64_mib_each_way_arrives_intact(mesh: Mesh) -> None:
    size = 64 * MiB
    up = os.urandom(size)
    down = os.urandom(size)
    got: dict[str, tuple[str, int]] = {}
    backend_done = trio.Event()

    async def app(stream: trio.SocketStream) -> None:
        async def send() -> None:
            await _send_in_chunks(stream, down)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got["backend"] = await _hash_until_eof(stream, size + MiB)
        backend_done.set()

    backend = Backend(app)
    await mesh.nursery.start(backend.serve)
    pair = await start_pair(mesh, backend)
    with trio.fail_after(60):
        stream = await connect(pair.app)
        async with stream:

            async def send() -> None:
                await _send_in_chunks(stream, up)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                got["client"] = await _hash_until_eof(stream, size + MiB)
        await backend_done.wait()
        [api_close] = await pair.api.log.wait_for("close")
        [web_close] = await pair.web.log.wait_for("close")
    assert got["backend"] == (hashlib.sha256(up).hexdigest(), size)
    assert got["client"] == (hashlib.sha256(down).hexdigest(), size)
    assert (api_close["bytes_in"], api_close["bytes_out"], api_close["reason"]) == (
        size,
        size,
        "closed",
    )
    assert (web_close["bytes_in"], web_close["bytes_out"], web_close["reason"]) == (
        size,
        size,
        "closed",
    )
    assert metric(pair.api.sidecar, "meshid_bytes_total", direction="inbound", flow="in") == size


async def test_one_byte_writes_arrive_in_order(mesh: Mesh) -> None:
    async def trickle_echo(stream: trio.SocketStream) -> None:
        # Echo every byte as a write of its own.
        for _ in range(100_000):
            data = await stream.receive_some(1)
            if not data:
                break
            await stream.send_all(data)
        await stream.send_eof()

    backend = Backend(trickle_echo)
    await mesh.nursery.start(backend.serve)
    pair = await start_pair(mesh, backend)
    payload = bytes(random.Random(1).randrange(256) for _ in range(2000))
    with trio.fail_after(30):
        stream = await connect(pair.app)
        async with stream:
            # Lock-step first: each byte crosses both sidecars alone, as a TLS record of one byte.
            for i in range(200):
                await stream.send_all(payload[i : i + 1])
                assert await stream.receive_some(10) == payload[i : i + 1]
            # Then a burst of one-byte writes without waiting.
            for i in range(200, len(payload)):
                await stream.send_all(payload[i : i + 1])
            await stream.send_eof()
            assert await receive_all(stream) == payload[200:]
        [api_close] = await pair.api.log.wait_for("close")
        [web_close] = await pair.web.log.wait_for("close")
    assert api_close["bytes_in"] == api_close["bytes_out"] == len(payload)
    assert web_close["bytes_in"] == web_close["bytes_out"] == len(payload)
    assert api_close["reason"] == web_close["reason"] == "closed"


@pytest.mark.parametrize("first", ["app", "backend"])
async def test_half_close_with_data_in_flight(first: str, mesh: Mesh) -> None:
    """Whichever side ends its half first: all its bytes, then EOF; the other half lives on.

    The side that closes first sends its data and its EOF back to back, while
    the other side is still sending; the other side keeps sending after it
    has seen that EOF, and its bytes and EOF must arrive too.
    """
    size = 2 * MiB
    from_app = os.urandom(size)
    from_backend = os.urandom(size)
    backend_got: list[bytes] = []

    async def talk(stream: trio.SocketStream, mine: bytes, closes_first: bool) -> bytes:
        """Send `mine` (half of it only after the peer's EOF unless we close first); read all."""
        theirs_ended = trio.Event()
        received = bytearray()

        async def reader() -> None:
            received.extend(await receive_all(stream, limit=size))
            theirs_ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            if closes_first:
                await _send_in_chunks(stream, mine)
                await stream.send_eof()
            else:
                await _send_in_chunks(stream, mine[: size // 2])
                await theirs_ended.wait()
                await _send_in_chunks(stream, mine[size // 2 :])
                await stream.send_eof()
        return bytes(received)

    backend_done = trio.Event()

    async def app(stream: trio.SocketStream) -> None:
        backend_got.append(await talk(stream, from_backend, closes_first=first == "backend"))
        backend_done.set()

    backend = Backend(app)
    await mesh.nursery.start(backend.serve)
    pair = await start_pair(mesh, backend)
    with trio.fail_after(30):
        stream = await connect(pair.app)
        async with stream:
            app_got = await talk(stream, from_app, closes_first=first == "app")
        await backend_done.wait()
        [api_close] = await pair.api.log.wait_for("close")
        [web_close] = await pair.web.log.wait_for("close")
    assert backend_got == [from_app]
    assert app_got == from_backend
    for close in (api_close, web_close):
        assert (close["reason"], close["bytes_in"], close["bytes_out"]) == ("closed", size, size)


async def test_garbage_on_the_mtls_port_is_refused_and_the_sidecar_carries_on(
    pair: Pair,
) -> None:
    junk = random.Random(7).randbytes(4096)
    with trio.fail_after(20):
        for probe in (junk, b"GET / HTTP/1.1\r\nHost: api\r\n\r\n"):
            stream = await connect(pair.api.inbound)
            async with stream:
                await stream.send_all(probe)
                assert await wait_cut(stream) == b""
        denies = await pair.api.log.wait_for("decision", decision="deny", count=2)
        assert await roundtrip(pair.app, b"still here") == b"still here"
    assert [d["reason"] for d in denies] == ["not_tls", "plaintext_http"]
    assert pair.backend.accepted == 1
    api = pair.api.sidecar
    assert metric(api, "meshid_handshake_failures_total", reason="not_tls") == 1
    assert metric(api, "meshid_handshake_failures_total", reason="plaintext_http") == 1
    assert metric(api, "meshid_connections_total", decision="allow") == 1


async def test_local_app_down_closes_the_connection_then_recovers(mesh: Mesh) -> None:
    app_sock = await closed_port()
    backend = Backend()
    backend.addr = app_sock.getsockname()[:2]
    pair = await start_pair(mesh, backend)
    with trio.fail_after(20):
        stream = await connect(pair.app)
        async with stream:
            await stream.send_all(b"anyone home?")
            assert await wait_cut(stream) == b""
        [api_close] = await pair.api.log.wait_for("close")
        [web_close] = await pair.web.log.wait_for("close")
        # The app comes up on the same port: the next connection goes through.
        await mesh.nursery.start(backend.serve_on, app_sock)
        assert await roundtrip(pair.app, b"now?") == b"now?"
    assert api_close["reason"] == "app_unreachable"
    # api cut the TLS stream (abnormal end, so no close_notify): TCP FIN or, with our
    # bytes still unread on its side, RST. Either way web passes the cut on to the app.
    assert web_close["reason"] in ("peer_truncated", "peer_reset")
    assert backend.accepted == 1
    api = pair.api.sidecar
    assert metric(api, "meshid_connections_closed_total", reason="app_unreachable") == 1
    assert metric(api, "meshid_connections_closed_total", reason="closed") == 1


async def test_upstream_down_closes_the_app_connection_then_recovers(
    mesh: Mesh, backend: Backend
) -> None:
    up_sock = await closed_port()
    host, port = up_sock.getsockname()[:2]
    web = await mesh.start("web", outbound=[("api", (host, port))], allow=[("web", "api")])
    with trio.fail_after(20):
        stream = await connect(web.outbound())
        async with stream:
            await stream.send_all(b"anyone home?")
            assert await wait_cut(stream) == b""
        [deny] = await web.log.wait_for("decision", decision="deny")
        assert deny["reason"] == "upstream_unreachable"
        assert deny["peer_id"] == API
        assert metric(web.sidecar, "meshid_connections_total", reason="upstream_unreachable") == 1
        # api comes up on that very port: the next connection goes through.
        up_sock.close()
        api = await mesh.start(
            "api", forward=backend.addr, allow=[("web", "api")], listen=(host, port)
        )
        assert await roundtrip(web.outbound(), b"now?") == b"now?"
    assert api.inbound == (host, port)


async def test_a_busy_stream_does_not_starve_a_small_one(mesh: Mesh) -> None:
    """One pump task moves every connection: a stream that always has bytes must share it."""
    bulk_received = 0
    flowing = trio.Event()

    async def app(stream: trio.SocketStream) -> None:
        nonlocal bulk_received
        first = await stream.receive_some(65536)
        if not first.startswith(b"BULK"):
            await stream.send_all(first)
            await echo(stream)
            return
        bulk_received += len(first)
        for _ in range(100_000):
            data = await stream.receive_some(256 * 1024)
            if not data:
                return
            bulk_received += len(data)
            if bulk_received >= 8 * MiB:
                flowing.set()

    backend = Backend(app)
    await mesh.nursery.start(backend.serve)
    pair = await start_pair(mesh, backend)
    stop = trio.Event()
    chunk = b"BULK" + os.urandom(256 * 1024 - 4)

    async def bulk() -> None:
        stream = await connect(pair.app)
        async with stream:
            for _ in range(20_000):  # at most 5 GiB; stopped long before
                if stop.is_set():
                    break
                await stream.send_all(chunk)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bulk)
            await flowing.wait()
            start = bulk_received
            stream = await connect(pair.app)
            async with stream:
                for i in range(50):
                    message = f"ping {i}".encode()
                    await stream.send_all(message)
                    assert await receive_exactly(stream, len(message)) == message
            # The bulk stream kept moving while the small one took its 50 turns.
            assert bulk_received > start
            stop.set()
        # Both connections leave the pump when they close.
        for running in (pair.web, pair.api):
            await running.sidecar.registry.wait_empty()
            assert len(running.sidecar.pump) == 0


async def test_without_the_direct_binding_the_public_wrappers_carry_the_stream(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy loop calls SSL_read/SSL_write directly; if pyOpenSSL moves them, it falls back."""
    monkeypatch.setattr("sidecar.tlsio._SSL_read", None)
    backend = Backend()
    await mesh.nursery.start(backend.serve)
    pair = await start_pair(mesh, backend)
    payload = os.urandom(3 * MiB + 7)
    with trio.fail_after(30):
        assert await roundtrip(pair.app, payload) == payload
        [api_close] = await pair.api.log.wait_for("close")
    assert api_close["reason"] == "closed"
    assert api_close["bytes_in"] == api_close["bytes_out"] == len(payload)


async def _random_writer(stream: trio.SocketStream, rng: random.Random, total: int) -> str:
    """Write `total` random bytes in random pieces (one byte to 200 KiB), then half-close."""
    digest = hashlib.sha256()
    left = total
    while left:
        size = min(left, rng.choice((1, 7, 1400, 16384, 16385, 65536, 200_000)))
        data = rng.randbytes(size)
        digest.update(data)
        await stream.send_all(data)
        left -= size
        if rng.random() < 0.3:
            await trio.lowlevel.checkpoint()
    await stream.send_eof()
    return digest.hexdigest()


async def _random_reader(stream: trio.SocketStream, rng: random.Random, limit: int) -> str:
    """Read until EOF in random sizes; small reads now and then make the sender wait."""
    digest = hashlib.sha256()
    total = 0
    for _ in range(limit):  # at least one byte per read, so EOF comes within `limit` reads
        data = await stream.receive_some(rng.choice((1, 100, 4096, 65536, 262144)))
        if not data:
            return digest.hexdigest()
        digest.update(data)
        total += len(data)
        assert total <= limit
    raise AssertionError("no EOF")


@pytest.mark.parametrize("seed", range(8))
async def test_random_traffic_arrives_intact_both_ways(seed: int, mesh: Mesh) -> None:
    """Random write sizes, read sizes and half-close order, checked by hash both ways."""
    rng = random.Random(seed)
    up_size, down_size = rng.randrange(1, 3 * MiB), rng.randrange(0, 3 * MiB)
    backend_seed, client_seed = rng.random(), rng.random()
    results: dict[str, str] = {}
    app_done = trio.Event()

    async def app(stream: trio.SocketStream) -> None:
        brng = random.Random(backend_seed)
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                results["down_sent"] = await _random_writer(stream, brng, down_size)

            nursery.start_soon(write)
            results["up_received"] = await _random_reader(stream, brng, up_size + 1)
        app_done.set()

    backend = Backend(app)
    await mesh.nursery.start(backend.serve)
    pair = await start_pair(mesh, backend)
    crng = random.Random(client_seed)
    with trio.fail_after(60):
        stream = await connect(pair.app)
        async with stream, trio.open_nursery() as nursery:

            async def write() -> None:
                results["up_sent"] = await _random_writer(stream, crng, up_size)

            nursery.start_soon(write)
            results["down_received"] = await _random_reader(stream, crng, down_size + 1)
        [api_close] = await pair.api.log.wait_for("close")
        await app_done.wait()
    assert not backend.errors
    assert results["up_received"] == results["up_sent"]
    assert results["down_received"] == results["down_sent"]
    assert (api_close["bytes_in"], api_close["bytes_out"]) == (up_size, down_size)
    assert api_close["reason"] == "closed"
