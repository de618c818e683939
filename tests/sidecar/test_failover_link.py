"""The link's failover, on trio's autojump clock: who is asked, when, and what is said.

The control client is the seam: each server's client answers from a script
(a reply, or the failure `sidecar.failures` would judge), and records the
virtual time of every request, so the waits the schedule draws can be
asserted to the instant. The real sockets and TLS are in
`test_sidecar_failover.py`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from sidecar_helpers import TD, ForeignCa, LogCapture, utcnow

from meshid.clock import ManualClock
from meshid.events import EventLog
from meshid.spiffeid import SpiffeId
from sidecar import failures
from sidecar.config import Address, AuthoritySource
from sidecar.control import CONNECT_TIMEOUT, ControlClient, ControlPlaneError
from sidecar.failover import Backoff, ServerChoice
from sidecar.failures import Failure
from sidecar.link import AuthorityLink
from sidecar.state import Current


def refused_connection(where: str) -> ControlPlaneError:
    return ControlPlaneError.judged(
        Failure(failures.CONNECT, where, errno=errno.ECONNREFUSED, detail="refused")
    )


def answered(status: int, reason: str | None) -> Callable[[str], ControlPlaneError]:
    """An HTTP answer; `reason` None when it carried no meshid error body."""
    return lambda where: ControlPlaneError.judged(
        Failure(failures.HTTP, where, status=status, reason=reason, detail=reason or "")
    )


def plain_http(where: str) -> ControlPlaneError:
    return ControlPlaneError.judged(Failure(failures.TLS, where, first_bytes=b"HTTP/1.1 400"))


class Scripted(ControlClient):
    """A server's client that answers from a script and records when it was asked."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port, TD)
        self.asked: list[float] = []
        self.script: list[Callable[[str], ControlPlaneError] | dict[str, Any]] = []
        self.hold = trio.Event()  # requests wait for this when `holding`
        self.holding = False
        self.dropped = 0  # how often its kept connections were dropped

    def drop(self) -> None:
        self.dropped += 1

    async def request(
        self, method: str, target: str, body: Any, *, each: Any = None, **_: Any
    ) -> dict[str, Any]:
        self.asked.append(trio.current_time())
        if self.holding:
            await self.hold.wait()
        step = self.script.pop(0) if self.script else {"ok": self.port}
        if isinstance(step, dict):
            if each is not None:  # a stream of this one document
                await each(step)
            return step
        raise step(f"127.0.0.1:{self.port}")


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def make_link(
    tmp_path: Path, count: int, rand: float = 0.5, backoff: Backoff | None = None
) -> tuple[AuthorityLink, list[Scripted], LogCapture, list[str]]:
    (tmp_path / "bundle.pem").write_bytes(b"a bundle the scripted clients never read\n")
    clients = [Scripted(1000 + i) for i in range(count)]
    source = AuthoritySource(
        servers=tuple(Address(c.host, c.port) for c in clients),
        bundle=tmp_path / "bundle.pem",
        token_file=None,
        state_dir=tmp_path / "state",
    )
    current = Current(SpiffeId(TD, "/web"), ManualClock(), timedelta(seconds=60))
    log = LogCapture()
    counted: list[str] = []
    link = AuthorityLink(
        clients,
        current,
        source,
        events=EventLog(log),
        rand=lambda: rand,
        choice=ServerChoice(count, backoff or Backoff(base=2.0, cap=30.0)),
        on_failover=counted.append,
    )
    return link, clients, log, counted


async def ask(link: AuthorityLink) -> dict[str, Any]:
    return await link.ask("GET", "/v1/watch", None, as_client=False)


