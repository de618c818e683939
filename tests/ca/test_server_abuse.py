"""The control plane under hostile or broken input: methods, floods, faults, fuzz.

Every test ends by asking the server something ordinary and getting the
ordinary answer: whatever came before ended a request or a connection, never
the server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from ca_helpers import TD, Clock
from disk_helpers import fill
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import Plane, csr_pem, status_and_body, write_identity

from ca.authority import Authority
from ca.plane import _Throttle
from ca.server import ControlPlane, ServerOptions, _source_key
from meshid.clock import ManualClock, system_clock
from meshid.errors import StorageUnavailable
from meshid.spiffeid import SpiffeId
from sidecar.control import ClientIdentity

WEB = SpiffeId(TD, "/web")
API = SpiffeId(TD, "/api")


@asynccontextmanager
async def serving(state: Path, clock: Clock, **options: Any) -> AsyncIterator[Plane]:
    served = Authority.open(state, clock=clock)
    authority = Authority.open(state, clock=clock)
    log: list[dict[str, Any]] = []
    opts = {"request_timeout": 1.0, "poll_interval": 0.05, **options}
    server = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, **opts),
        log=lambda event, **f: log.append({"event": event, **f}),
        clock=clock,
    )
    try:
        async with trio.open_nursery() as own:
            _host, port = await own.start(server.serve)
            yield Plane(server, authority, state, port, authority.bundle().to_pem(), clock, log)
            own.cancel_scope.cancel()
    finally:
        authority.close()
        served.close()


@pytest.fixture
async def plane(state: Path, clock: Clock) -> AsyncIterator[Plane]:
    async with serving(state, clock) as p:
        yield p


# -- a raw client that can pick its source address and its certificate --


def client_context(plane: Plane, identity: ClientIdentity | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=plane.bundle_pem.decode())
    ctx.check_hostname = False
    if identity is not None:
        ctx.load_cert_chain(identity.cert, identity.key)
    return ctx


async def tcp_from(source: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def exchange(
    plane: Plane,
    data: bytes,
    *,
    source: str = "127.0.0.1",
    identity: ClientIdentity | None = None,
    read_for: float = 5.0,
) -> bytes:
    """Send `data` over TLS from `source`; everything read until close or `read_for`."""
    stream = trio.SSLStream(await tcp_from(source, plane.port), client_context(plane, identity))
    out = bytearray()
    try:
        await stream.send_all(data)
        with trio.move_on_after(read_for):
            while chunk := await stream.receive_some(65536):
                out += chunk
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return bytes(out)


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n".encode()


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: ca\r\nconnection: close\r\ncontent-length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


async def healthy(plane: Plane, source: str = "127.0.0.1") -> None:
    with trio.fail_after(10):
        raw = await exchange(plane, get("/healthz"), source=source)
    assert status_and_body(raw)[0] == 200, raw


def head_fields(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    pairs = (line.split(": ", 1) for line in lines[1:])
    fields = {name.lower(): value for name, value in pairs}
    return int(lines[0].split(" ")[1]), fields, body


# -- methods --


async def test_head_gets_the_headers_of_get_and_no_body(plane: Plane) -> None:
    for path in ("/v1/bundle", "/healthz"):
        with trio.fail_after(10):
            raw = await exchange(plane, get(path).replace(b"GET", b"HEAD", 1))
        status, fields, body = head_fields(raw)
        full = status_and_body(await exchange(plane, get(path)))
        assert (status, body) == (200, b"")
        assert int(fields["content-length"]) == len(json.dumps(full[1], separators=(",", ":"))) + 1
    await healthy(plane)


@pytest.mark.parametrize(
    ("request_line", "status", "allow"),
    [
        (b"OPTIONS /v1/bundle", 405, "GET, HEAD"),
        (b"DELETE /v1/enroll", 405, "POST"),
        (b"PUT /healthz", 405, "GET, HEAD"),
        (b"HEAD /v1/enroll", 405, "POST"),
        (b"BREW /v1/bundle", 501, None),
        (b"OPTIONS /nowhere", 404, None),
    ],
)
async def test_other_methods_get_405_with_allow_or_501(
    plane: Plane, request_line: bytes, status: int, allow: str | None
) -> None:
    with trio.fail_after(10):
        raw = await exchange(
            plane, request_line + b" HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n"
        )
    got, fields, _body = head_fields(raw)
    assert got == status
    assert fields.get("allow") == allow
    await healthy(plane)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"HEAD /v1/bundle HTTP/1.1\r\nhost: ca\r\ncontent-length: 99999999\r\n\r\n", 413),
        (b"HEAD /v1/bundle HTTP/1.1\r\nhost: ca\r\ncontent-length: 5\r\n\r\nab", 408),
        (b"HEAD /v1/bundle HTTP/1.1\r\nhost: ca\r\ncontent-length: x\r\n\r\n", 400),
        (b"GET //[ HTTP/1.1\r\nhost: ca\r\n\r\n", 400),
        (b"HEAD //[ HTTP/1.1\r\nhost: ca\r\n\r\n", 400),
    ],
)
async def test_broken_requests_get_an_answer_not_an_internal_error(
    plane: Plane, data: bytes, status: int
) -> None:
    with trio.fail_after(10):
        raw = await exchange(plane, data)
    got, fields, body = head_fields(raw)
    assert got == status
    if data.startswith(b"HEAD") and b": x" not in data:  # x: the head itself is unreadable
        assert body == b"" and int(fields["content-length"]) > 0
    assert not [e for e in plane.log if e["event"] == "internal_error"]
    await healthy(plane)


async def test_a_body_trickled_in_still_meets_the_deadline(plane: Plane) -> None:
    """One byte at a time keeps the connection busy, not alive: 408 at `request_timeout`."""
    stream = trio.SSLStream(await tcp_from("127.0.0.1", plane.port), client_context(plane))
    out = bytearray()
    start = trio.current_time()
    try:
        with trio.fail_after(10):
            await stream.send_all(
                b"POST /v1/enroll HTTP/1.1\r\nhost: ca\r\ncontent-length: 100\r\n\r\n"
            )
            for _ in range(40):  # bounded: 4 s of trickle against a 1 s deadline
                try:
                    await stream.send_all(b"x")
                except (trio.BrokenResourceError, ssl.SSLError):
                    break
                with trio.move_on_after(0.1):
                    out += await stream.receive_some(65536)
                if out:
                    break
    finally:
        await trio.aclose_forcefully(stream)
    assert status_and_body(bytes(out))[0] == 408
    assert trio.current_time() - start < 3
    await healthy(plane)


# -- the authority failing: a full disk, a broken database --


async def test_storage_failure_is_a_503_and_the_server_carries_on(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = plane.server.authority
    token = plane.authority.create_token(WEB)

    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as fault:
        fault.setattr(served, "versions", full)  # /healthz and the poller
        fault.setattr(served.store, "batch", full)  # every write: enroll, renew, report
        fault.setattr(served, "bundle", full)
        for target in (get("/healthz"), get("/v1/bundle")):
            status, fields, body = head_fields(await exchange(plane, target))
            assert (status, fields["retry-after"]) == (503, "5")
            assert json.loads(body)["error"] == "storage_unavailable"
        enroll = json.dumps({"token": token, "csr": csr_pem()}).encode()
        raw = await exchange(plane, post("/v1/enroll", enroll))
        assert status_and_body(raw)[:1] == (503,)
        with trio.fail_after(10):  # the poller met the fault too, and lived
            while not any(e["event"] == "poll_failed" for e in plane.log):  # noqa: ASYNC110
                await trio.sleep(0.02)
    failures = [e for e in plane.log if e["event"] in ("poll_failed", "batch_failed")]
    assert {e["reason"] for e in failures} == {"storage_unavailable"}
    assert "batch_failed" in {e["event"] for e in failures}
    assert len([e for e in failures if e["event"] == "poll_failed"]) == 1  # once, not per tick
    with trio.fail_after(10):
        while not any(e["event"] == "poll_recovered" for e in plane.log):  # noqa: ASYNC110
            await trio.sleep(0.02)

    # The fault is gone: the same token enrolls (nothing half-written), health is back.
    await healthy(plane)
    raw = await exchange(plane, post("/v1/enroll", enroll))
    assert status_and_body(raw)[0] == 200


async def test_storage_failure_while_checking_a_watch_is_a_503(
    plane: Plane, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Watches are checked in batches: a batch that fails answers each of its watches
    503 with Retry-After (not an unchanged feed, which would be re-asked at once)."""
    ident = write_identity(tmp_path / "web", plane.authority, WEB)

    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as fault:
        fault.setattr(type(plane.server.api), "watch_check", full)
        raw = await exchange(plane, get("/v1/watch?wait=1"), identity=ident)
        status, fields, body = head_fields(raw)
        assert (status, fields["retry-after"]) == (503, "5")
        assert json.loads(body)["error"] == "storage_unavailable"
    failed = [e for e in plane.log if e["event"] == "checks_failed"]
    assert [e["reason"] for e in failed] == ["storage_unavailable"]
    status, _fields, body = head_fields(await exchange(plane, get("/v1/watch"), identity=ident))
    assert status == 200 and "policy_version" in json.loads(body)


