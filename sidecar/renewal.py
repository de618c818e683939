"""Renewal: when to renew, how fast to retry, and the loop that does it.

The schedule itself (half-life ±10 %, capped backoff) is pure and lives in
`sidecar.schedule`; this module is the loop around it, the pacing the
control-plane duties share, and the CSR a renewal or an enrollment sends.
Which failures are worth retrying at full rate is `permanent`, after
`sidecar.failures`.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshid.errors import ConfigError, MeshIdError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from sidecar.control import ControlPlaneError
from sidecar.failover import Backoff
from sidecar.schedule import Schedule

INTERNAL_ERROR = Reason.INTERNAL_ERROR
WATCH_WAIT = 25.0
REPORT_INTERVAL = 10.0
REPORT_MIN_INTERVAL = 1.0
STATE_RETRY_MAX = 30.0  # seconds between two attempts to write a pending state file
SLOW_RETRY = 60.0  # seconds between attempts after a permanent failure, or while revoked
WATCH_RETRY_MAX = 10.0
WATCH_RETRY_FIRST = 2.0  # seconds: a lost watch is parked again within this, fully jittered
IDENTITY_REVOKED = "identity_revoked"
DUTY_RENEW, DUTY_WATCH, DUTY_REPORT = "renew", "watch", "report"  # as /readyz names them


@dataclass(frozen=True, slots=True)
class Pacing:
    """How fast the control-plane duties retry; injected, so a test need not wait a minute."""

    schedule: Schedule = field(default_factory=Schedule)
    slow_retry: float = SLOW_RETRY
    watch_retry_max: float = WATCH_RETRY_MAX
    failover: Backoff = field(default_factory=Backoff)  # between the authority's servers

    def watch_retry(self, failures: int, rand: float) -> float:
        """The pause after `failures` failed long polls in a row: full jitter over
        [0, 2 s), doubling up to `watch_retry_max`.

        An authority that restarts ends every parked watch of the fleet at the
        same instant; drawn from the whole window (not its upper half), the
        sidecars come back spread over it instead of in the same half second.
        """
        return Backoff(WATCH_RETRY_FIRST, self.watch_retry_max).delay(failures, rand)

    def slow(self, rand: float) -> float:
        """The pause after a permanent failure: `slow_retry` ±10 %, so a fleet spreads out."""
        return self.slow_retry * (0.9 + 0.2 * rand)


def permanent(exc: BaseException) -> bool:
    """Whether retrying at full rate is futile (see `sidecar.failures`)."""
    if isinstance(exc, ControlPlaneError):
        return exc.permanent or exc.refused
    return isinstance(exc, MeshIdError) and exc.reason == IDENTITY_REVOKED


def build_csr(key: Any, spiffe_id: SpiffeId) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


async def renewal_loop(
    schedule: Schedule,
    current: Callable[[], tuple[datetime, datetime] | None],
    renew: Callable[[], Awaitable[None]],
    wall: Callable[[], datetime],
    on_failure: Callable[[MeshIdError, int, float, float], None],
    rand: Callable[[], float] = random.random,
    slow: Callable[[float], float] | None = None,
) -> None:
    """Renew on schedule forever; `on_failure(exc, failures, left, retry_in)`.

    `current()` is the SVID's validity (NotBefore, NotAfter) on the local clock.
    After a permanent failure (`permanent`), the next attempt waits `slow(rand)`
    when given, rather than the backoff.
    """
    failures = 0
    last_permanent = False
    retry_after: float | None = None  # what the authority asked, with its last refusal
    while True:
        validity = current()
        if validity is None:
            raise ConfigError("no SVID to renew")
        not_before, not_after = validity
        left = (not_after - wall()).total_seconds()
        if failures == 0:
            delay = schedule.renew_delay(not_before, not_after, wall(), rand())
        elif last_permanent and slow is not None:
            delay = slow(rand())
        else:
            delay = schedule.retry_delay(failures, left, rand(), retry_after)
        await trio.sleep(delay)
        try:
            await renew()
        except Exception as exc:  # one failed attempt, never the end of the renewer
            failures += 1
            last_permanent = permanent(exc)
            retry_after = exc.retry_after if isinstance(exc, ControlPlaneError) else None
            left = (not_after - wall()).total_seconds()
            retry_in = (
                slow(0.5)
                if last_permanent and slow is not None
                else schedule.retry_delay(failures, left, 0.5, retry_after)
            )
            on_failure(as_meshid(exc), failures, left, retry_in)
        else:
            failures = 0
            last_permanent = False


def failure_reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, MeshIdError) else INTERNAL_ERROR


def as_meshid(exc: Exception) -> MeshIdError:
    """Our own errors as they are; anything else is a bug of ours, said without a traceback."""
    if isinstance(exc, MeshIdError):
        return exc
    return MeshIdError(f"unexpected {type(exc).__name__}: {exc}"[:300], reason=INTERNAL_ERROR)
