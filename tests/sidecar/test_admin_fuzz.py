"""Fuzzing a live sidecar's admin listener with whatever a client might send.

One real sidecar (static credentials from our authority, admin on 127.0.0.1
port 0) runs in a thread of its own for the module; each example is a plain
blocking client that sends random methods, targets, headers, lengths, chunked
or truncated bodies, pipelined requests, in slices with small pauses, then ends
by half-closing, closing or resetting. After every example the listener must
still answer `GET /healthz` with 200, the sidecar must still be running, and
its log must hold no `internal_error`.

When the client half-closes, the listener has everything it will ever get, so
it must answer what it can and close at once: waiting for a deadline there
would fail the example (the read is bounded by a socket timeout).
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sidecar_helpers import TD, Addr, policy_toml
from sidecar_mesh import Pki

from meshid.events import EventLog
from sidecar.app import Sidecar
from sidecar.config import parse_config

STATUSES = {100, 200, 400, 404, 405, 413, 431, 501, 503, 505}
CLIENT_TIMEOUT = 5.0


@dataclass
class LiveSidecar:
    """A sidecar running in its own thread and trio run, stopped when the module is done."""

    admin: Addr = ("127.0.0.1", 0)
    log: io.StringIO = field(default_factory=io.StringIO)
    failure: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def mark(self) -> int:
        return len(self.log.getvalue())

    def check_alive(self, since: int = 0) -> None:
        """Still running, and no internal error logged since `since` (a `mark`)."""
        assert self.thread is not None and self.thread.is_alive(), self.failure
        new = self.log.getvalue()[since:]
        assert "internal_error" not in new, new


def _config(directory: Path, pki: Pki) -> dict[str, Any]:
    directory.mkdir(parents=True)
    creds = pki.issue("api")
    (directory / "svid.pem").write_bytes(creds.cert_pem())
    (directory / "svid.key").write_bytes(creds.key_pem())
    (directory / "bundle.pem").write_bytes(pki.bundle_pem)
    (directory / "policy.toml").write_text(policy_toml([("web", "api")]))
    return {
        "identity": "api",
        "trust_domain": TD.name,
        "static": {
            "cert": "svid.pem",
            "key": "svid.key",
            "bundle": "bundle.pem",
            "policy": "policy.toml",
        },
        "inbound": {"listen": "127.0.0.1:0", "forward": "127.0.0.1:9"},
        "admin": {"listen": "127.0.0.1:0"},
    }


@pytest.fixture(scope="module")
def live(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSidecar]:
    directory = tmp_path_factory.mktemp("admin-fuzz") / "api"
    config = parse_config(_config(directory, pki), directory)
    result = LiveSidecar()
    started = threading.Event()
    control: dict[str, Any] = {}

    async def main() -> None:
        sidecar = Sidecar(config, events=EventLog(result.log))
        async with trio.open_nursery() as nursery:
            control["token"] = trio.lowlevel.current_trio_token()
            control["scope"] = nursery.cancel_scope
            await nursery.start(sidecar.run)
            result.admin = sidecar.bound["admin"]
            started.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported by check_alive, not lost in the thread
            result.failure.append(exc)
        finally:
            started.set()

    result.thread = threading.Thread(target=run, name="admin-fuzz-sidecar", daemon=True)
    result.thread.start()
    assert started.wait(30), "the sidecar did not start"
    result.check_alive()
    yield result
    with contextlib.suppress(trio.RunFinishedError):  # already ended: the failure says why
        trio.from_thread.run_sync(control["scope"].cancel, trio_token=control["token"])
    result.thread.join(10)
    assert not result.thread.is_alive()
    assert not result.failure, result.failure


def healthz(addr: Addr) -> bytes:
    with socket.create_connection(addr, timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        return read_to_end(sock)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until EOF or reset; a socket timeout fails the example."""
    out = bytearray()
    for _ in range(10_000):
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        out += data
    return bytes(out)


# -- what a client might send --------------------------------------------------

