"""When the control plane rolls its own root: a pure schedule, no I/O.

Theory of operation (after SPIRE's CA manager):

- A root's life runs from when it was made (`issued_at`; its certificate's
  NotBefore is backdated a few minutes for skewed clocks, which must not count)
  to its NotAfter. Call that length L.
- **Prepare** at half-life: publish the next root in the bundle
  (`Authority.rotate`). It is prepared earlier when that is what it takes for
  the next root to sign before the old one's remaining life drops below one
  SVID lifetime, so that no SVID is cut short by the old root's expiry.
- **Activate** at three quarters of L (again earlier if SVIDs would be cut
  short), never sooner than `min_propagation` after preparing. Activation goes
  through the gated rollover (`Authority.advance_roots`): it also waits until
  every live sidecar reports holding the new bundle.
- **Warn** once less than `warn_window(L)` is left: thirty days, or a sixth of
  the lifetime when that is shorter (a three-minute test root warns in its
  last thirty seconds). With the schedule above a root is normally replaced
  with a quarter of its life left, so a warning means rotation is off, failing
  or held back.
- **Force** halfway through the warning window: a sidecar that never confirms
  the new bundle no longer holds the whole mesh back, since at expiry every
  SVID would fail anyway.
- An already expired root is replaced at once, without waiting for anyone.

Every decision carries a stable snake_case `reason` for logs and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

WARN_MAX = timedelta(days=30)
WARN_SHARE = 6  # warn in the last 1/WARN_SHARE of a short root's life
PREPARE_SHARE = 0.5
ACTIVATE_SHARE = 0.75


class Action(Enum):
    NONE = "none"
    PREPARE = "prepare"  # publish the next root: Authority.rotate(propagation, ...)
    FORCE = "force"  # let the pending root activate now, acknowledged or not


class Level(Enum):
    OK = "ok"
    WARNING = "warning"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class ActiveRoot:
    generation: int
    issued_at: datetime
    not_after: datetime


@dataclass(frozen=True, slots=True)
class PendingRoot:
    generation: int
    activate_at: datetime
    wait_for_acks: bool


@dataclass(frozen=True, slots=True)
class Schedule:
    """The moments that matter in one active root's life."""

    prepare_at: datetime
    activate_at: datetime  # the target; gating may make it later
    warn_at: datetime
    force_at: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    reason: str
    level: Level
    remaining: timedelta  # of the active root's life; negative once expired
    next_check: datetime  # nothing changes before this, unless the roots do
    propagation: timedelta = timedelta(0)  # for PREPARE
    wait_for_acks: bool = True  # for PREPARE


def warn_window(lifetime: timedelta) -> timedelta:
    """Thirty days, or a sixth of a shorter root's lifetime."""
    return min(WARN_MAX, max(lifetime, timedelta(0)) / WARN_SHARE)


def schedule(active: ActiveRoot, *, svid_ttl: timedelta, min_propagation: timedelta) -> Schedule:
    start, end = active.issued_at, active.not_after
    lifetime = max(end - start, timedelta(0))
    prepare_at = min(start + lifetime * PREPARE_SHARE, end - svid_ttl - min_propagation)
    prepare_at = max(prepare_at, start)
    activate_at = min(start + lifetime * ACTIVATE_SHARE, end - svid_ttl)
    activate_at = max(activate_at, prepare_at + min_propagation)
    window = warn_window(lifetime)
    force_at = end - window / 2
    return Schedule(
        prepare_at=prepare_at,
        activate_at=min(activate_at, force_at),
        warn_at=end - window,
        force_at=force_at,
    )


def level_of(now: datetime, active: ActiveRoot) -> Level:
    if now >= active.not_after:
        return Level.EXPIRED
    if now >= active.not_after - warn_window(active.not_after - active.issued_at):
        return Level.WARNING
    return Level.OK


def plan(
    now: datetime,
    active: ActiveRoot,
    pending: PendingRoot | None,
    *,
    svid_ttl: timedelta,
    min_propagation: timedelta,
) -> Plan:
    """What to do about the active root at `now`, and when to look again."""
    sched = schedule(active, svid_ttl=svid_ttl, min_propagation=min_propagation)
    level = level_of(now, active)
    remaining = active.not_after - now
    if level is Level.OK:
        next_level_at = sched.warn_at
    elif level is Level.WARNING:
        next_level_at = active.not_after
    else:
        next_level_at = now + timedelta(days=365)
    if pending is not None:
        held_back = pending.wait_for_acks or pending.activate_at > now
        if now >= sched.force_at and held_back:
            return Plan(Action.FORCE, "root_expiry_near", level, remaining, now)
        nxt = sched.force_at if now < sched.force_at else pending.activate_at
        return Plan(
            Action.NONE,
            "root_rotation_pending",
            level,
            remaining,
            min(max(nxt, now), next_level_at),
        )
    if level is Level.EXPIRED:
        return Plan(
            Action.PREPARE, "root_expired", level, remaining, now, timedelta(0), wait_for_acks=False
        )
    if now < sched.prepare_at:
        return Plan(
            Action.NONE, "root_current", level, remaining, min(sched.prepare_at, next_level_at)
        )
    # Due (or overdue, e.g. after a restart or with rotation turned back on): aim for the
    # target activation, but give the bundle at least min_propagation to spread, and never
    # past the point where the mesh would be forced over anyway.
    propagation = max(sched.activate_at - now, min_propagation)
    if now + propagation >= sched.force_at:
        propagation = max(min(propagation, (active.not_after - now) / 2), timedelta(0))
    return Plan(
        Action.PREPARE,
        "root_rotation_due",
        level,
        remaining,
        now,
        propagation,
        wait_for_acks=now + propagation < sched.force_at,
    )


def warning_text(
    now: datetime, active: ActiveRoot, pending: PendingRoot | None = None
) -> str | None:
    """The operator-facing line for `ca status`, or None while the root is not close to expiry."""
    level = level_of(now, active)
    if pending is not None:
        why = f"root {pending.generation} is published but has not taken over yet"
    else:
        why = "no next root is published: is 'ca serve' running with automatic rotation?"
    when = f"{active.not_after:%Y-%m-%dT%H:%M:%SZ}"
    if level is Level.EXPIRED:
        return (
            f"root {active.generation} expired at {when}: no SVID can be issued until the "
            "next root is active ('meshid ca rotate', or 'ca serve' does it by itself)"
        )
    if level is Level.WARNING:
        return (
            f"root {active.generation} expires at {when} (in {_span(active.not_after - now)}); "
            + why
        )
    return None


def _span(delta: timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"
