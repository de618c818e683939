"""The report loop: tell the control plane how this sidecar is doing, every few seconds.

A report goes every `REPORT_INTERVAL` seconds, or soon after something an
operator may ask about changed (`poke`: a connection opened or closed, a new
policy, a bundle a root rollover waits to see acknowledged), but no more
often than every `REPORT_MIN_INTERVAL`, so a burst of changes makes one
report. An outage is logged once; a permanent failure slows the loop to
`Pacing.slow_retry`. What a report says is built by `sidecar.status`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import trio

from meshid.errors import MeshIdError
from meshid.report import StatusReport
from meshid.wire import WIRE_VERSION
from sidecar.events import EventLog
from sidecar.renewal import (
    DUTY_REPORT,
    REPORT_INTERVAL,
    REPORT_MIN_INTERVAL,
    Pacing,
    permanent,
)


class Reporter:
    def __init__(
        self,
        send: Callable[[dict[str, Any]], Awaitable[None]],
        build: Callable[[], StatusReport],
        events: EventLog,
        note: Callable[[str, BaseException | None], None],
        pacing: Pacing,
        rand: Callable[[], float],
        *,
        wall: Callable[[], datetime],
    ) -> None:
        self.send = send
        self.build = build
        self.events = events
        self.note = note  # shows (or clears) a failing duty in /readyz
        self.pacing = pacing
        self.rand = rand
        self.wall = wall  # stamps each report, so the authority can judge our clock
        self._report_now = trio.Event()

    def poke(self) -> None:
        """Something an operator may ask about changed: report it soon."""
        self._report_now.set()

    async def run(self) -> None:
        """Report forever."""
        failing = False
        while True:
            report = replace(self.build(), sent_at=self.wall())
            body = {"v": WIRE_VERSION, **report.to_json()}
            try:
                await self.send(body)
                failing = False
                self.note(DUTY_REPORT, None)
            except MeshIdError as exc:
                if not failing:  # once per outage: renewal_failed already says it loudly
                    self.events.emit("report_failed", reason=exc.reason, detail=exc.message)
                failing = True
                self.note(DUTY_REPORT, exc)
                if permanent(exc):  # futile at full rate, and changes do not make it less so
                    await trio.sleep(self.pacing.slow(self.rand()))
                    self._report_now = trio.Event()
                    continue
            await trio.sleep(REPORT_MIN_INTERVAL)  # a burst of changes makes one report
            with trio.move_on_after(REPORT_INTERVAL - REPORT_MIN_INTERVAL):
                await self._report_now.wait()
            self._report_now = trio.Event()