KNOWN = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "CONNECT", "PATCH"]
ODD = ["BREW", "get", "G@T", "", "GET GET", "\x00"]
METHODS = st.sampled_from([*KNOWN, *ODD]) | st.text(max_size=8)
PATHS = ["/healthz", "/readyz", "/metrics", "/svid", "/nope", "*", "/healthz?a=b", "//", "/%00"]
ODD_TARGETS = ["http://admin/healthz", "admin:80", "/" + "a" * 20_000]
TARGETS = st.sampled_from([*PATHS, *ODD_TARGETS]) | st.text(max_size=24).map(lambda t: "/" + t)
VERSIONS = st.sampled_from(
    ["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "http/1.1", "", "HTTP/1.1 x"]
)
LENGTHS = st.integers(0, 4000).map(str) | st.sampled_from(
    ["-1", "10, 10", "10, 11", "1e3", "", " 5", "99999999999999999999", "0x10"]
)
HEADERS = st.lists(
    st.one_of(
        st.tuples(st.just("Content-Length"), LENGTHS),
        st.sampled_from(
            [
                ("Connection", "close"),
                ("Connection", "keep-alive"),
                ("Connection", "upgrade"),
                ("Upgrade", "h2c"),
                ("Expect", "100-continue"),
                ("Transfer-Encoding", "chunked"),
                ("Transfer-Encoding", "gzip, chunked"),
                ("Transfer-Encoding", "identity"),
                ("Host", "other"),
                ("X-Long", "v" * 20_000),
            ]
        ),
        st.tuples(st.text(max_size=10), st.text(max_size=20)),
    ),
    max_size=4,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["none", "raw", "chunked", "bad_chunked"]))
    if kind == "none":
        return b""
    if kind == "raw":
        return draw(st.binary(max_size=3000))
    pieces = draw(st.lists(st.binary(min_size=1, max_size=600), max_size=4))
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    if kind == "chunked":
        return encoded
    return encoded[: draw(st.integers(0, len(encoded)))] + draw(st.binary(max_size=20))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method, target, version = draw(METHODS), draw(TARGETS), draw(VERSIONS)
    lines = [f"{method} {target} {version}".rstrip()]
    if draw(st.integers(0, 9)):  # HTTP/1.1 requires Host; leave it out now and then
        lines.append("Host: admin")
    lines += [f"{name}: {value}" for name, value in draw(HEADERS)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass")
    return head + draw(bodies())


@dataclass(frozen=True)
class Delivery:
    """How the bytes go out: in slices with pauses, then how the client leaves."""

    cuts: tuple[int, ...]
    pause: float
    ending: str


DELIVERIES = st.builds(
    Delivery,
    cuts=st.lists(st.integers(0, 40_000), max_size=4).map(lambda c: tuple(sorted(c))),
    pause=st.sampled_from([0.0, 0.0, 0.002, 0.01]),
    ending=st.sampled_from(["half_close", "half_close", "close", "reset"]),
)


def deliver(addr: Addr, payload: bytes, how: Delivery) -> bytes:
    """Send `payload` as `how` says; return what came back (only when half-closing)."""
    with socket.create_connection(addr, timeout=CLIENT_TIMEOUT) as sock:
        edges = [0, *(c for c in how.cuts if c < len(payload)), len(payload)]
        try:
            for start, end in pairwise(edges):
                sock.sendall(payload[start:end])
                if how.pause:
                    time.sleep(how.pause)  # a slow client, not a wait for the server
        except OSError:  # the listener closed on us (413, 400): fine, it said why
            pass
        if how.ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        if how.ending == "close":
            return b""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return b""
        return read_to_end(sock)


def check_reply(raw: bytes) -> None:
    if not raw:
        return
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    statuses = {int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)}
    assert statuses <= STATUSES, (statuses, raw[:500])


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(
    batch=st.lists(requests(), min_size=1, max_size=3), tail=st.binary(max_size=40), how=DELIVERIES
)
def test_admin_survives_whatever_a_client_sends(
    live: LiveSidecar, batch: list[bytes], tail: bytes, how: Delivery
) -> None:
    since = live.mark()
    check_reply(deliver(live.admin, b"".join(batch) + tail, how))
    reply = healthz(live.admin)
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok\n"), reply
    live.check_alive(since)


@FUZZ
@given(raw=st.binary(max_size=2000), how=DELIVERIES)
def test_admin_survives_raw_bytes(live: LiveSidecar, raw: bytes, how: Delivery) -> None:
    since = live.mark()
    check_reply(deliver(live.admin, raw, how))
    reply = healthz(live.admin)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    live.check_alive(since)