async def test_storage_unavailable_from_within_a_batch_is_a_503(
    plane: Plane, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    report = json.dumps({"instance": "a"}).encode()

    def full(*_args: Any, **_kwargs: Any) -> Any:
        raise StorageUnavailable("the disk is full")

    with monkeypatch.context() as fault:
        fault.setattr(plane.server.authority, "record_report", full)
        raw = await exchange(plane, post("/v1/report", report), identity=ident)
        status, fields, body = head_fields(raw)
        assert (status, fields["retry-after"]) == (503, "5")
        assert json.loads(body)["error"] == "storage_unavailable"
    raw = await exchange(plane, post("/v1/report", report), identity=ident)
    assert status_and_body(raw)[0] == 200


async def test_a_bug_in_the_authority_costs_one_request(
    plane: Plane, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> Any:
        raise KeyError("a bug")

    with monkeypatch.context() as fault:
        fault.setattr(plane.server.authority, "bundle", broken)
        status, _fields, body = head_fields(await exchange(plane, get("/v1/bundle")))
        assert (status, json.loads(body)["error"]) == (503, "internal_error")
    logged = [e for e in plane.log if e["event"] == "request_failed"]
    assert logged and logged[0]["error"] == "KeyError" and "a bug" not in str(logged)
    await healthy(plane)


# -- floods --


async def silent(source: str, port: int, count: int) -> list[trio.SocketStream]:
    return [await tcp_from(source, port) for _ in range(count)]


async def closed_by_server(stream: trio.SocketStream, within: float = 5.0) -> bool:
    with trio.move_on_after(within):
        try:
            return await stream.receive_some(1024) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_a_flood_from_one_source_is_capped_and_others_still_get_in(
    state: Path, clock: Clock, tmp_path: Path
) -> None:
    async with serving(state, clock, max_per_source=4, max_connections=6) as plane:
        ident = write_identity(tmp_path / "web", plane.authority, WEB)
        flood: list[trio.SocketStream] = []
        try:
            flood += await silent("127.0.0.1", plane.port, 5)
            # the fifth from one address is closed at once; the first four are held
            assert await closed_by_server(flood[4])
            assert not await closed_by_server(flood[0], within=0.2)
            # another flood fills the anonymous pool: the oldest make room
            flood += await silent("127.0.0.4", plane.port, 4)
            await healthy(plane, source="127.0.0.2")
            raw = await exchange(plane, get("/v1/watch"), source="127.0.0.3", identity=ident)
            assert status_and_body(raw)[0] == 200
        finally:
            for stream in flood:
                await trio.aclose_forcefully(stream)
        shed = {e["reason"] for e in plane.log if e["event"] == "connection_shed"}
        assert "too_many_connections_from_source" in shed


async def test_a_parked_watch_outlives_a_flood(state: Path, clock: Clock, tmp_path: Path) -> None:
    async with serving(state, clock, max_per_source=4, max_connections=4) as plane:
        ident = write_identity(tmp_path / "web", plane.authority, WEB)
        status, _f, body = head_fields(await exchange(plane, get("/v1/watch"), identity=ident))
        feed = json.loads(body)
        target = "/v1/watch?policy_version={}&revocation_version={}&bundle_sequence={}".format(
            feed["policy_version"], feed["revocation_version"], feed["bundle_sequence"]
        )
        answer: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                answer.append(
                    await exchange(plane, get(target + "&wait=20"), identity=ident, read_for=15)
                )

            nursery.start_soon(watch)
            with trio.fail_after(10):
                while plane.server._changed.statistics().tasks_waiting == 0:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            flood = await silent("127.0.0.1", plane.port, 6) + await silent(
                "127.0.0.5", plane.port, 6
            )
            other = plane.other()
            other.allow(WEB, API)
            other.close()
            with trio.fail_after(10):
                while not answer:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            for stream in flood:
                await trio.aclose_forcefully(stream)
        status, body = status_and_body(answer[0])
        assert status == 200 and body["pairs"] == [[str(WEB), str(API)]]


async def test_watches_past_the_per_identity_budget_are_told_to_come_back(
    state: Path, clock: Clock, tmp_path: Path
) -> None:
    async with serving(state, clock, max_watches_per_identity=1) as plane:
        ident = write_identity(tmp_path / "web", plane.authority, WEB)
        _s, _f, body = head_fields(await exchange(plane, get("/v1/watch"), identity=ident))
        feed = json.loads(body)
        target = "/v1/watch?policy_version={}&revocation_version={}&bundle_sequence={}&wait=20"
        target = target.format(
            feed["policy_version"], feed["revocation_version"], feed["bundle_sequence"]
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(exchange, plane, get(target), identity=ident, read_for=20))
            with trio.fail_after(10):
                while plane.server._changed.statistics().tasks_waiting == 0:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            start = trio.current_time()
            status, fields, body = head_fields(await exchange(plane, get(target), identity=ident))
            assert trio.current_time() - start < 3  # not parked
            assert (status, fields["retry-after"]) == (429, "5")
            assert json.loads(body)["error"] == "too_many_watches"
            # another identity has a budget of its own
            other = write_identity(tmp_path / "api", plane.authority, API)
            with trio.move_on_after(0.5) as parked:
                await exchange(plane, get(target), identity=other, read_for=5)
            assert parked.cancelled_caught
            nursery.cancel_scope.cancel()


# -- the key --


async def test_the_server_key_is_never_written_to_disk(
    state: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[Path]] = []
    load = ssl.SSLContext.load_cert_chain

    def spying(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        seen.append([p for p in state.rglob("*") if p.is_file()])
        load(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spying)
    # a key file a killed server of an older version left behind
    (state / "server").mkdir(exist_ok=True)
    (state / "server" / ".123-abcd.key").write_bytes(b"-----BEGIN PRIVATE KEY-----")
    async with serving(state, clock) as plane:
        await healthy(plane)
        assert seen
        for files in seen:
            keys = [p for p in files if p.suffix == ".key" and "server" in p.parts]
            assert keys == [] or keys == [state / "server" / ".123-abcd.key"]
        assert not (state / "server" / ".123-abcd.key").exists()
    for files in seen:  # nothing with a private key in it but the root's own key files
        for path in files:
            if path.parent.name == "server" and path.exists():
                assert b"PRIVATE KEY" not in path.read_bytes()


# -- fuzz: HTTP over TLS, and TLS itself --

_methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "OPTIONS", "TRACE", "X", "GET\x00"])
_paths = st.sampled_from(
    ["/healthz", "/v1/bundle", "/v1/enroll", "/v1/watch?wait=x", "*", "/%ff", "", "//[", "/?a=1&a"]
)
_header = st.tuples(
    st.sampled_from(["host", "content-length", "transfer-encoding", "connection", "x", "expect"]),
    st.one_of(
        st.sampled_from(["0", "5", "99999999", "chunked", "close", "100-continue", "-1"]),
        st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=20),
    ),
)


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """A request, possibly malformed, cut into pieces; and whether to hang up early."""
    method, path = draw(_methods), draw(_paths)
    headers = draw(st.lists(_header, max_size=5))
    body = draw(st.binary(max_size=200))
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [p for p in pieces if p], draw(st.booleans())


