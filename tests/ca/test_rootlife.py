"""The root's lifetime schedule, as a pure function of time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ca.rootlife import (
    Action,
    ActiveRoot,
    Level,
    PendingRoot,
    plan,
    schedule,
    warn_window,
    warning_text,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
HOUR = timedelta(hours=1)
MIN_PROP = timedelta(minutes=5)


def root(lifetime: timedelta, generation: int = 1) -> ActiveRoot:
    return ActiveRoot(generation, T0, T0 + lifetime)


def test_warn_window_is_thirty_days_or_a_sixth_of_a_short_life() -> None:
    assert warn_window(YEAR) == timedelta(days=30)
    assert warn_window(timedelta(days=60)) == timedelta(days=10)
    assert warn_window(timedelta(minutes=3)) == timedelta(seconds=30)
    assert warn_window(timedelta(-1)) == timedelta(0)


def test_default_year_prepares_at_half_life_and_activates_at_three_quarters() -> None:
    sched = schedule(root(YEAR), svid_ttl=HOUR, min_propagation=MIN_PROP)
    assert sched.prepare_at == T0 + YEAR / 2
    assert sched.activate_at == T0 + YEAR * 3 / 4
    assert sched.warn_at == T0 + YEAR - timedelta(days=30)
    assert sched.force_at == T0 + YEAR - timedelta(days=15)
    assert sched.prepare_at < sched.activate_at < sched.warn_at < sched.force_at


def test_default_year_plan_over_time() -> None:
    active = root(YEAR)
    before = plan(T0 + timedelta(days=100), active, None, svid_ttl=HOUR, min_propagation=MIN_PROP)
    assert (before.action, before.reason, before.level) == (Action.NONE, "root_current", Level.OK)
    assert before.next_check == T0 + YEAR / 2
    due = plan(T0 + YEAR / 2, active, None, svid_ttl=HOUR, min_propagation=MIN_PROP)
    assert (due.action, due.reason) == (Action.PREPARE, "root_rotation_due")
    assert due.propagation == YEAR / 4 and due.wait_for_acks


def test_three_minute_root_never_cuts_an_svid_short() -> None:
    """A 3m root with 1m SVIDs: the next root must sign with a whole SVID life left."""
    svid, prop = timedelta(minutes=1), timedelta(seconds=30)
    active = root(timedelta(minutes=3))
    sched = schedule(active, svid_ttl=svid, min_propagation=prop)
    assert sched.prepare_at == T0 + timedelta(seconds=90)
    assert sched.activate_at == T0 + timedelta(minutes=2)  # = not_after - SVID lifetime
    assert sched.activate_at + svid <= active.not_after
    due = plan(sched.prepare_at, active, None, svid_ttl=svid, min_propagation=prop)
    assert due.action is Action.PREPARE and due.propagation == timedelta(seconds=30)
    assert warn_window(timedelta(minutes=3)) == timedelta(seconds=30)


def test_tiny_root_prepares_at_once_and_activates_after_min_propagation() -> None:
    """40s root, 30s SVIDs: some capping is unavoidable; activation is still well before expiry."""
    svid, prop = timedelta(seconds=30), timedelta(seconds=15)
    active = root(timedelta(seconds=40))
    sched = schedule(active, svid_ttl=svid, min_propagation=prop)
    assert sched.prepare_at == T0
    assert sched.activate_at == T0 + prop
    first = plan(T0, active, None, svid_ttl=svid, min_propagation=prop)
    assert first.action is Action.PREPARE and first.propagation == prop and first.wait_for_acks


def test_pending_rotation_waits_then_forces_near_expiry() -> None:
    active = root(YEAR)
    pending = PendingRoot(2, T0 + YEAR * 3 / 4, wait_for_acks=True)
    waiting = plan(T0 + YEAR * 0.8, active, pending, svid_ttl=HOUR, min_propagation=MIN_PROP)
    assert (waiting.action, waiting.reason) == (Action.NONE, "root_rotation_pending")
    assert waiting.next_check == T0 + YEAR - timedelta(days=30)  # the warning starts then
    warned = plan(
        T0 + YEAR - timedelta(days=20), active, pending, svid_ttl=HOUR, min_propagation=MIN_PROP
    )
    assert (warned.action, warned.level) == (Action.NONE, Level.WARNING)
    assert warned.next_check == T0 + YEAR - timedelta(days=15)
    forced = plan(
        T0 + YEAR - timedelta(days=14), active, pending, svid_ttl=HOUR, min_propagation=MIN_PROP
    )
    assert (forced.action, forced.reason) == (Action.FORCE, "root_expiry_near")
    # Once released (no ack wait, due now), there is nothing left to force.
    released = PendingRoot(2, T0 + YEAR * 3 / 4, wait_for_acks=False)
    after = plan(
        T0 + YEAR - timedelta(days=14), active, released, svid_ttl=HOUR, min_propagation=MIN_PROP
    )
    assert after.action is Action.NONE


def test_pending_root_scheduled_past_expiry_is_forced() -> None:
    """A manual rotate with a propagation delay longer than the root has left."""
    active = root(timedelta(minutes=3))
    pending = PendingRoot(2, T0 + timedelta(hours=1), wait_for_acks=False)
    now = T0 + timedelta(seconds=170)
    result = plan(
        now, active, pending, svid_ttl=timedelta(minutes=1), min_propagation=timedelta(seconds=30)
    )
    assert result.action is Action.FORCE


def test_expired_root_is_replaced_at_once_without_waiting() -> None:
    active = root(timedelta(minutes=3))
    now = T0 + timedelta(minutes=4)
    result = plan(
        now, active, None, svid_ttl=timedelta(minutes=1), min_propagation=timedelta(seconds=30)
    )
    assert (result.action, result.reason, result.level) == (
        Action.PREPARE,
        "root_expired",
        Level.EXPIRED,
    )
    assert result.propagation == timedelta(0) and not result.wait_for_acks
    assert result.remaining == timedelta(minutes=-1)
    text = warning_text(now, active)
    assert text is not None and "expired" in text


def test_overdue_rotation_inside_the_warning_window_skips_the_ack_wait_if_needed() -> None:
    """Automatic rotation turned on late: prepare now, activate before expiry."""
    active = root(YEAR)
    now = T0 + YEAR - timedelta(days=10)  # past force_at
    result = plan(now, active, None, svid_ttl=HOUR, min_propagation=MIN_PROP)
    assert result.action is Action.PREPARE and result.level is Level.WARNING
    assert result.propagation == MIN_PROP and not result.wait_for_acks
    late = T0 + YEAR - timedelta(days=20)  # warned, not yet forced
    result = plan(late, active, None, svid_ttl=HOUR, min_propagation=MIN_PROP)
    assert result.propagation == MIN_PROP and result.wait_for_acks


def test_very_late_rotation_still_activates_before_expiry() -> None:
    active = root(timedelta(minutes=3))
    now = active.not_after - timedelta(seconds=4)
    result = plan(
        now, active, None, svid_ttl=timedelta(minutes=1), min_propagation=timedelta(seconds=30)
    )
    assert result.action is Action.PREPARE
    assert now + result.propagation < active.not_after
    assert not result.wait_for_acks


@pytest.mark.parametrize("skew", [timedelta(minutes=-10), timedelta(seconds=-1)])
def test_clock_behind_the_roots_birth_does_nothing(skew: timedelta) -> None:
    """A clock stepped back (or a root made on a host whose clock ran ahead)."""
    active = root(YEAR)
    result = plan(T0 + skew, active, None, svid_ttl=HOUR, min_propagation=MIN_PROP)
    assert (result.action, result.level) == (Action.NONE, Level.OK)
    assert result.next_check == T0 + YEAR / 2


def test_warning_levels_and_text() -> None:
    active = root(timedelta(minutes=3))
    assert warning_text(T0 + timedelta(seconds=149), active) is None
    text = warning_text(T0 + timedelta(seconds=151), active)
    assert text is not None and "expires" in text and "29s" in text
    year = root(YEAR)
    assert warning_text(T0 + YEAR - timedelta(days=31), year) is None
    text = warning_text(T0 + YEAR - timedelta(days=29), year)
    assert text is not None and "29d" in text


@pytest.mark.parametrize(
    "lifetime,svid",
    [
        (timedelta(seconds=31), timedelta(seconds=30)),
        (timedelta(minutes=3), timedelta(minutes=1)),
        (timedelta(days=1), HOUR),
        (YEAR, HOUR),
        (timedelta(days=3650), timedelta(days=1)),
    ],
)
def test_schedule_is_ordered_and_ends_before_expiry(lifetime: timedelta, svid: timedelta) -> None:
    prop = max(timedelta(seconds=10), min(svid / 2, MIN_PROP))
    active = root(lifetime)
    sched = schedule(active, svid_ttl=svid, min_propagation=prop)
    assert T0 <= sched.prepare_at <= sched.activate_at <= sched.force_at < active.not_after
    assert sched.warn_at <= sched.force_at
    # The plan never asks to do nothing at a moment when something is due.
    step = lifetime / 97
    now = T0
    while now < active.not_after:
        result = plan(now, active, None, svid_ttl=svid, min_propagation=prop)
        assert (result.action is Action.PREPARE) == (now >= sched.prepare_at)
        if result.action is Action.PREPARE:
            assert now + result.propagation < active.not_after
        assert result.next_check >= now
        now += step
