"""The process clock: a manual clock moves wall and monotonic time together, and only forward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from meshid.clock import Clock, ManualClock, system_clock

START = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_manual_clock_moves_both_readings_by_the_same_amount() -> None:
    clock = ManualClock(START, monotonic=5.0)
    assert (clock.wall(), clock.monotonic()) == (START, 5.0)
    clock.advance(timedelta(seconds=90))
    assert clock.wall() == START + timedelta(seconds=90)
    assert clock.monotonic() == 95.0
    clock.advance(10)  # seconds, as a number
    assert (clock.wall(), clock.monotonic()) == (START + timedelta(seconds=100), 105.0)


def test_a_manual_clock_wall_can_jump_while_monotonic_time_stays() -> None:
    clock = ManualClock(START)
    clock.advance(30)
    clock.set_wall(START)
    assert (clock.wall(), clock.monotonic()) == (START, 30.0)


def test_a_manual_clock_is_a_clock_and_refuses_to_go_back_or_be_naive() -> None:
    clock = ManualClock(START)
    assert isinstance(clock, Clock)
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(timedelta(seconds=-1))
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="timezone-aware"):
        ManualClock(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        clock.set_wall(datetime(2030, 1, 1))


@pytest.mark.parametrize("make", [Clock, system_clock])
def test_the_system_clock_reads_utc_and_a_monotonic_clock(make: type[Clock]) -> None:
    clock = make()
    assert clock.wall().tzinfo is UTC
    first = clock.monotonic()
    assert clock.monotonic() >= first
