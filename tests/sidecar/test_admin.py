"""The admin listener: every method answered, deadlines, connection caps, a failure boundary.

Each test runs the real listener on 127.0.0.1 port 0, either inside a running
sidecar (the `pair` fixture) or on its own with a small router and limits
injected, so that a deadline can be seconds long in production and a fraction
of a second here.
"""

from __future__ import annotations

import errno
import json
from functools import partial

import pytest
import trio
from sidecar_helpers import Addr, LogCapture, connect, receive_all, receive_exactly, wait_cut
from sidecar_mesh import Pair

from meshid.events import EventLog
from sidecar.admin import (
    AdminLimits,
    Gate,
    Response,
    Router,
    Throttle,
    answer,
    serve_admin,
    serve_admin_listeners,
)
from sidecar.config import Address

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), and whatever followed the head."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers, body


async def exchange(addr: Addr, request: bytes, *, source: str | None = None) -> bytes:
    """Send `request` (which should ask for Connection: close) and read until EOF."""
    stream = await connect_from(addr, source)
    async with stream:
        await stream.send_all(request)
        return await receive_all(stream, limit=1 << 20)


async def connect_from(addr: Addr, source: str | None) -> trio.SocketStream:
    """A TCP connection to `addr`, from a chosen loopback address (all of 127/8 is ours)."""
    if source is None:
        return await connect(addr)
    sock = trio.socket.socket()
    try:
        await sock.bind((source, 0))
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def healthz(addr: Addr, *, source: str | None = None) -> int:
    status, _, body = parse(await exchange(addr, HEALTHZ, source=source))
    assert (status, body) == (200, b"ok\n")
    return status


def router(raise_on: str | None = None) -> Router:
    def route(method: str, path: str) -> Response:
        assert method == "GET", "the listener asks the router for GET only"
        if path == raise_on:
            raise ValueError("boom: the password is hunter2")
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/metrics":
            return Response(200, b"x" * 5000)
        return Response(404, b"not found\n")

    return route


async def start_admin(
    nursery: trio.Nursery,
    *,
    route: Router | None = None,
    limits: AdminLimits | None = None,
) -> tuple[Addr, LogCapture]:
    log = LogCapture()
    listeners = await nursery.start(
        lambda task_status: serve_admin(
            Address("127.0.0.1", 0),
            route or router(),
            limits=limits or AdminLimits(),
            events=EventLog(log),
            task_status=task_status,
        )
    )
    return listeners[0].socket.getsockname()[:2], log


# -- against a running sidecar -------------------------------------------------


async def test_head_is_answered_without_a_body_and_the_sidecar_keeps_proxying(
    pair: Pair,
) -> None:
    with trio.fail_after(20):
        live = await connect(pair.app)
        async with live:
            await live.send_all(b"before")
            assert await receive_exactly(live, 6) == b"before"
            for side in (pair.api, pair.web):
                get = parse(await exchange(side.admin, HEALTHZ))
                head = parse(await exchange(side.admin, HEALTHZ.replace(b"GET", b"HEAD", 1)))
                assert head[0] == 200
                assert head[2] == b""
                assert head[1]["content-length"] == get[1]["content-length"] == "3"
                status, headers, body = parse(
                    await exchange(
                        side.admin,
                        b"HEAD /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    )
                )
                assert (status, body) == (200, b"")
                assert int(headers["content-length"]) > 100
            await live.send_all(b"after")
            assert await receive_exactly(live, 5) == b"after"
        assert not pair.api.sidecar.stopped.is_set()
        assert not pair.web.sidecar.stopped.is_set()
        await healthz(pair.api.admin)


@pytest.mark.parametrize(
    ("request_line", "status"),
    [
        (b"OPTIONS /healthz HTTP/1.1", 405),
        (b"OPTIONS * HTTP/1.1", 405),
        (b"POST /metrics HTTP/1.1", 405),
        (b"DELETE /svid HTTP/1.1", 405),
        (b"CONNECT admin:80 HTTP/1.1", 405),
        (b"BREW /healthz HTTP/1.1", 501),
        (b"G@T /healthz HTTP/1.1", 400),
        (b"GET /healthz HTTP/9.9", 505),
        (b"GET /healthz HTTP/1.2", 200),
        (b"GET /healthz HTTP/1.0", 200),
        (b"GET /healthz", 400),
        (b"GET /health\x00z HTTP/1.1", 400),
    ],
)
async def test_every_method_gets_an_answer(pair: Pair, request_line: bytes, status: int) -> None:
    request = request_line + b"\r\nHost: admin\r\nConnection: close\r\n\r\n"
    with trio.fail_after(10):
        got, headers, _ = parse(await exchange(pair.api.admin, request))
        assert got == status
        if status == 405:
            assert headers["allow"] == "GET, HEAD"
        await healthz(pair.api.admin)
    assert not pair.api.log.find("admin_error")


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"HEAD /healthz HTTP/2.0\r\nHost: a\r\n", 505),
        (b"HEAD /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 99999\r\n", 413),
        (b"HEAD /nope HTTP/1.1\r\nHost: a\r\n", 404),
    ],
)
async def test_no_answer_to_head_carries_a_body(
    pair: Pair, request_head: bytes, status: int
) -> None:
    with trio.fail_after(10):
        raw = await exchange(pair.api.admin, request_head + b"Connection: close\r\n\r\n")
        got, headers, body = parse(raw)
        assert (got, body) == (status, b"")
        assert int(headers["content-length"]) > 0
        await healthz(pair.api.admin)
    assert not pair.api.log.find("admin_error")


