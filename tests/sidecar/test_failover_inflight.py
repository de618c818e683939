"""A server that stops answering costs the requests already waiting on it no more time
than the first of them to give up: once one request has moved away from it, the others
in flight to it are abandoned and follow at once (autojump clock, scripted clients)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_failover_link import Scripted, make_link

from sidecar import failures
from sidecar.control import ControlPlaneError
from sidecar.failures import Failure

TIMEOUT = 15.0  # the control client's request timeout


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


class Silent(Scripted):
    """A server whose host vanished: every request waits out the timeout, then fails."""

    async def request(self, method: str, target: str, body: Any, **_: Any) -> dict[str, Any]:
        self.asked.append(trio.current_time())
        await trio.sleep(TIMEOUT)
        raise ControlPlaneError.judged(Failure(failures.TIMEOUT, f"127.0.0.1:{self.port}"))


async def test_requests_in_flight_to_a_server_left_behind_move_with_the_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    link, (_, second), log, _ = make_link(tmp_path, 2, rand=0.5)
    silent = Silent(1000)
    link.clients = (silent, second)
    start = trio.current_time()
    done: dict[str, float] = {}

    async def ask(name: str, after: float) -> None:
        await trio.sleep(after)
        assert await link.ask("POST", "/v1/renew", None) == {"ok": second.port}
        done[name] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "report", 0.0)
        nursery.start_soon(ask, "renewal", 5.0)  # on its way to the silent server too
    assert silent.asked == [start, start + 5.0]
    # the report times out at 15 s and moves (after the jittered wait: 0.5 x 2 s); the
    # renewal, abandoned at 15 s rather than at 20 s, follows it through the same gate
    assert done == {"report": TIMEOUT + 1.0, "renewal": TIMEOUT + 1.0}
    [moved] = log.find("authority_failover")
    assert moved["reason"] == "authority_unreachable"
