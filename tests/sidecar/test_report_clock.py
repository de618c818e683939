"""The report loop stamps each report with the sidecar's wall clock as it sends it."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from meshid.clock import ManualClock
from meshid.report import StatusReport, parse_report
from sidecar.events import EventLog
from sidecar.renewal import Pacing
from sidecar.reporting import Reporter


async def test_each_report_carries_the_clock_at_sending(autojump_clock: trio.abc.Clock) -> None:
    clock = ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
    sent: list[dict[str, Any]] = []
    both = trio.Event()

    async def send(body: dict[str, Any]) -> None:
        sent.append(body)
        clock.advance(timedelta(minutes=10))  # the next report is built at a later time
        if len(sent) == 2:
            both.set()

    reporter = Reporter(
        send,
        lambda: StatusReport("i1"),
        EventLog(io.StringIO()),
        lambda duty, exc: None,
        Pacing(),
        lambda: 0.5,
        wall=clock.wall,
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter.run)
            await both.wait()  # the second comes after the report interval (virtual time)
            nursery.cancel_scope.cancel()
    stamps = [parse_report(body).sent_at for body in sent[:2]]
    assert stamps == [datetime(2030, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, 0, 10, tzinfo=UTC)]