async def test_a_small_body_is_read_and_a_large_one_refused(pair: Pair) -> None:
    with trio.fail_after(10):
        small = b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        chunked = (
            b"GET /readyz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        stream = await connect(pair.api.admin)
        async with stream:
            # Two requests with bodies on one kept-alive connection, then a huge promise.
            await stream.send_all(small + chunked)
            big = b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n"
            await stream.send_all(big)
            raw = await wait_cut(stream)
        assert raw.count(b"HTTP/1.1 200 ") == 2
        assert raw.count(b"HTTP/1.1 413 ") == 1
        await healthz(pair.api.admin)


async def test_one_source_cannot_take_every_admin_connection(pair: Pair) -> None:
    """Past the per-source cap a new connection is closed at once; others still get in."""
    admin = pair.api.admin
    with trio.fail_after(20):
        held = [await connect(admin) for _ in range(AdminLimits().max_per_source)]
        try:
            extra = await connect(admin)
            async with extra:
                assert await wait_cut(extra) == b""
            await healthz(admin, source="127.0.0.2")
            # The held connections are served, not just counted.
            await held[0].send_all(HEALTHZ)
            assert parse(await receive_all(held[0]))[0] == 200
        finally:
            for stream in held:
                await stream.aclose()
        [refused] = await pair.api.log.wait_for("admin_refused")
        assert refused["reason"] == "source_limit"


async def test_a_metrics_render_that_raises_costs_one_request(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> bytes:
        raise RuntimeError("collector failed")

    monkeypatch.setattr(pair.api.sidecar.metrics, "exposition", broken)
    with trio.fail_after(10):
        live = await connect(pair.app)
        async with live:
            status, headers, body = parse(
                await exchange(pair.api.admin, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
            )
            assert (status, headers["connection"], body) == (500, "close", b"internal error\n")
            await healthz(pair.api.admin)
            await live.send_all(b"still")
            assert await receive_exactly(live, 5) == b"still"
    [error] = pair.api.log.find("admin_error")
    assert (error["reason"], error["detail"]) == ("internal_error", "RuntimeError")
    assert "collector failed" not in json.dumps(pair.api.log.records)


# -- the listener on its own, with short limits --------------------------------

SHORT = AdminLimits(request_timeout=0.3, idle_timeout=0.3)


async def _cut_within(addr: Addr, payload: bytes, *, limit: float) -> tuple[bytes, float]:
    stream = await connect(addr)
    async with stream:
        await stream.send_all(payload)
        start = trio.current_time()
        with trio.fail_after(limit):
            data = await wait_cut(stream)
        return data, trio.current_time() - start


async def test_a_promised_body_that_never_comes_is_cut_at_the_deadline(
    nursery: trio.Nursery,
) -> None:
    addr, log = await start_admin(nursery, limits=SHORT)
    promise = b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n"
    data, took = await _cut_within(addr, promise, limit=3)
    assert data == b""
    assert took >= 0.2
    with trio.fail_after(5):
        await healthz(addr)
    assert not log.find("admin_error")


async def test_a_head_that_never_ends_is_cut_at_the_deadline(nursery: trio.Nursery) -> None:
    addr, _ = await start_admin(nursery, limits=SHORT)
    data, _ = await _cut_within(addr, b"GET /healthz HTTP/1.1\r\nHost: a\r\n", limit=3)
    assert data == b""


async def test_a_body_that_trickles_past_the_deadline_is_cut(nursery: trio.Nursery) -> None:
    addr, _ = await start_admin(nursery, limits=SHORT)
    with trio.fail_after(5):
        stream = await connect(addr)
        async with stream:
            await stream.send_all(
                b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 900\r\n\r\n"
            )
            cut = False
            for _ in range(200):  # one byte every 10 ms would take 9 s
                try:
                    await stream.send_all(b"x")
                except trio.BrokenResourceError:
                    cut = True
                    break
                with trio.move_on_after(0.01):
                    try:
                        data = await stream.receive_some(100)
                    except trio.BrokenResourceError:  # reset: the body was left unread
                        data = b""
                    if data == b"":
                        cut = True
                        break
            assert cut


async def test_an_idle_kept_alive_connection_is_closed(nursery: trio.Nursery) -> None:
    addr, _ = await start_admin(nursery, limits=SHORT)
    stream = await connect(addr)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        with trio.fail_after(3):
            raw = await wait_cut(stream)
    assert parse(raw)[:1] == (200,)
    assert raw.endswith(b"ok\n")


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    addr, _ = await start_admin(nursery)
    requests = (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    with trio.fail_after(5):
        raw = await exchange(addr, requests)
    first, rest = raw.split(b"ok\n", 1)
    assert parse(first)[0] == 200
    status, headers, tail = parse(rest)
    assert (status, headers["content-length"]) == (200, "5000")
    assert parse(tail)[0] == 404


async def test_global_and_per_source_caps(nursery: trio.Nursery) -> None:
    addr, log = await start_admin(nursery, limits=AdminLimits(max_connections=4, max_per_source=2))
    with trio.fail_after(10):
        held = [await connect_from(addr, "127.0.0.1") for _ in range(2)]
        try:
            third = await connect_from(addr, "127.0.0.1")
            assert await wait_cut(third) == b""
            await third.aclose()
            held += [await connect_from(addr, s) for s in ("127.0.0.2", "127.0.0.3")]
            fifth = await connect_from(addr, "127.0.0.4")
            assert await wait_cut(fifth) == b""
            await fifth.aclose()
            reasons = [r["reason"] for r in await log.wait_for("admin_refused", count=2)]
            assert reasons == ["source_limit", "connection_limit"]
            # The held ones are still served.
            await held[-1].send_all(HEALTHZ)
            assert parse(await receive_all(held[-1]))[0] == 200
        finally:
            for stream in held:
                await stream.aclose()


async def test_refusals_are_logged_at_a_bounded_rate(nursery: trio.Nursery) -> None:
    addr, log = await start_admin(nursery, limits=AdminLimits(max_per_source=1))
    with trio.fail_after(10):
        held = await connect(addr)
        async with held:
            for _ in range(20):
                extra = await connect(addr)
                async with extra:
                    assert await wait_cut(extra) == b""
    assert 1 <= len(log.find("admin_refused")) <= 2


async def test_a_failing_router_costs_one_connection_and_one_log_line(
    nursery: trio.Nursery,
) -> None:
    addr, log = await start_admin(nursery, route=router(raise_on="/metrics"))
    with trio.fail_after(10):
        raw = await exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        assert raw.count(b"HTTP/1.1 200 ") == 1
        assert raw.count(b"HTTP/1.1 500 ") == 1
        assert raw.endswith(b"internal error\n")
        await healthz(addr)
    [error] = log.find("admin_error")
    assert (error["reason"], error["detail"]) == ("internal_error", "ValueError")
    assert "hunter2" not in json.dumps(log.records)


async def test_a_failing_router_on_head_gets_500_without_a_body(nursery: trio.Nursery) -> None:
    addr, log = await start_admin(nursery, route=router(raise_on="/metrics"))
    with trio.fail_after(10):
        raw = await exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
    status, headers, body = parse(raw)
    assert (status, headers["connection"], body) == (500, "close", b"")
    assert len(log.find("admin_error", reason="internal_error")) == 1


async def test_a_client_that_expects_100_continue_gets_it(nursery: trio.Nursery) -> None:
    addr, _ = await start_admin(nursery)
    with trio.fail_after(10):
        stream = await connect(addr)
        async with stream:
            await stream.send_all(
                b"GET /healthz HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                b"Content-Length: 4\r\nConnection: close\r\n\r\n"
            )
            interim = await receive_exactly(stream, len(b"HTTP/1.1 100 Continue\r\n\r\n"))
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await stream.send_all(b"body")
            assert parse(await receive_all(stream))[::2] == (200, b"ok\n")


async def test_stopping_the_listener_is_not_held_up_by_its_clients() -> None:
    """Cancellation goes straight through a connection in the middle of a request."""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            addr, _ = await start_admin(nursery)  # the default, 10 s request deadline
            slow = await connect(addr)
            await slow.send_all(b"GET /healthz HTTP/1.1\r\nHo")
            idle = await connect(addr)
            await healthz(addr)
            nursery.cancel_scope.cancel()
        async with slow, idle:
            assert await wait_cut(slow) == b""
            assert await wait_cut(idle) == b""


class _Exhausted(trio.abc.Listener[trio.SocketStream]):
    """A real listener whose first few accepts fail as if the process had no descriptors left."""

    def __init__(self, inner: trio.SocketListener, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def accept(self) -> trio.SocketStream:
        if self.failures:
            self.failures -= 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, "Too many open files")
        return await self.inner.accept()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_running_out_of_descriptors_pauses_accepting_and_recovers() -> None:
    inner = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    addr = inner.socket.getsockname()[:2]
    log = LogCapture()
    async with inner, trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_admin_listeners,
                [_Exhausted(inner, failures=3)],
                router(),
                limits=AdminLimits(),
                events=EventLog(log),
            )
        )
        with trio.fail_after(10):
            await healthz(addr)
        nursery.cancel_scope.cancel()
    [line] = log.find("accept_failed")  # three failures, one line: the others held back
    assert line["reason"] == "resource_exhausted"


# -- the pure parts ------------------------------------------------------------


def test_throttle_lets_one_line_a_second_through_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = Throttle(lambda: now[0], interval=1.0)
    assert throttle.allow("a") == 0
    assert [throttle.allow("a") for _ in range(3)] == [None, None, None]
    assert throttle.allow("b") == 0  # each key on its own
    now[0] += 1.0
    assert throttle.allow("a") == 3
    assert throttle.allow("a") is None


def test_gate_counts_open_connections_in_total_and_per_source() -> None:
    gate = Gate(max_connections=3, max_per_source=2)
    assert [gate.admit("a"), gate.admit("a"), gate.admit("a")] == [None, None, "source_limit"]
    assert gate.admit("b") is None
    assert gate.admit("c") == "connection_limit"
    gate.release("a")
    assert gate.admit("c") is None
    assert gate.open == 3
    for source in ("a", "b", "c"):
        gate.release(source)
    assert gate.open == 0
    assert gate.admit("a") is None


@pytest.mark.parametrize(
    ("method", "status", "sent"),
    [
        ("GET", 200, b"ok\n"),
        ("HEAD", 200, b""),
        ("OPTIONS", 405, b"method not allowed\n"),
        ("PATCH", 405, b"method not allowed\n"),
        ("get", 501, b"not implemented\n"),  # methods are case-sensitive
        ("BREW", 501, b"not implemented\n"),
    ],
)
def test_answer_by_method(method: str, status: int, sent: bytes) -> None:
    asked: list[tuple[str, str]] = []

    def route(m: str, path: str) -> Response:
        asked.append((m, path))
        return Response(200, b"ok\n")

    reply = answer(method, "/healthz?verbose=1", route)
    headers = dict(reply.headers)
    assert reply.status == status
    assert (reply.body if reply.send_body else b"") == sent
    if method in ("GET", "HEAD"):
        assert asked == [("GET", "/healthz")]
        assert headers["content-length"] == "3"
    else:
        assert asked == []
        assert headers["allow"] == "GET, HEAD"