async def fuzz_once(plane: Plane, pieces: list[bytes], hang_up: bool) -> None:
    stream = trio.SSLStream(await tcp_from("127.0.0.1", plane.port), client_context(plane))
    try:
        for piece in pieces:
            await stream.send_all(piece)
        if not hang_up:
            with trio.move_on_after(0.3):
                while await stream.receive_some(65536):
                    pass
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def run_fuzz(state: Path, clock: Clock, body: Callable[[Plane], Any]) -> Callable[[], None]:
    """One server for all examples (starting one per example would dominate the run)."""

    async def main() -> None:
        async with serving(state, clock) as plane:
            await body(plane)

    return lambda: trio.run(main)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases=st.lists(http_requests(), min_size=1, max_size=4))
def test_http_fuzz_never_stops_the_server(
    cases: list[tuple[list[bytes], bool]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("fuzz") / "state"
    clock = Clock(_now())
    Authority.init(state, TD, clock=clock).close()

    async def body(plane: Plane) -> None:
        with trio.fail_after(20):
            for pieces, hang_up in cases:
                await fuzz_once(plane, pieces, hang_up)
            await healthy(plane)
        assert not [e for e in plane.log if e["event"] == "internal_error"], plane.log

    run_fuzz(state, clock, body)()


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    junk=st.binary(max_size=300),
    cut=st.integers(0, 600),
    reset=st.booleans(),
)
def test_tls_fuzz_never_stops_the_server(
    junk: bytes, cut: int, reset: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("tls") / "state"
    clock = Clock(_now())
    Authority.init(state, TD, clock=clock).close()

    async def body(plane: Plane) -> None:
        with trio.fail_after(20):
            hello = _client_hello(plane)
            for data in (junk, hello[:cut], hello[:cut] + junk):
                tcp = await tcp_from("127.0.0.1", plane.port)
                try:
                    await tcp.send_all(data)
                    if reset:  # RST instead of FIN
                        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                except trio.BrokenResourceError:
                    pass
                finally:
                    await trio.aclose_forcefully(tcp)
            await healthy(plane)

    run_fuzz(state, clock, body)()


_LINGER_ZERO = b"\x01\0\0\0\0\0\0\0"  # struct linger {on, 0 s}: close() sends RST


@pytest.mark.parametrize(
    "stage", ["connected", "hello", "handshaken", "head", "body", "request", "watch"]
)
async def test_a_reset_at_any_stage_ends_that_connection_only(
    plane: Plane, tmp_path: Path, stage: str
) -> None:
    ident = write_identity(tmp_path / "web", plane.authority, WEB)
    tcp = await tcp_from("127.0.0.1", plane.port)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    stream = trio.SSLStream(tcp, client_context(plane, ident))
    request = post("/v1/report", json.dumps({"instance": "a"}).encode())
    with trio.fail_after(10):
        if stage == "hello":
            await tcp.send_all(_client_hello(plane))
        elif stage != "connected":
            await stream.do_handshake()
        if stage == "head":
            await stream.send_all(request[:20])
        elif stage == "body":
            await stream.send_all(request[:-5])
        elif stage == "request":
            await stream.send_all(request)
        elif stage == "watch":
            await stream.send_all(get("/v1/watch?policy_version=0&wait=20"))
        tcp.socket.close()  # RST, whatever the server was doing
        await healthy(plane)
    assert not [e for e in plane.log if e["event"] == "internal_error"]


def _client_hello(plane: Plane) -> bytes:
    """The first flight of a real TLS client, to cut short."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(plane).wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


# -- a real full disk --


async def test_a_full_disk_is_503_and_the_server_recovers_when_space_returns(
    tiny_disk: Path, clock: Clock, tmp_path: Path
) -> None:
    state = tiny_disk / "state"
    Authority.init(state, TD, clock=clock).close()
    async with serving(state, clock) as plane:
        ident = write_identity(tmp_path / "web", plane.authority, WEB)
        token = plane.authority.create_token(WEB)
        enroll = json.dumps({"token": token, "csr": csr_pem()}).encode()
        report = json.dumps({"instance": "a", "bundle_sequence": 1}).encode()
        filler = fill(tiny_disk)
        with trio.fail_after(20):
            status, fields, body = head_fields(await exchange(plane, post("/v1/enroll", enroll)))
            assert status == 503 and fields["retry-after"] == "5", body
            raw = await exchange(plane, post("/v1/report", report), identity=ident)
            assert status_and_body(raw)[0] == 503
        filler.unlink()
        with trio.fail_after(20):
            await healthy(plane)
            assert status_and_body(await exchange(plane, post("/v1/enroll", enroll)))[0] == 200
            raw = await exchange(plane, post("/v1/report", report), identity=ident)
            assert status_and_body(raw)[0] == 200


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # same /64, same budget
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
    ],
)
def test_the_per_source_cap_counts_an_ipv6_host_by_its_64(address: str, key: str) -> None:
    assert _source_key(address) == key


async def test_a_database_that_cannot_be_written_at_start_is_one_clear_error(
    state: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = Authority.open(state, clock=clock)
    try:

        def read_only(*_args: Any, **_kwargs: Any) -> Any:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        monkeypatch.setattr(served, "issue", read_only)
        server = ControlPlane(
            served, ServerOptions(host="127.0.0.1", port=0), log=print, clock=system_clock()
        )
        with pytest.raises(ExceptionGroup) as info:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
        [failed] = info.value.exceptions
        assert isinstance(failed, StorageUnavailable) and failed.reason == "storage_unavailable"
        assert "readonly database" in failed.message and "\n" not in failed.message
    finally:
        served.close()


def test_log_lines_a_flood_repeats_are_throttled_and_counted() -> None:
    throttle = _Throttle(per_second=2)
    assert [throttle.allow(10.0) for _ in range(5)] == [0, 0, None, None, None]
    assert throttle.allow(10.9) is None
    assert throttle.allow(11.0) == 4  # the next line says how many were left out
    assert throttle.allow(11.1) == 0


async def test_a_flood_of_failed_handshakes_logs_a_bounded_number_of_lines(plane: Plane) -> None:
    with trio.fail_after(10):
        for _ in range(30):
            tcp = await tcp_from("127.0.0.1", plane.port)
            await tcp.send_all(b"\x16\x03\x01\x00\x05hello")
            with contextlib.suppress(trio.BrokenResourceError):
                await tcp.receive_some(1024)
            await tcp.aclose()
    await healthy(plane)
    logged = [e for e in plane.log if e["event"] == "handshake_failed"]
    assert 1 <= len(logged) <= 20 and {e["reason"] for e in logged} == {"tls_error"}


async def test_refused_requests_log_a_bounded_number_of_lines_and_count_them_all(
    state: Path,
) -> None:
    # Monotonic time frozen: the throttle's second never ends until the test moves it.
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    async with serving(state, clock) as plane:  # type: ignore[arg-type]
        with trio.fail_after(30):
            for _ in range(40):
                assert status_and_body(await exchange(plane, get("/v1/nothing")))[0] == 404
        lines = [e for e in plane.log if e["event"] == "request"]
        assert len(lines) == 20 and all("suppressed" not in e for e in lines)
        clock.advance(1.0)
        with trio.fail_after(10):
            assert status_and_body(await exchange(plane, get("/v1/nothing")))[0] == 404
        last = [e for e in plane.log if e["event"] == "request"][-1]
        assert last["status"] == 404 and last["suppressed"] == 20
        counted = plane.server.metrics.registry.get_sample_value(
            "meshid_ca_refusals_total", {"reason": last["reason"]}
        )
        assert counted == 41


async def test_a_flood_of_refusals_does_not_hide_a_server_fault(
    state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A caller's refusals use up their own lines, not those of the authority failing:
    # a bug caught in a batch is a 500 that no other line reports.
    clock = ManualClock(datetime.now(UTC).replace(microsecond=0))
    async with serving(state, clock) as plane:  # type: ignore[arg-type]
        ident = write_identity(tmp_path / "web", plane.authority, WEB)
        with trio.fail_after(30):
            for _ in range(25):
                assert status_and_body(await exchange(plane, get("/v1/nothing")))[0] == 404

        def broken(*_args: Any, **_kwargs: Any) -> Any:
            raise KeyError("a bug")

        with monkeypatch.context() as fault, trio.fail_after(10):
            fault.setattr(plane.server.authority, "record_report", broken)
            report = json.dumps({"instance": "a"}).encode()
            raw = await exchange(plane, post("/v1/report", report), identity=ident)
            assert status_and_body(raw)[0] == 500
        lines = [e for e in plane.log if e["event"] == "request"]
        assert [e["status"] for e in lines].count(404) == 20
        assert lines[-1]["status"] == 500 and lines[-1]["reason"] == "internal_error"
