"""The JSON-lines event log: one line per event, the time in UTC milliseconds, no None fields."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

from meshid.events import EventLog


def _clock(times: list[datetime]) -> Iterator[datetime]:
    yield from times


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_line_carries_the_clocks_time_to_the_millisecond() -> None:
    start = datetime(2026, 12, 7, 10, 0, 0, 998_999, tzinfo=UTC)
    times = [start, start + timedelta(microseconds=1), start + timedelta(milliseconds=2)]
    times.append(times[-1] + timedelta(hours=25))  # another day, same second of the minute
    clock = _clock(times)
    stream = io.StringIO()
    log = EventLog(stream, clock=lambda: next(clock))
    for n in range(len(times)):
        log.emit("tick", n=n)
    assert [line["time"] for line in _lines(stream)] == [
        "2026-12-07T10:00:00.998Z",
        "2026-12-07T10:00:00.999Z",
        "2026-12-07T10:00:01.000Z",
        "2026-12-08T11:00:01.000Z",
    ]


def test_a_clock_in_another_zone_keeps_its_offset() -> None:
    at = datetime(2026, 12, 7, 12, 0, 0, 5_000, tzinfo=timezone(timedelta(hours=2)))
    stream = io.StringIO()
    EventLog(stream, clock=lambda: at).emit("tick")
    assert _lines(stream)[0]["time"] == "2026-12-07T12:00:00.005+02:00"


def test_fields_that_are_none_are_left_out_and_others_are_written_as_text() -> None:
    stream = io.StringIO()
    at = datetime(2026, 12, 7, tzinfo=UTC)
    EventLog(stream, clock=lambda: at).emit("decision", peer_id=None, conn_id=7, when=at)
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert _lines(stream)[0] == {
        "time": "2026-12-07T00:00:00.000Z",
        "event": "decision",
        "conn_id": 7,
        "when": "2026-12-07 00:00:00+00:00",
    }


def test_a_stream_that_fails_does_not_end_the_caller() -> None:
    stream = io.StringIO()
    stream.close()
    EventLog(stream).emit("tick")  # no exception: a full disk must not take connections down
