"""The renewer is a failure boundary: an unexpected error in one attempt is retried, not fatal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.testing

from meshid.errors import MeshIdError
from sidecar.renewal import renewal_loop
from sidecar.schedule import Schedule

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_an_unexpected_error_in_a_renewal_is_an_internal_error_and_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    issued = T0
    attempts: list[float] = []
    failures: list[tuple[str, str, int]] = []

    def wall() -> datetime:
        return T0 + timedelta(seconds=trio.current_time())

    def current() -> tuple[datetime, datetime]:
        return issued - timedelta(seconds=30), issued + timedelta(seconds=60)

    async def renew() -> None:
        nonlocal issued
        attempts.append(trio.current_time())
        if len(attempts) == 1:
            raise RuntimeError("a bug of ours")
        issued = wall()

    def on_failure(exc: MeshIdError, n: int, left: float, retry: float) -> None:
        failures.append((exc.reason, exc.message, n))

    with trio.move_on_after(40):
        await renewal_loop(Schedule(), current, renew, wall, on_failure, rand=lambda: 0.5)
    assert failures == [("internal_error", "unexpected RuntimeError: a bug of ours", 1)]
    assert len(attempts) == 2  # retried after a backoff, then back on schedule
    assert attempts[1] - attempts[0] == pytest.approx(0.75)
