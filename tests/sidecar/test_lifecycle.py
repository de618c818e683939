"""/readyz from the sidecar's lifecycle (pure), and the renewer's pace after a permanent failure."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_renewal_schedule import World

from meshid.errors import MeshIdError
from sidecar.control import ControlPlaneError
from sidecar.lifecycle import DRAINING, ENROLLING, SERVING, STARTING, Lifecycle
from sidecar.renewal import Pacing, renewal_loop
from sidecar.schedule import Schedule


def lifecycle(phase: str) -> Lifecycle:
    state = Lifecycle()
    state.phase = phase
    return state


def enrolling() -> Lifecycle:
    state = Lifecycle()
    state.enroll_failed("authority unreachable (connection refused)", 3, retry_at=103.2)
    return state


# (case, lifecycle, svid seconds left, revoked, state_dir note, status, body)
CASES: list[tuple[str, Lifecycle, float | None, bool, str | None, int, str]] = [
    ("starting", lifecycle(STARTING), None, False, None, 503, "not ready: starting\n"),
    ("enrolling_first_attempt", lifecycle(ENROLLING), None, False, None, 503,
     "not ready: enrolling\n"),
    ("enrolling_retrying", enrolling(), None, False, None, 503,
     "not ready: enrolling: authority unreachable (connection refused), attempt 3, next in 4s\n"),
    ("serving", lifecycle(SERVING), 100.0, False, None, 200, "ready\n"),
    ("serving_state_dir_full", lifecycle(SERVING), 100.0, False, "state_dir: disk full", 200,
     "ready\nstate_dir: disk full\n"),
    ("svid_expired", lifecycle(SERVING), -1.0, False, None, 503, "not ready: svid expired\n"),
    ("revoked", lifecycle(SERVING), 100.0, True, None, 503, "not ready: revoked\n"),
    ("revoked_and_expired", lifecycle(SERVING), -1.0, True, None, 503, "not ready: revoked\n"),
    ("draining", lifecycle(DRAINING), 100.0, False, None, 503, "not ready: draining\n"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("state", "left", "revoked", "degraded", "status", "body"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_readyz(
    state: Lifecycle,
    left: float | None,
    revoked: bool,
    degraded: str | None,
    status: int,
    body: str,
) -> None:
    answer = state.answer(now=100.0, svid_seconds_left=left, revoked=revoked, degraded=degraded)
    assert answer == (status, body)


def test_a_permanent_control_plane_failure_while_serving_is_said_but_stays_ready() -> None:
    state = lifecycle(SERVING)
    state.problem("watch", "trust domain mismatch (other.org vs example.org)")
    state.problem("report", "trust domain mismatch (other.org vs example.org)")
    answer = state.answer(now=0.0, svid_seconds_left=50.0, revoked=False)
    assert answer == (
        200,
        "ready\ncontrol plane: trust domain mismatch (other.org vs example.org)\n",
    )
    state.problem("watch", None)
    state.problem("report", None)
    assert state.answer(now=0.0, svid_seconds_left=50.0, revoked=False) == (200, "ready\n")


class Refusing(World):
    """The renewer's world, with an authority that refuses for good, then relents."""

    async def renew(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise ControlPlaneError(
                "the authority's trust domain is other.org …",
                reason="trust_domain_mismatch",
                permanent=True,
            )
        await super().renew()


async def test_renewal_retries_a_permanent_failure_slowly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = Refusing()
    world.fail_next = 2
    failures: list[tuple[str, int, float]] = []

    def on_failure(exc: MeshIdError, n: int, left: float, retry: float) -> None:
        failures.append((exc.reason, n, retry))

    pacing = Pacing(slow_retry=5.0)
    with trio.move_on_after(40):
        await renewal_loop(
            Schedule(),
            world.current,
            world.renew,
            world.wall,
            on_failure,
            rand=lambda: 0.5,
            slow=pacing.slow,
        )
    # due at 15 (half of 30 s); fails there and 5 s later (not 0.75 s), renews 5 s after that
    assert failures == [("trust_domain_mismatch", 1, 5.0), ("trust_domain_mismatch", 2, 5.0)]
    assert world.renewed_at[0] == pytest.approx(15 + 5 + 5)
