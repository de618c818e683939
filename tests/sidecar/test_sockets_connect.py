"""Connecting: a connect the kernel finished inside connect() costs no wait in trio.

On loopback (and between network namespaces of one host) the kernel runs the
whole TCP handshake inside the connect call, so a non-blocking connect that
says "in progress" is in fact done: `sidecar.sockets.connect_one` asks the
kernel once, without waiting, before it parks the task on the socket. These
tests pin both paths: done at once (no trio wait), and not done (a listener
whose accept queue is full drops the SYN), which waits and times out.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator

import pytest
import trio

from sidecar.config import Address
from sidecar.sockets import connect

pytestmark = pytest.mark.trio


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every trio wait for writability, recorded (and still made)."""
    seen: list[object] = []
    real: Callable[[object], object] = trio.lowlevel.wait_writable

    async def recorded(sock: object) -> None:
        seen.append(sock)
        await real(sock)  # type: ignore[misc]

    monkeypatch.setattr(trio.lowlevel, "wait_writable", recorded)
    return seen


def _addr(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)


async def test_a_loopback_connect_is_done_without_a_wait(
    listener: socket.socket, waits: list[object]
) -> None:
    with trio.fail_after(5):
        sock = await connect(_addr(listener), 5.0)
    try:
        assert sock.getpeername() == listener.getsockname()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert waits == []
    finally:
        sock.close()


async def test_a_refused_loopback_connect_fails_at_once(waits: list[object]) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    addr = _addr(closed)  # bound, never listening: the kernel answers with a reset
    try:
        with trio.fail_after(5), pytest.raises(OSError) as caught:
            await connect(addr, 5.0)
    finally:
        closed.close()
    assert caught.value.errno == errno.ECONNREFUSED
    assert waits == []


async def test_a_connect_not_done_at_once_is_waited_for_until_the_timeout(
    waits: list[object],
) -> None:
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)  # one connection fills the accept queue; the next SYN is dropped
    first = socket.create_connection(full.getsockname()[:2], timeout=5)
    try:
        with trio.fail_after(5), pytest.raises(OSError) as caught:
            await connect(_addr(full), 0.3)
    finally:
        first.close()
        full.close()
    assert caught.value.errno == errno.ETIMEDOUT
    assert len(waits) == 1


async def test_a_name_is_resolved_and_its_addresses_tried_in_turn(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with trio.fail_after(5):
        sock = await connect(Address("localhost", port), 5.0)  # ::1 first, if any: refused
    try:
        assert sock.getpeername()[:2] == ("127.0.0.1", port)
    finally:
        sock.close()
