"""Clock skew between a sidecar's host and the authority's: how it is measured and judged.

Pure. A clock reading taken by one side is compared with the window in which
the other side knows that reading was taken: for a status report, from the
moment the request began to arrive to the moment it is handled (the
authority's clock); for `meshid doctor --config`, from just before the
health request to just after its answer (the sidecar's clock). A reading
inside the window is no skew at all, however slow the request; outside it,
the skew is the distance to the window's nearer end, so a slow request or
a queue is never mistaken for a skewed clock.

The limit is the NotBefore backdating of every SVID (`meshid.svid.CLOCK_SKEW`,
30 s): a host whose clock runs behind the authority's by more sees each fresh
SVID as not yet valid (our sidecars tolerate `limits.clock_skew`, other TLS
stacks do not), and the JWT-SVID leeway (`meshid.jwtsvid.LEEWAY`) is the same
30 s.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from meshid.svid import CLOCK_SKEW

SKEW_LIMIT = CLOCK_SKEW
MAX_SKEW_SECONDS = 10 * 365 * 86400.0  # a stored reading past this is nonsense, not a skew


def clock_offset(reading: datetime, earliest: datetime, latest: datetime) -> timedelta:
    """How far `reading` (the other clock) lies outside [earliest, latest] (ours).

    Positive: the other clock is ahead of ours; negative: behind; zero when
    the reading falls inside the window.
    """
    if reading > latest:
        return reading - latest
    if reading < earliest:
        return reading - earliest
    return timedelta(0)


def too_skewed(seconds: float) -> bool:
    return abs(seconds) > SKEW_LIMIT.total_seconds()


def format_skew(seconds: float) -> str:
    """`+600s` (ahead of the authority) or `-45s` (behind)."""
    return f"{'+' if seconds >= 0 else '-'}{math.floor(abs(seconds))}s"
