"""When to renew an SVID, how long to back off after a failure, how loudly to warn.

Pure: times and random numbers come in as arguments. The renewer
(`sidecar.renewer`) asks these questions and sleeps.

The authority backdates NotBefore by `CLOCK_SKEW`, so the moment of issue
is NotBefore + CLOCK_SKEW and the useful lifetime runs from there. Renewing
at half of it (±10 % jitter, so a fleet started together does not renew
together) leaves the other half to ride out a control-plane outage.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from meshid.svid import CLOCK_SKEW

OK = "ok"
EXPIRING = "expiring"
EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Schedule:
    fraction: float = 0.5  # renew when this share of the lifetime has passed
    jitter: float = 0.1  # ± this share of the lifetime
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    warn_fraction: float = 0.25  # "expiring" when less than this share is left
    backdate: timedelta = CLOCK_SKEW

    def issued_at(self, not_before: datetime, not_after: datetime) -> datetime:
        return min(not_before + self.backdate, not_after)

    def lifetime(self, not_before: datetime, not_after: datetime) -> float:
        return max((not_after - self.issued_at(not_before, not_after)).total_seconds(), 1.0)

    def renew_delay(
        self, not_before: datetime, not_after: datetime, now: datetime, rand: float
    ) -> float:
        """Seconds from `now` until the renewal is due; `rand` is uniform in [0, 1)."""
        lifetime = self.lifetime(not_before, not_after)
        share = self.fraction + self.jitter * (2.0 * rand - 1.0)
        due = self.issued_at(not_before, not_after) + timedelta(seconds=lifetime * share)
        return max(0.0, (due - now).total_seconds())

    def retry_delay(
        self, failures: int, seconds_left: float, rand: float, retry_after: float | None = None
    ) -> float:
        """Capped exponential backoff with jitter, tightened as expiry nears.

        `retry_after` is the authority's word (an HTTP Retry-After, say when
        the identity used up its renewal budget): no sooner than that, and up
        to a tenth later by `rand`, so that replicas refused together do not
        all come back in the same second; later still if the backoff says so.
        With little time left, waiting the full
        backoff, or that long, could let the SVID lapse between two attempts;
        so never wait more than a third of what is left (but at least the
        initial backoff, to spare the authority).
        """
        base = min(self.backoff_max, self.backoff_initial * 2.0 ** max(0, failures - 1))
        delay = base * (0.5 + 0.5 * rand)
        if retry_after is not None:
            delay = max(delay, retry_after * (1.0 + 0.1 * rand))
        if seconds_left > 0:
            delay = min(delay, max(self.backoff_initial, seconds_left / 3.0))
        return delay

    def state(self, not_before: datetime, not_after: datetime, now: datetime) -> str:
        left = (not_after - now).total_seconds()
        if left <= 0:
            return EXPIRED
        if left < self.warn_fraction * self.lifetime(not_before, not_after):
            return EXPIRING
        return OK
