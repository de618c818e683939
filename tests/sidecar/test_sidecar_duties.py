"""The background duties (the sweep, the static file watcher, the accept loops) outlive faults.

A fault is injected where the duty calls into the sidecar; the duty must log
it once (the exception's type only), carry on, and the sidecar must keep
serving. A passing fault reading the files is retried without waiting for
the files to change again, and a flood of failures is one line a second.
"""

from __future__ import annotations

import errno
from datetime import datetime
from typing import Any

import pytest
import trio
from sidecar_helpers import roundtrip
from sidecar_mesh import Pair, Pki
from test_sidecar_faults import inject_once, wait_internal_error

import sidecar.connection
import sidecar.static
import sidecar.tasks
from meshid.errors import InvalidSvid
from sidecar.app import Sidecar
from sidecar.static import StaticIdentity


@pytest.fixture(autouse=True)
def _short_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sidecar.tasks, "TASK_PAUSE", 0.05)


class Tally:
    """A count that can be waited on."""

    def __init__(self) -> None:
        self.n = 0
        self._moved = trio.Event()

    def add(self) -> None:
        self.n += 1
        self._moved.set()
        self._moved = trio.Event()

    async def reach(self, n: int) -> None:
        """Until the count is `n`; callers bound this with trio.fail_after."""
        while self.n < n:
            await self._moved.wait()


async def test_a_fault_in_the_sweep_is_logged_and_the_sweep_goes_on(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    swept = Tally()
    real = Sidecar._overdue

    def counting(self: Sidecar, now: float, wall: datetime) -> Any:
        swept.add()
        return real(self, now, wall)

    monkeypatch.setattr(Sidecar, "_overdue", counting)
    fired = inject_once(monkeypatch, Sidecar, "_overdue", RuntimeError("sweep broke /secret"))
    with trio.fail_after(20):
        await wait_internal_error(pair)
        await swept.reach(swept.n + 4)  # the sweeps still sweep
        assert await roundtrip(pair.app, b"still") == b"still"
    [error] = pair.web.log.find("internal_error") + pair.api.log.find("internal_error")
    assert fired == [1]
    assert (error["task"], error["error"]) == ("sweep", "RuntimeError")
    assert "secret" not in str(error)


async def test_a_fault_in_the_file_watcher_is_logged_and_it_goes_on(
    pair: Pair, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = pair.web
    fired = inject_once(monkeypatch, StaticIdentity, "_load_svid", RuntimeError("watch broke"))
    with trio.fail_after(20):
        web.write_creds(pki.issue("web"))
        [error] = await web.log.wait_for("internal_error")
        fresh = pki.issue("web")
        web.write_creds(fresh)  # the watcher still watches
        [loaded] = await web.log.wait_for("credentials", generation=2)
        assert await roundtrip(pair.app, b"still") == b"still"
    assert fired == [1]
    assert (error["task"], error["error"]) == ("static_reload", "RuntimeError")
    assert loaded["serial"] == fresh.serial


async def test_a_passing_read_failure_is_retried_without_another_change(
    pair: Pair, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file unreadable for a moment: the next poll tries again, the file unchanged."""
    web = pair.web
    unreadable = InvalidSvid("certificate svid.pem: Permission denied", reason="unreadable")
    fired = inject_once(monkeypatch, sidecar.static, "_read", unreadable)
    fresh = pki.issue("web")
    with trio.fail_after(20):
        web.write_creds(fresh)
        [failed] = await web.log.wait_for("reload_failed")
        [loaded] = await web.log.wait_for("credentials", generation=2)
    assert fired == [1]
    assert failed["reason"] == "unreadable"
    assert loaded["serial"] == fresh.serial


async def test_a_file_that_stays_unreadable_is_one_line_a_second(
    pair: Pair, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = pair.web
    tries = Tally()

    def never(path: Any, what: str) -> bytes:
        tries.add()
        raise InvalidSvid(f"{what}: Permission denied", reason="unreadable")

    monkeypatch.setattr(sidecar.static, "_read", never)
    with trio.fail_after(20):
        web.write_creds(pki.issue("web"))
        await tries.reach(6)  # six polls, 50 ms apart
    assert len(web.log.find("reload_failed")) == 1


async def test_running_out_of_descriptors_is_one_line_a_second(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """accept(2) failing with EMFILE again and again: one line, and connections after."""
    real = sidecar.connection.accept
    failures: list[int] = []

    def exhausted(lsock: Any) -> tuple[Any, Any]:
        if len(failures) < 5:
            failures.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(lsock)

    monkeypatch.setattr(sidecar.connection, "accept", exhausted)
    with trio.fail_after(20):
        assert await roundtrip(pair.app, b"after") == b"after"
    assert len(failures) == 5
    [line] = pair.web.log.find("accept_failed")
    assert line["reason"] == "resource_exhausted"
