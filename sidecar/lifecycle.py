"""Where the sidecar is in its life, and what /readyz says about it.

The admin listener comes up before anything else, so a liveness probe is
answered while the sidecar still waits for its authority; /readyz then says
why it is not ready yet, in words an operator can act on:

    not ready: enrolling: authority unreachable (connection refused), attempt 3, next in 4s
    not ready: revoked
    not ready: svid expired

With several authority servers, a last line names the one in use:

    ready
    authority server: ca2.internal:8443 (2 of 2)

Ready (200) means: serving, with an SVID that has not expired, of an identity
the authority has not revoked. A serving sidecar whose control plane fails
permanently (it now presents another trust domain, say) stays ready - it
still serves with what it holds - and /readyz adds a line saying so.

`Lifecycle` is plain state, written by the shell (`Sidecar.run`,
`DynamicIdentity`) and read by `answer`, which is pure: the time comes in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

STARTING = "starting"
ENROLLING = "enrolling"
SERVING = "serving"
DRAINING = "draining"
STOPPED = "stopped"

REVOKED = "revoked"
SVID_EXPIRED = "svid expired"


@dataclass(frozen=True, slots=True)
class Attempt:
    """The last failed enrollment attempt: why, which one, and when the next is due."""

    brief: str
    number: int
    retry_at: float  # on the trio clock


@dataclass(slots=True)
class Lifecycle:
    phase: str = STARTING
    attempt: Attempt | None = None
    # control-plane duties (renew, watch, report) failing permanently while serving
    problems: dict[str, str] = field(default_factory=dict)

    def enroll_failed(self, brief: str, number: int, retry_at: float) -> None:
        self.phase = ENROLLING
        self.attempt = Attempt(brief, number, retry_at)

    def problem(self, duty: str, brief: str | None) -> None:
        """Record (or with None, clear) a permanent failure of one duty."""
        if brief is None:
            self.problems.pop(duty, None)
        else:
            self.problems[duty] = brief

    def answer(
        self,
        *,
        now: float,
        svid_seconds_left: float | None,
        revoked: bool,
        degraded: str | None = None,
        authority: str | None = None,
    ) -> tuple[int, str]:
        """The /readyz status and body: "ready" or "not ready: WHY", then notes, one a line.

        `authority` names the server in use when `authority.server` lists several.
        """
        notes = [f"control plane: {brief}" for brief in sorted(set(self.problems.values()))]
        if degraded:
            notes.append(degraded)
        if authority:
            notes.append(f"authority server: {authority}")
        why = self._why_not(now, svid_seconds_left, revoked)
        first = "ready" if why is None else f"not ready: {why}"
        body = "".join(f"{line}\n" for line in [first, *notes])
        return (200 if why is None else 503), body

    def _why_not(self, now: float, svid_seconds_left: float | None, revoked: bool) -> str | None:
        if self.phase == ENROLLING:
            if self.attempt is None:
                return ENROLLING
            a = self.attempt
            wait = max(0, math.ceil(a.retry_at - now))
            return f"{ENROLLING}: {a.brief}, attempt {a.number}, next in {wait}s"
        if self.phase != SERVING:
            return self.phase
        if revoked:
            return REVOKED
        if svid_seconds_left is None or svid_seconds_left <= 0:
            return SVID_EXPIRED
        return None
