"""Closing the authority while a worker thread is inside a transaction.

The control plane runs its database work in worker threads; a test, or a
shutdown, may close the authority while one of them is mid-statement. With
SQLite that once freed a statement under the thread still stepping it and
ended the whole process. `Store.close()` now waits for the transaction in
flight, and any later use is one clean `StateError`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from ca_helpers import TD, Clock

from ca.authority import Authority
from meshid.errors import StateError

DEADLINE = 10.0


def test_close_waits_for_the_transaction_in_flight_then_refuses_later_use(
    tmp_path: Path, clock: Clock
) -> None:
    authority = Authority.init(tmp_path / "ca", TD, clock=clock)
    store = authority.store
    inside, release = threading.Event(), threading.Event()
    seen: list[object] = []

    def reader() -> None:
        with store.read() as conn:
            inside.set()
            assert release.wait(DEADLINE)
            # Still a working connection: close() has been waiting for this transaction.
            seen.append(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])

    worker = threading.Thread(target=reader)
    worker.start()
    assert inside.wait(DEADLINE)
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close() returned while a transaction was still open"
    release.set()
    worker.join(DEADLINE)
    closer.join(DEADLINE)
    assert not worker.is_alive() and not closer.is_alive()
    assert len(seen) == 1 and isinstance(seen[0], int) and seen[0] >= 1

    with pytest.raises(StateError, match="the authority database is closed"), store.read():
        pass
    with pytest.raises(StateError, match="the authority database is closed"):
        authority.versions()
    store.close()  # a second close is harmless
