"""The control plane's hand on its own root: acts on `ca.rootlife`'s plan.

`RootKeeper.tick` runs in the server's periodic loop (in the database
thread). It reads the roots, asks the pure schedule what is due, and then
publishes the next root (through `Authority.rotate`, so the key is written
exactly as a manual rotation writes it, encrypted when the authority is),
or lets a held-back root activate when the old one is about to expire.
Activation itself stays with `Authority.advance_roots`, gated on sidecars
holding the new bundle.

It also makes the root's life visible: a log line when it prepares, when a
new root becomes active, while the active root is in its warning window
(repeated at most every `repeat_every(...)`, not every poll), and when SVIDs
were cut short by the root's expiry.

A failure here is logged with its reason and retried with a growing pause;
it never ends the server, which keeps signing with the root it has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ca.authority import Authority
from ca.rootlife import Action, ActiveRoot, Level, Plan, plan, schedule, warn_window
from meshid.errors import MeshIdError

MAX_BACKOFF = timedelta(minutes=1)
CAP_LOG_EVERY = timedelta(minutes=1)


def repeat_every(lifetime: timedelta) -> timedelta:
    """How often a standing expiry warning is logged again: hourly, faster for short roots."""
    return min(timedelta(hours=1), max(timedelta(seconds=10), warn_window(lifetime) / 4))


@dataclass
class RootKeeper:
    authority: Authority
    log: Callable[..., None]
    min_propagation: timedelta
    auto: bool = True
    _generation: int | None = field(default=None, init=False)
    _level: Level = field(default=Level.OK, init=False)
    _warned_at: datetime | None = field(default=None, init=False)
    _capped_seen: int = field(default=0, init=False)
    _capped_logged_at: datetime | None = field(default=None, init=False)
    _failures: int = field(default=0, init=False)
    _retry_at: datetime | None = field(default=None, init=False)

    def tick(self) -> Plan | None:
        """One look at the root. Never raises an Exception: logs it and retries later."""
        now = self.authority.clock_now()
        if self._retry_at is not None and now < self._retry_at:
            return None
        try:
            result = self._tick(now)
        except Exception as exc:  # the failure boundary: the server keeps serving
            self._failures += 1
            backoff = min(MAX_BACKOFF, timedelta(seconds=2 ** min(self._failures, 10)))
            self._retry_at = now + backoff
            if isinstance(exc, MeshIdError):
                reason, detail = exc.reason, exc.message
            else:
                reason, detail = "internal_error", type(exc).__name__
            self.log(
                "root_rotation_failed",
                reason=reason,
                detail=detail,
                failures=self._failures,
                retry_in=backoff.total_seconds(),
            )
            return None
        self._failures = 0
        self._retry_at = None
        return result

    def _tick(self, now: datetime) -> Plan:
        active, pending = self.authority.root_lifecycle()
        ttl = self.authority.svid_ttl
        result = plan(now, active, pending, svid_ttl=ttl, min_propagation=self.min_propagation)
        self._note_generation(active, now)
        self._note_level(now, active, result)
        self._note_caps(now)
        if not self.auto or result.action is Action.NONE:
            return result
        if result.action is Action.PREPARE:
            done = self.authority.rotate_unless_pending(
                result.propagation, wait_for_acks=result.wait_for_acks
            )
            if done is not None:
                generation, activate_at = done
                self.log(
                    "root_prepared",
                    reason=result.reason,
                    generation=generation,
                    replaces=active.generation,
                    activate_at=activate_at.isoformat(),
                    wait_for_acks=result.wait_for_acks,
                    old_root_not_after=active.not_after.isoformat(),
                )
        elif result.action is Action.FORCE:
            released = self.authority.release_next_root(result.reason)
            if released is not None:
                rotation = self.authority.rotation_status()
                self.log(
                    "root_released",
                    reason=result.reason,
                    generation=released,
                    lagging=", ".join(rotation[1]) if rotation else None,
                    old_root_not_after=active.not_after.isoformat(),
                )
        return result

    def _note_generation(self, active: ActiveRoot, now: datetime) -> None:
        if self._generation == active.generation:
            return
        sched = schedule(
            active, svid_ttl=self.authority.svid_ttl, min_propagation=self.min_propagation
        )
        self.log(
            "root_active" if self._generation is None else "root_activated",
            generation=active.generation,
            previous=self._generation,
            not_after=active.not_after.isoformat(),
            auto_rotate=self.auto,
            prepare_at=sched.prepare_at.isoformat() if self.auto else None,
        )
        self._generation = active.generation
        self._level = Level.OK
        self._warned_at = None

    def _note_level(self, now: datetime, active: ActiveRoot, result: Plan) -> None:
        if result.level is Level.OK:
            self._level = Level.OK
            return
        every = repeat_every(active.not_after - active.issued_at)
        if (
            result.level is self._level
            and self._warned_at is not None
            and now - self._warned_at < every
        ):
            return
        self._level, self._warned_at = result.level, now
        self.log(
            "root_expired" if result.level is Level.EXPIRED else "root_expiring",
            reason="root_expired" if result.level is Level.EXPIRED else "root_expiring",
            generation=active.generation,
            not_after=active.not_after.isoformat(),
            seconds_left=int(result.remaining.total_seconds()),
            auto_rotate=self.auto,
        )

    def _note_caps(self, now: datetime) -> None:
        count = self.authority.capped_svids
        last = self.authority.last_capped
        if count <= self._capped_seen or last is None:
            return
        if self._capped_logged_at is not None and now - self._capped_logged_at < CAP_LOG_EVERY:
            return
        self.log(
            "svid_capped_by_root",
            reason="root_expiry",
            count=count - self._capped_seen,
            spiffe_id=str(last[0]),
            not_after=last[1].isoformat(),
        )
        self._capped_seen, self._capped_logged_at = count, now