async def test_a_failure_moves_to_the_next_server_after_the_jittered_wait(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link, (first, second), log, counted = make_link(tmp_path, 2, rand=0.25)
    first.script = [refused_connection]
    start = trio.current_time()
    assert await ask(link) == {"ok": second.port}
    assert first.asked == [start]
    assert second.asked == [start + 0.25 * 2.0]  # rand x the base: full jitter, the first move
    [moved] = log.find("authority_failover")
    assert moved["reason"] == "authority_unreachable" == counted[0]
    assert (moved["left"], moved["to"], moved["retry_in_s"]) == (
        "127.0.0.1:1000",
        "127.0.0.1:1001",
        0.5,
    )
    # It sticks to the second: the next request goes there at once, and the first is
    # not asked again while the second works.
    again = trio.current_time()
    assert await ask(link) == {"ok": second.port}
    assert second.asked[-1] == again and len(first.asked) == 1
    assert link.in_use() == Address("127.0.0.1", 1001)
    # the connections kept to the server left behind are closed, not those of the next
    assert (first.dropped, second.dropped) == (1, 0)


@pytest.mark.parametrize(
    ("failure", "moves"),
    [
        (answered(503, "storage_unavailable"), True),
        (answered(502, "authority_unavailable"), True),
        (plain_http, True),  # not an authority at all: another may be
        (answered(403, "identity_revoked"), False),  # the authority said no: all would
        (answered(401, "token_rejected"), False),
        (answered(429, "rate_limited"), False),  # rate limits are shared
    ],
)
async def test_what_moves_and_what_is_the_authority_s_answer(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    failure: Callable[[str], ControlPlaneError],
    moves: bool,
) -> None:
    link, (first, second), log, _ = make_link(tmp_path, 2)
    first.script = [failure]
    if moves:
        assert await ask(link) == {"ok": second.port}
        assert len(log.find("authority_failover")) == 1
    else:
        with pytest.raises(ControlPlaneError) as info:
            await ask(link)
        assert info.value.status in (401, 403, 429)
        assert second.asked == [] and not log.find("authority_failover")
        assert link.in_use() == Address("127.0.0.1", 1000)


async def test_with_every_server_down_the_request_fails_once_each_was_tried(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link, clients, log, _ = make_link(tmp_path, 3, rand=0.5)
    clients[0].script = [plain_http]  # permanent
    clients[1].script = [refused_connection]  # transient
    clients[2].script = [plain_http]
    start = trio.current_time()
    with pytest.raises(ControlPlaneError) as info:
        await ask(link)
    # The transient failure is the one raised: a sidecar still enrolling waits for it
    # rather than ending on a listed server that is misconfigured.
    assert info.value.reason == "authority_unreachable" and not info.value.permanent
    assert [c.asked for c in clients] == [[start], [start + 1.0], [start + 1.0 + 2.0]]
    assert [m["failures"] for m in log.find("authority_failover")] == [1, 2, 3]
    # The next request starts where the rotation left it (the first again), after a wait
    # whose ceiling doubled once more.
    assert link.in_use() == Address("127.0.0.1", 1000)
    assert link.choice.wait(trio.current_time()) == pytest.approx(0.5 * 8.0)
    before = trio.current_time()
    assert await ask(link) == {"ok": 1000}
    assert clients[0].asked[-1] == pytest.approx(before + 4.0)


async def test_every_permanent_failure_raises_the_last(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link, clients, _, _ = make_link(tmp_path, 2)
    clients[0].script = [plain_http]
    clients[1].script = [answered(404, None)]  # HTTP without a meshid reply
    with pytest.raises(ControlPlaneError) as info:
        await ask(link)
    assert info.value.permanent and info.value.reason == "not_an_authority"


async def test_requests_in_flight_when_a_server_fails_move_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The feed, a renewal and a report all on the first server, which fails them all."""
    link, (first, second), log, counted = make_link(tmp_path, 2, rand=0.5)
    first.script = [refused_connection, refused_connection, refused_connection]
    first.holding = True
    answers: list[dict[str, Any]] = []

    async def one() -> None:
        answers.append(await ask(link))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert len(first.asked) == 3
        failed_at = trio.current_time()
        first.hold.set()
    assert answers == [{"ok": second.port}] * 3
    assert len(log.find("authority_failover")) == 1 and counted == ["authority_unreachable"]
    # All three arrived at the second after the one jittered wait, not one by one.
    assert second.asked == [failed_at + 1.0] * 3


async def test_a_success_resets_the_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link, (first, second), log, _ = make_link(tmp_path, 2, rand=0.5)
    first.script = [refused_connection]
    second.script = [refused_connection]
    with pytest.raises(ControlPlaneError):
        await ask(link)  # first, then second: both down
    assert await ask(link) == {"ok": first.port}  # after a wait, the first is back
    second_time = trio.current_time()
    # A success: the next failure starts over from the base, not from where it was.
    first.script = [refused_connection]
    assert await ask(link) == {"ok": second.port}
    assert second.asked[-1] == pytest.approx(second_time + 0.5 * 2.0)
    assert [m["failures"] for m in log.find("authority_failover")] == [1, 2, 1]


async def test_a_single_server_fails_as_it_always_did(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link, (only,), log, counted = make_link(tmp_path, 1)
    only.script = [refused_connection]
    start = trio.current_time()
    with pytest.raises(ControlPlaneError) as info:
        await ask(link)
    assert info.value.reason == "authority_unreachable"
    assert only.asked == [start] and trio.current_time() == start  # no wait, no second try
    assert not log.find("authority_failover") and counted == []
    assert await ask(link) == {"ok": only.port}  # and the next goes at once
    assert only.asked[-1] == start


# -- a host that answers nothing: the connection's own deadline -------------------


class Silent(ControlClient):
    """A real client whose connection reaches a host that never says a word."""

    def __init__(self, port: int, bundle: bytes, *, connects: bool = True) -> None:
        super().__init__("127.0.0.1", port, TD)
        self.bundle = bundle
        self.connects = connects  # False: not even TCP completes (SYNs go unanswered)
        self.peers: list[trio.testing.MemoryReceiveStream] = []

    async def _open_tcp(self) -> trio.SocketStream:
        if not self.connects:
            await trio.sleep_forever()
        ours, theirs = trio.testing.memory_stream_pair()
        self.peers.append(theirs.receive_stream)  # kept open, never read
        return ours  # type: ignore[return-value]  # a stream, as the client uses it

    async def request(self, method: str, target: str, body: Any, **kw: Any) -> dict[str, Any]:
        return await super().request(method, target, body, **{**kw, "bundle_pem": self.bundle})


def _a_bundle() -> bytes:
    return ForeignCa.create(TD).root.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("wait", [None, 300.0])  # an ordinary request, and a long poll
@pytest.mark.parametrize("connects", [True, False])  # silent after TCP, or before it
async def test_a_silent_host_fails_after_the_connect_deadline_not_the_request_s(
    autojump_clock: trio.testing.MockClock, wait: float | None, connects: bool
) -> None:
    client = Silent(1000, _a_bundle(), connects=connects)
    start = trio.current_time()
    with pytest.raises(ControlPlaneError) as info:
        await client.request("GET", "/v1/watch", None, now=utcnow(), wait=wait)
    assert trio.current_time() - start == pytest.approx(CONNECT_TIMEOUT)
    assert client.timeout > CONNECT_TIMEOUT
    assert info.value.reason == "authority_unreachable" and not info.value.permanent
    assert "no TLS connection within 3s" in info.value.message


async def test_a_silent_host_costs_the_connect_deadline_before_the_next_server(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link, (_, second), log, _ = make_link(tmp_path, 2, rand=0.5)
    silent = Silent(1000, _a_bundle())
    link.clients = (silent, second)
    start = trio.current_time()
    assert await ask(link) == {"ok": second.port}
    assert second.asked == [pytest.approx(start + CONNECT_TIMEOUT + 0.5 * 2.0)]
    assert log.find("authority_failover")[0]["reason"] == "authority_unreachable"


async def test_a_streamed_document_the_caller_cannot_take_moves_to_no_other_server(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The server answered; the document is what failed (a feed that does not parse), and
    every server, sharing the state, would send the same: the request fails as the
    document did, and nothing moves (a move would also cut the requests in flight there)."""
    link, (first, second), log, counted = make_link(tmp_path, 2)

    async def refuse(doc: dict[str, Any]) -> None:
        raise ControlPlaneError("bad feed: spoiled", reason="authority_protocol")

    with pytest.raises(ControlPlaneError) as failed:
        await link.ask("GET", "/v1/watch", None, as_client=False, each=refuse)
    assert failed.value.message == "bad feed: spoiled"
    assert len(first.asked) == 1 and second.asked == []
    assert not log.find("authority_failover") and counted == []
