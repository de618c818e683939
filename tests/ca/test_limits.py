"""The enrollment guessing limit shared across forked workers: same rules, one count."""

from __future__ import annotations

import os

from ca.limits import SharedFailureLimiter


def _in_child(fn: object) -> None:
    """Run `fn` in a forked child and wait for it (exit status 0 means it ran)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            fn()  # type: ignore[operator]
            status = 0
        finally:
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0


def test_failures_counted_in_another_process_block_here() -> None:
    limiter = SharedFailureLimiter(max_failures=5, window=60, block=30)
    try:
        _in_child(lambda: [limiter.failed("10.0.0.1", 100.0 + i) for i in range(3)])
        assert limiter.blocked("10.0.0.1", 104.0) == 0.0
        assert not limiter.failed("10.0.0.1", 104.0)
        assert limiter.failed("10.0.0.1", 105.0)  # the fifth, two of them here
        assert limiter.blocked("10.0.0.1", 110.0) == 25.0
        assert limiter.blocked("10.0.0.2", 110.0) == 0.0  # the negative twin: another source
        assert limiter.blocked("10.0.0.1", 135.0) == 0.0  # the block ends
        assert len(limiter.active(110.0)) == 1
    finally:
        limiter.close()


def test_failures_older_than_the_window_do_not_count() -> None:
    limiter = SharedFailureLimiter(max_failures=3, window=10, block=30)
    try:
        assert not limiter.failed("a", 0.0)
        assert not limiter.failed("a", 1.0)
        assert not limiter.failed("a", 20.0)  # the first two are out of the window
        assert not limiter.failed("a", 21.0)
        assert limiter.failed("a", 22.0)
    finally:
        limiter.close()


def test_a_full_table_forgets_the_stalest_source_and_keeps_working() -> None:
    limiter = SharedFailureLimiter(max_failures=2, window=100, block=100, slots=4)
    try:
        for i in range(50):  # far more sources than slots: memory stays fixed
            limiter.failed(f"10.0.1.{i}", float(i))
        assert limiter.failed("10.0.1.49", 60.0)  # the newest is still remembered
        assert limiter.blocked("10.0.1.49", 61.0) > 0
    finally:
        limiter.close()
